"""Run the Flower app as a simulation on this machine (Flower's Ray-backed simulation runtime).

Ray binds the host's addresses and probes outside ones when left alone, so by default the run
happens inside a private network namespace where only loopback exists (`unshare -n`): nothing
can reach or be reached from another address.

The terminal shows what the user needs (the data summary, rounds, failures); Flower's own log
goes to `<out>/flower.log`, and the one warning Ray prints from C++ when it finds no outside
route (expected in the namespace) is dropped from the re-executed run's stderr.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.config import TrainConfig

NETNS_ENV = "PROMPTFOLIO_NETNS"
# Ray's C++ core logs this when it cannot reach 8.8.8.8, which a private namespace guarantees
EXPECTED_RAY_NOISE = ("Failed to determine local IP via external connectivity",)


class TrainingFailed(RuntimeError):
    """The federated run did not complete; the message names the failed clients or the cause."""


def bring_loopback_up() -> None:
    """`ip link set lo up` without needing iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, request)[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 0x1))


def in_private_netns() -> bool:
    return os.environ.get(NETNS_ENV) == "1"


def isolated_argv(argv: list[str]) -> list[str]:
    """The command that re-runs `argv` in a new network namespace (root: -n; others: -rn)."""
    if shutil.which("unshare") is None:
        raise RuntimeError("`unshare` (util-linux) is needed to isolate Ray's network; install it or pass "
                           "--network host on a machine where Ray may bind its addresses")
    flags = ["-n"] if os.geteuid() == 0 else ["-r", "-n"]
    return ["unshare", *flags, "--", *argv]


def run_isolated(argv: list[str]) -> int:
    """Run `argv` in the namespace, passing its stderr through minus Ray's expected warning."""
    env = dict(os.environ, **{NETNS_ENV: "1"})
    try:
        proc = subprocess.Popen(isolated_argv(argv), env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
        for line in proc.stderr:
            if not any(noise in line for noise in EXPECTED_RAY_NOISE):
                sys.stderr.write(line)
                sys.stderr.flush()
        return proc.wait()
    except KeyboardInterrupt:
        return 130


def flower_log_to_file(path: Path) -> None:
    """Flower's log (the run_simulation deprecation banner, per-round INFO, client tracebacks)
    into a file instead of the terminal; our own progress lines are printed separately."""
    logger = logging.getLogger("flwr")
    for handler in list(logger.handlers):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.getLogger("ray").setLevel(logging.ERROR)


def prepare_plan(cfg: TrainConfig):
    """Plan (or, resuming, reread) the data and print its summary before anything trains."""
    from training.data import DataPlan, build_plan, summary_lines

    plan_path = cfg.out_dir / "plan.json"
    if cfg.resume and plan_path.is_file():
        plan = DataPlan.read(plan_path)
    else:
        source = "the embedded world" if cfg.data == "embedded" else cfg.data
        print(f"planning: reading and checking every image of {source}", file=sys.stderr, flush=True)
        plan = build_plan(cfg)
        plan.write(plan_path)
        for stale in ("metrics.json", "server/checkpoint.safetensors"):
            (cfg.out_dir / stale).unlink(missing_ok=True)
    print("\n".join(summary_lines(plan)), file=sys.stderr, flush=True)
    return plan


RAY_PREFIX = "pf-ray-"
OWNER_LOCK = ".promptfolio-owner.lock"


def hold_owner_lock(folder: Path):
    """An flock on a file in `folder`, held while this run lives: the kernel drops it when the process
    ends, however it ends (a SIGKILLed run cannot remove its folder, but the next run can tell)."""
    lock = open(folder / OWNER_LOCK, "wb")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def remove_orphaned_ray_folders() -> None:
    """Remove the Ray folders of earlier runs that ended without cleaning up (killed): those whose
    owner lock nobody holds. A folder without a lock file (older versions) is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{RAY_PREFIX}*"):
        try:
            with open(folder / OWNER_LOCK, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while the owner runs
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def remove_ray_folder(folder: Path, patience_s: float = 5.0) -> None:
    """Remove Ray's temporary folder; its processes may still be writing session files into it for a
    moment after the simulation returns (one pass then left the empty folder behind)."""
    deadline = time.monotonic() + patience_s
    while True:
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def simulate(cfg: TrainConfig) -> dict:
    """Plan the data, run all rounds on Flower, write outputs; returns the metrics summary."""
    from training.client_app import make_client_app
    from training.outputs import read_metrics
    from training.plots import plot_run
    from training.server_app import make_server_app

    if in_private_netns():
        bring_loopback_up()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray_tmp = owner = None
    if "RAY_TMPDIR" not in os.environ:  # ours to remove when the run ends (Ray leaves its session files)
        remove_orphaned_ray_folders()
        ray_tmp = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix=RAY_PREFIX)
        owner = hold_owner_lock(Path(ray_tmp))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    prepare_plan(cfg)
    (cfg.out_dir / "config.json").write_text(cfg.to_json() + "\n")
    print(f"starting {cfg.num_clients} simulated clients on Flower (its log: {cfg.out_dir / 'flower.log'})",
          file=sys.stderr, flush=True)
    from flwr.simulation import run_simulation  # imported here: it installs Flower's console logger

    flower_log_to_file(cfg.out_dir / "flower.log")
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(os.cpu_count() or 1, cfg.num_clients)),
                             "include_dashboard": False, "logging_level": "error", "log_to_driver": False}}
    try:
        run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_config=backend)
    finally:
        if ray_tmp is not None:
            remove_ray_folder(Path(ray_tmp))
            owner.close()
    metrics = read_metrics(cfg.out_dir)
    if metrics is None:
        raise TrainingFailed(f"the federated run produced no metrics; see {cfg.out_dir / 'flower.log'}")
    if metrics.get("stopped"):
        raise TrainingFailed(f"the run stopped: {metrics['stopped']}. Fix the cause and rerun with --resume to "
                             f"continue after round {len(metrics['rounds'])}; details in {cfg.out_dir / 'flower.log'}")
    if len(metrics["rounds"]) < cfg.rounds:
        raise TrainingFailed(f"the run stopped after {len(metrics['rounds'])} of {cfg.rounds} rounds; rerun with "
                             f"--resume to continue (see {cfg.out_dir / 'flower.log'})")
    plot_run(metrics, cfg.out_dir)
    return metrics


def main_simulation(cfg: TrainConfig, argv: list[str], network: str) -> int:
    """CLI entry: re-exec inside a private network namespace unless told otherwise."""
    if network == "isolate" and not in_private_netns():
        return run_isolated([sys.executable, "-m", "promptfolio.cli", *argv])
    try:
        metrics = simulate(cfg)
    except TrainingFailed as e:
        print(f"promptfolio train: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({k: {"personal": round(v["personal_mean"], 2), "general": round(v["general_mean"], 2)}
                      for k, v in metrics["final"].items()}, indent=1))
    print(f"outputs in {cfg.out_dir}", file=sys.stderr)
    return 0
