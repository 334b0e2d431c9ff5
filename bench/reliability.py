"""Reliability benchmark (not a timed test): kill loop, soak, restart-to-ready, overload, fairness.
Prints tables.

    python bench/reliability.py kill --kills 100      # SIGKILL the whole server tree during writes
    python bench/reliability.py soak --minutes 10     # steady load at a fraction of capacity
    python bench/reliability.py restart --runs 5 [--compare /path/to/other/checkout]
    python bench/reliability.py overload [--seconds 30]   # 70% and 120% of capacity: p50/p99, shed
    python bench/reliability.py fairness                  # a probe beside a worst-case legal request

kill: each round starts the server on the same store, runs upload, PATCH (θ) and rollback streams
against their own tenants for a random 0.5-2 s, then SIGKILLs the server and all its processes. After
every kill the store is checked before the next start: every acknowledged upload is on disk with
its content (else "lost"), every version file, pointer and tenant record parses and validates
(else "torn"), each tenant's state is its last acknowledged write or the one in flight (else
"lost"), temporary files the kill left are counted (the next start removes them). Each restart's
time to /readyz is recorded, and every tenant must classify after it.
soak: measures capacity (closed loop), then sends classify requests at `--fraction` of it over
`--tenants` tenants with an upload every few seconds; per minute: requests, errors by status,
p50/p99 latency, server RSS.
restart: cold start and restart-after-SIGKILL times to /readyz, for this checkout and optionally
another one (e.g. the code before a change), run alternately so both see the same machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import overload  # noqa: E402  (bench/overload.py: the overload and fairness parts)
from promptfolio.embedded import world  # noqa: E402
from promptfolio.encoder import load_encoder  # noqa: E402
from promptfolio.prompts import init_context  # noqa: E402
from prompts_store.artifact import ArtifactError, PromptMeta, artifact_bytes, read_artifact  # noqa: E402

ADMIN = "bench-admin-key"
CLASSES = ["red circle", "blue star", "green square", "yellow triangle"]


# ---- a server process tree -----------------------------------------------------------------
class Server:
    def __init__(self, root: Path, store: Path, log: Path, env: dict[str, str] | None = None):
        self.root, self.store, self.log, self.extra_env = root, store, log, env or {}
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 180.0) -> float:
        """Start `promptfolio serve` from `root`; returns seconds until /readyz answers 200."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        base = self.store.parent
        env = dict(os.environ, PYTHONPATH=str(self.root), BENTOML_HOME=str(base / "bentoml_home"),
                   BENTOML_DO_NOT_TRACK="true", PROMPTFOLIO_ONNX_CACHE=str(base / "onnx"), HF_HUB_OFFLINE="1")
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "promptfolio.cli", "serve", "--store", str(self.store), "--host", "127.0.0.1",
               "--port", str(port), "--admin-key", ADMIN]
        if "--init" in (self.root / "service" / "commands.py").read_text():
            cmd.append("--init")
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("server not ready in time")

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mib(self) -> float:
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def kill(self) -> None:
        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        if self.proc is not None:
            self.proc.wait(timeout=30)


# ---- inputs ---------------------------------------------------------------------------------
def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def png(seed: int) -> bytes:
    images, _ = world.task_dataset(1, world.calibrated("clean"), seed, labels=[seed % len(world.CLASS_NAMES)])
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    return buf.getvalue()


def local_artifact(encoder, seed: int, trained_with: str | None = None) -> bytes:
    ctx = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
    return artifact_bytes(ctx, PromptMeta(kind="local", tenant="bench", encoder=encoder.fingerprint, n_ctx=4,
                                          width=ctx.shape[1], theta=0.5, global_sha256=trained_with))


def global_artifact(encoder, seed: int) -> bytes:
    ctx = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
    return artifact_bytes(ctx, PromptMeta(kind="global", encoder=encoder.fingerprint, n_ctx=4, width=ctx.shape[1]))


def register(url: str, tenant: str) -> str:
    r = httpx.post(f"{url}/v1/tenants", json={"tenant": tenant, "classes": CLASSES}, headers=auth(ADMIN), timeout=60)
    r.raise_for_status()
    return r.json()["api_key"]


def upload(client: httpx.Client, url: str, tenant: str, key: str, data: bytes) -> httpx.Response:
    return client.post(f"{url}/v1/tenants/{tenant}/prompt", headers=auth(key),
                       files={"file": ("p.safetensors", data, "application/octet-stream")})


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


