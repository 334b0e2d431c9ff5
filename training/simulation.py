"""Run the Flower app as a simulation on this machine (Flower's Ray-backed simulation runtime).

Ray binds the host's addresses and probes outside ones when left alone, so by default the run
happens inside a private network namespace where only loopback exists (`unshare -n`): nothing
can reach or be reached from another address.
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

from training.config import TrainConfig

NETNS_ENV = "PROMPTFOLIO_NETNS"


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
    env = dict(os.environ, **{NETNS_ENV: "1"})
    try:
        return subprocess.call(isolated_argv(argv), env=env)
    except KeyboardInterrupt:
        return 130


def quiet_flower() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def simulate(cfg: TrainConfig) -> dict:
    """Plan the data, run all rounds on Flower, write outputs; returns the metrics summary."""
    from flwr.simulation import run_simulation

    from training.client_app import make_client_app
    from training.data import build_plan, write_plan
    from training.plots import plot_run
    from training.server_app import make_server_app

    if in_private_netns():
        bring_loopback_up()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="pf-ray-"))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    plan_path = cfg.out_dir / "plan.json"
    if not (cfg.resume and plan_path.is_file()):
        write_plan(build_plan(cfg), plan_path)
        for stale in ("metrics.json", "server/checkpoint.safetensors"):
            (cfg.out_dir / stale).unlink(missing_ok=True)
    (cfg.out_dir / "config.json").write_text(cfg.to_json() + "\n")
    quiet_flower()
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, min(os.cpu_count() or 1, cfg.num_clients)),
                             "include_dashboard": False, "logging_level": "error", "log_to_driver": False}}
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                   num_supernodes=cfg.num_clients, backend_config=backend)
    metrics_path = cfg.out_dir / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"the federated run produced no metrics; see the log above ({cfg.out_dir})")
    metrics = json.loads(metrics_path.read_text())
    if len(metrics["rounds"]) < cfg.rounds:
        raise RuntimeError(f"the run stopped after {len(metrics['rounds'])} of {cfg.rounds} rounds; rerun with "
                           f"--resume to continue (see the errors above)")
    plot_run(metrics, cfg.out_dir)
    return metrics


def main_simulation(cfg: TrainConfig, argv: list[str], network: str) -> int:
    """CLI entry: re-exec inside a private network namespace unless told otherwise."""
    if network == "isolate" and not in_private_netns():
        return run_isolated([sys.executable, "-m", "promptfolio.cli", *argv])
    metrics = simulate(cfg)
    print(json.dumps({k: {"personal": round(v["personal_mean"], 2), "general": round(v["general_mean"], 2)}
                      for k, v in metrics["final"].items()}, indent=1))
    print(f"outputs in {cfg.out_dir}", file=sys.stderr)
    return 0