# ---- kill loop --------------------------------------------------------------------------------
class Streams:
    """Writers against their own tenants, recording what the server acknowledged."""

    def __init__(self, url: str, keys: dict[str, str], encoder, global_sha: str, seed: int):
        self.url, self.keys, self.encoder, self.global_sha = url, keys, encoder, global_sha
        self.stop = threading.Event()
        self.acked_uploads: list[tuple[str, int, str]] = []  # (tenant, version, content sha)
        self.in_flight: dict[str, object] = {}  # per tenant: the write sent but not yet answered
        self.last_acked: dict[str, object] = {}
        self.errors: dict[int, int] = {}
        self.rng = random.Random(seed)
        self.seed = seed * 1000

    def _count(self, status: int) -> None:
        self.errors[status] = self.errors.get(status, 0) + 1

    def uploads(self, tenant: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                self.seed += 1
                pinned = self.seed % 2 == 0
                data = local_artifact(self.encoder, self.seed, self.global_sha if pinned else None)
                sha = read_artifact(data)[1].content_sha256
                self.in_flight[tenant] = sha
                try:
                    r = upload(client, self.url, tenant, self.keys[tenant], data)
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    self.acked_uploads.append((tenant, r.json()["version"], sha))
                    self.last_acked[tenant] = sha
                else:
                    self._count(r.status_code)

    def patches(self, tenant: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                theta = round(self.rng.random(), 3)
                self.in_flight[tenant] = theta
                try:
                    r = client.patch(f"{self.url}/v1/tenants/{tenant}", json={"theta": theta},
                                     headers=auth(self.keys[tenant]))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    self.last_acked[tenant] = theta
                else:
                    self._count(r.status_code)

    def rollbacks(self, tenant: str, versions: list[int]) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                version = self.rng.choice(versions)
                self.in_flight[tenant] = version
                try:
                    r = client.post(f"{self.url}/v1/tenants/{tenant}/rollback", json={"version": version},
                                    headers=auth(self.keys[tenant]))
                except httpx.HTTPError:
                    return
                if r.status_code == 200:
                    self.last_acked[tenant] = version
                else:
                    self._count(r.status_code)


def check_store(store: Path, encoder, streams: Streams, all_acked: list[tuple[str, int, str]]) -> dict:
    """After a kill, before the next start: lost, torn and leftover files."""
    from prompts_store.store import PromptStore

    found = {"lost": 0, "torn": 0, "tmp_files": len(list(store.glob("**/.tmp-*")))}
    s = PromptStore(store, encoder.fingerprint, encoder.text_width)
    for path in store.glob("**/v*.safetensors"):
        try:
            read_artifact(path.read_bytes(), encoder.fingerprint, encoder.text_width)
        except ArtifactError:
            found["torn"] += 1
    for tenant, version, sha in all_acked:
        try:
            if s.meta(tenant, version).content_sha256 != sha:
                found["lost"] += 1
        except (ArtifactError, ValueError):
            found["lost"] += 1
    for tenant in s.tenants():
        try:
            serving = s.serving(tenant)
        except (ArtifactError, ValueError):
            found["torn"] += 1
            continue
        acked, flying = streams.last_acked.get(tenant), streams.in_flight.get(tenant)
        if acked is None:
            continue
        state = {"u": serving.local_sha256, "p": serving.theta_setting, "r": serving.local_version}[tenant[0]]
        if state not in (acked, flying):
            found["lost"] += 1
    return found


def kill_loop(args: argparse.Namespace) -> None:
    encoder = load_encoder("embedded")
    base = Path(tempfile.mkdtemp(prefix="pf-kill-"))
    server = Server(REPO, base / "store", base / "server.log")
    ready = [server.start()]
    keys = {t: register(server.url, t) for t in ("u0", "u1", "p0", "r0")}
    g = httpx.post(f"{server.url}/v1/global/prompt", headers=auth(ADMIN), timeout=60,
                   files={"file": ("g.safetensors", global_artifact(encoder, 1), "application/octet-stream")})
    global_sha = g.json()["content_sha256"]
    with httpx.Client(timeout=60) as client:
        rollback_versions = [upload(client, server.url, "r0", keys["r0"], local_artifact(encoder, 900 + i)).json()
                             ["version"] for i in range(4)]
    totals = {"lost": 0, "torn": 0, "tmp_files": 0, "unservable_after_restart": 0}
    all_acked: list[tuple[str, int, str]] = []
    writes = 0
    rng = random.Random(0)
    for round_ in range(args.kills):
        streams = Streams(server.url, keys, encoder, global_sha, seed=round_)
        threads = [threading.Thread(target=streams.uploads, args=(t,)) for t in ("u0", "u1")]
        threads.append(threading.Thread(target=streams.patches, args=("p0",)))
        threads.append(threading.Thread(target=streams.rollbacks, args=("r0", rollback_versions)))
        [t.start() for t in threads]
        time.sleep(rng.uniform(0.5, 2.0))
        server.kill()
        streams.stop.set()
        [t.join(timeout=60) for t in threads]
        all_acked += streams.acked_uploads
        writes += len(streams.acked_uploads) + len(streams.last_acked)
        found = check_store(base / "store", encoder, streams, all_acked)
        for k, v in found.items():
            totals[k] += v
        ready.append(server.start())
        for tenant, key in keys.items():
            r = httpx.post(f"{server.url}/v1/tenants/{tenant}/classify", headers=auth(key), timeout=60,
                           files=[("images", ("a.png", png(round_), "image/png"))])
            totals["unservable_after_restart"] += r.status_code != 200
        print(f"kill {round_ + 1}/{args.kills}: acknowledged uploads so far {len(all_acked)}, {found}, "
              f"restart {ready[-1]:.2f} s, errors {streams.errors}", flush=True)
    server.kill()
    rows = [{"kills": args.kills, "acknowledged uploads": len(all_acked), "lost": totals["lost"],
             "torn": totals["torn"], "tmp files left by kills (removed at restart)": totals["tmp_files"],
             "tenants unservable after restart": totals["unservable_after_restart"],
             "restart to /readyz, s (median, min, max)": summary(ready[1:])}]
    report(args, "kill", rows)


# ---- soak -------------------------------------------------------------------------------------
async def _classify(client: httpx.AsyncClient, url: str, tenant: str, key: str, image: bytes):
    start = time.perf_counter()
    try:
        r = await client.post(f"{url}/v1/tenants/{tenant}/classify", headers=auth(key),
                              files=[("images", ("a.png", image, "image/png"))])
        status = r.status_code
    except httpx.HTTPError:
        status = 0  # connection error or timeout
    return status, time.perf_counter() - start


async def _capacity(url: str, keys: dict[str, str], images: list[bytes], seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    tenants = list(keys)
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker(i: int) -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                t = tenants[(done + i) % len(tenants)]
                status, _ = await _classify(client, url, t, keys[t], images[done % len(images)])
                done += status == 200
        await asyncio.gather(*[worker(i) for i in range(8)])
    return done / seconds


async def _soak(server: Server, keys: dict[str, str], images: list[bytes], rate: float, minutes: float,
                encoder, upload_every_s: float) -> list[dict]:
    tenants = list(keys)
    rows: list[dict] = []
    current = {"statuses": {}, "latencies": []}  # the minute in progress: answers count where they arrive
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()
    next_minute, next_upload, i = start + 60, start + upload_every_s, 0

    def record(status: int | str, latency: float | None = None) -> None:
        current["statuses"][status] = current["statuses"].get(status, 0) + 1
        if latency is not None:
            current["latencies"].append(latency)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=256)) as client:
        async def one(t: str, image: bytes) -> None:
            status, latency = await _classify(client, server.url, t, keys[t], image)
            record(status, latency if status == 200 else None)

        async def up(t: str, seed: int) -> None:
            try:
                r = await client.post(f"{server.url}/v1/tenants/{t}/prompt", headers=auth(keys[t]),
                                      files={"file": ("p.safetensors", local_artifact(encoder, seed),
                                                      "application/octet-stream")})
                record(f"upload {r.status_code}")
            except httpx.HTTPError:
                record("upload failed")

        def spawn(coro) -> None:
            # O(1) bookkeeping: rebuilding the pending set every request made the generator's own cost grow
            # with its backlog, a feedback loop that throttled it (and sent bursts) once the server slowed
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        while time.perf_counter() - start < minutes * 60:
            now = time.perf_counter()
            if now >= next_minute:
                rows.append(_minute_row(len(rows) + 1, current, server))
                print(table([rows[-1]]).splitlines()[-1], flush=True)
                current = {"statuses": {}, "latencies": []}
                next_minute += 60
            if now >= next_upload:
                spawn(up(tenants[i % len(tenants)], 5000 + i))
                next_upload += upload_every_s
            spawn(one(tenants[i % len(tenants)], images[i % len(images)]))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
    if current["statuses"]:
        rows.append(_minute_row(len(rows) + 1, current, server))  # the last minute
    return rows


def _minute_row(n: int, minute: dict, server: Server) -> dict:
    lat = minute["latencies"]
    statuses = minute["statuses"]
    return {"minute": n, "requests": sum(v for k, v in statuses.items() if isinstance(k, int)),
            "5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
            "other answers": {k: v for k, v in statuses.items() if k != 200 and not (isinstance(k, int) and k >= 500)}
            or "-",
            "p50 ms": round(float(np.percentile(lat, 50)) * 1000, 1) if lat else "-",
            "p99 ms": round(float(np.percentile(lat, 99)) * 1000, 1) if lat else "-",
            "RSS MiB": round(server.rss_mib(), 1)}


def soak(args: argparse.Namespace) -> None:
    encoder = load_encoder("embedded")
    base = Path(tempfile.mkdtemp(prefix="pf-soak-"))
    server = Server(REPO, base / "store", base / "server.log")
    server.start()
    try:
        keys = {f"t{i}": register(server.url, f"t{i}") for i in range(args.tenants)}
        with httpx.Client(timeout=60) as client:
            for i, (t, key) in enumerate(keys.items()):
                upload(client, server.url, t, key, local_artifact(encoder, i))
        images = [png(i) for i in range(16)]
        capacity = asyncio.run(_capacity(server.url, keys, images, args.capacity_seconds))
        rate = capacity * args.fraction
        print(f"capacity {capacity:.1f} req/s (1 image each, 8 concurrent clients); soaking at {rate:.1f} req/s "
              f"over {args.tenants} tenants for {args.minutes} min, an upload every {args.upload_every} s", flush=True)
        rows = asyncio.run(_soak(server, keys, images, rate, args.minutes, encoder, args.upload_every))
    finally:
        server.kill()
    growth = (rows[-1]["RSS MiB"] - rows[0]["RSS MiB"]) / rows[0]["RSS MiB"] * 100
    print(f"RSS growth first→last minute: {growth:+.1f}%; 5xx total: {sum(r['5xx'] for r in rows)}")
    report(args, "soak", rows, extra={"capacity_rps": capacity, "rate_rps": rate, "rss_growth_pct": growth})


# ---- restart-to-ready -------------------------------------------------------------------------
def restart(args: argparse.Namespace) -> None:
    encoder = load_encoder("embedded")
    trees = {"this checkout": REPO}
    if args.compare:
        trees[f"compare: {args.compare}"] = Path(args.compare).resolve()
    times: dict[str, dict[str, list[float]]] = {name: {"cold": [], "after SIGKILL": []} for name in trees}
    for run in range(args.runs):
        for name, root in trees.items():  # alternate, so both see the same machine load
            base = Path(tempfile.mkdtemp(prefix="pf-restart-"))
            (base / "onnx").mkdir()
            server = Server(root, base / "store", base / "server.log",
                            env={"PROMPTFOLIO_ONNX_CACHE": str(REPO / ".cache" / "onnx")})
            times[name]["cold"].append(server.start())
            keys = {f"t{i}": register(server.url, f"t{i}") for i in range(args.tenants)}
            with httpx.Client(timeout=60) as client:
                for i, (t, key) in enumerate(keys.items()):
                    upload(client, server.url, t, key, local_artifact(encoder, i))
            server.kill()
            times[name]["after SIGKILL"].append(server.start())
            server.kill()
            print(f"run {run + 1}: {name}: cold {times[name]['cold'][-1]:.2f} s, "
                  f"after SIGKILL {times[name]['after SIGKILL'][-1]:.2f} s", flush=True)
    rows = [{"code": name, "start": kind, "runs": len(v), "to /readyz, s: median (min, max)": summary(v)}
            for name, kinds in times.items() for kind, v in kinds.items()]
    report(args, "restart", rows, extra={"load_average": os.getloadavg()})


def report(args: argparse.Namespace, name: str, rows: list[dict], extra: dict | None = None) -> None:
    print(f"\n{name} ({' '.join(sys.argv[1:])}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": sys.argv[1:], "rows": rows, **(extra or {})}, indent=2,
                                             default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the results as JSON here")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("kill", help="SIGKILL loop during uploads, PATCH and rollbacks")
    p.add_argument("--kills", type=int, default=100)
    p.set_defaults(func=kill_loop)
    p = sub.add_parser("soak", help="steady load at a fraction of measured capacity")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--tenants", type=int, default=50)
    p.add_argument("--upload-every", type=float, default=5.0, help="seconds between uploads")
    p.add_argument("--capacity-seconds", type=float, default=20)
    p.set_defaults(func=soak)
    p = sub.add_parser("restart", help="time to /readyz, cold and after SIGKILL")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--compare", help="another checkout to measure the same way (e.g. before a change)")
    p.set_defaults(func=restart)
    p = sub.add_parser("overload", help="open-loop load at 70%% and 120%% of measured capacity: p50/p99, shed")
    overload.add_arguments(p, parts="overload")
    p.set_defaults(func=overload.run)
    p = sub.add_parser("fairness", help="a small probe's latency beside a worst-case legal request")
    overload.add_arguments(p, parts="fairness")
    p.set_defaults(func=overload.run)
    args = parser.parse_args()
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
