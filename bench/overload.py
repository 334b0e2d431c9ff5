"""Overload and fairness on the real server, measured side by side in one run on this machine.

    .venv/bin/python bench/reliability.py overload|fairness [--seconds 30] [--tenants 50] [--deadline 1.0]
    .venv/bin/python bench/overload.py [--seconds 30] [--tenants 50] [--deadline 1.0]   (both parts)

1. capacity: closed loop (16 clients) of classify requests, spread over the tenants -> req/s.
2. overload: open-loop Poisson arrivals at 70% and 120% of that capacity for --seconds each,
   with a local prompt upload every 10 s: p50/p99 of admitted requests, the shed fraction (503 +
   Retry-After), and connections that ended without an HTTP answer.
3. fairness: a one-image probe from one tenant, idle and while another tenant's worst-case legal
   request (64 images at the decode limit) runs: p50/p99 and the busy/idle ratio of p99.

The load generator writes pre-built HTTP/1.1 requests on raw asyncio streams, so its own cost
per request stays far below the server's (httpx in threads took more CPU than the server here).
`overload(...)` and `fairness(...)` are also callable on their own against a running server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def png(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, "PNG")
    return buf.getvalue()


def multipart(files: list[bytes], fields: dict[str, str] | None = None, name: str = "images",
              kind: str = "png") -> tuple[str, bytes]:
    boundary = "pf-bench-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in (fields or {}).items()]
    for i, data in enumerate(files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="i{i}.{kind}"\r\n'
                     f"Content-Type: image/{kind}\r\n\r\n".encode() + data + b"\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def request_bytes(path: str, key: str, content_type: str, body: bytes, method: str = "POST") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + body


async def send(port: int, raw: bytes, timeout: float = 120.0) -> tuple[int | str, float, dict[str, str]]:
    """(status or the failure, seconds, headers) for one request on a fresh connection."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)  # Connection: close -> read to EOF
        writer.close()
    except (OSError, asyncio.TimeoutError) as e:
        return f"{type(e).__name__}", time.perf_counter() - start, {}
    seconds = time.perf_counter() - start
    if not answer:
        return "closed without an answer", seconds, {}
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    return int(head[0].split()[1]), seconds, headers


def summarize(results: list[tuple], offered_rps: float, seconds: float) -> dict:
    admitted = [s for status, s, _ in results if status == 200]
    shed = [h for status, _, h in results if status == 503]
    failed = [status for status, _, _ in results if isinstance(status, str)]
    other = [status for status, _, _ in results if isinstance(status, int) and status not in (200, 503)]
    return {"offered_rps": round(offered_rps, 1), "requests": len(results), "seconds": seconds,
            "admitted": len(admitted), "admitted_p50_ms": round(1000 * pct(admitted, 50), 1),
            "admitted_p99_ms": round(1000 * pct(admitted, 99), 1),
            "shed_fraction": round(len(shed) / max(len(results), 1), 3),
            "retry_after_s": sorted({h.get("retry-after", "none") for h in shed}), "failed": len(failed),
            "failures": sorted(set(failed))[:5], "other_status": sorted(set(other))}


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float) -> float:
    """Requests per second that `concurrency` back-to-back clients get (only 200s count)."""
    done, stop = 0, time.perf_counter() + seconds

    async def client(i: int) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            status, _, _ = await send(port, requests[(i + done) % len(requests)])
            done += status == 200

    start = time.perf_counter()
    await asyncio.gather(*[client(i) for i in range(concurrency)])
    return done / (time.perf_counter() - start)


async def loop_lag(lags: list[float], period: float = 0.005) -> None:
    """How late this process's event loop wakes up: the generator's own scheduling delay, which
    its latencies include (it shares the cores with the server it saturates)."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - start - period)


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float, seed: int = 0,
                    side_requests: list[bytes] | None = None, side_every_s: float = 10.0,
                    lags: list[float] | None = None) -> list[tuple]:
    """Poisson arrivals at `rate` req/s for `seconds`, whatever the answers take; plus a side request
    (e.g. an upload) every `side_every_s`. `lags`: filled with the generator's loop delays."""
    rng = random.Random(seed)
    lagger = asyncio.create_task(loop_lag(lags)) if lags is not None else None
    gc.collect()  # the generator's own full collections (100s of ms with thousands of tasks in flight)
    gc.disable()  # would be added to the latencies it measures
    tasks, start = [], time.perf_counter()
    next_side = start + side_every_s
    t = start
    while t < start + seconds:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(send(port, rng.choice(requests))))
        if side_requests and time.perf_counter() >= next_side:
            next_side += side_every_s
            asyncio.create_task(send(port, rng.choice(side_requests)))
    try:
        results = list(await asyncio.gather(*tasks))
    finally:
        gc.enable()
    if lagger is not None:
        lagger.cancel()
    return results


def answered_buckets(port: int) -> dict[float, float]:
    """The server's own histogram of classify requests answered 200, from their bytes arriving to the
    answer (promptfolio_classify_answered_seconds): cumulative count per upper bound."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    prefix = 'promptfolio_classify_answered_seconds_bucket{le="'
    return {float(line[len(prefix):].split('"')[0]): float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(prefix)}


def admission(port: int) -> dict:
    """The server's admission counters (/v1/info): requests shed at the gate and in the queue."""
    import urllib.request

    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=30).read())["admission"]


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket that holds the q-quantile of what was observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    return next((b for b, c in zip(bounds, counts) if total and c >= q * total), float("nan"))


def overload(port: int, requests: list[bytes], capacity_rps: float, loads: tuple[float, ...] = (0.7, 1.2),
             seconds: float = 30.0, side_requests: list[bytes] | None = None) -> list[dict]:
    """One open-loop run per load factor (fraction of `capacity_rps`); a summary row each."""
    rows = []
    for load in loads:
        rate = load * capacity_rps
        lags: list[float] = []
        before, gate = answered_buckets(port), admission(port)
        results = asyncio.run(open_loop(port, requests, rate, seconds, side_requests=side_requests, lags=lags))
        after, gate_after = answered_buckets(port), admission(port)
        rows.append({"load": load, **summarize(results, rate, seconds),
                     "server_p99_at_most_s": bucket_quantile(before, after, 0.99),
                     "generator_lag_p99_ms": round(1000 * pct(lags, 99), 1),
                     "shed_at_gate": gate_after["shed"] - gate["shed"],
                     "shed_in_queue": gate_after["shed_in_queue"] - gate["shed_in_queue"]})
    return rows


def soak(port: int, requests: list[bytes], rate: float, minutes: int, side_requests: list[bytes] | None = None,
         side_every_s: float = 5.0, rss=None) -> list[dict]:
    """Open-loop Poisson load at `rate` for `minutes`, one summary row per minute (plus server RSS via `rss()`):
    the issue-10 soak on this generator instead of httpx (whose own CPU saturated a core there)."""
    rows = []
    for minute in range(1, minutes + 1):
        results = asyncio.run(open_loop(port, requests, rate, 60.0, seed=minute, side_requests=side_requests,
                                        side_every_s=side_every_s))
        rows.append({"minute": minute, **summarize(results, rate, 60.0), "rss_mib": rss() if rss else None})
        r = rows[-1]
        print(f"| {minute} | {r['requests']} | {r['admitted_p50_ms']} / {r['admitted_p99_ms']} | "
              f"{r['shed_fraction']:.1%} | {r['failed']} {r['failures']} | {r['other_status']} | {r['rss_mib']} |",
              flush=True)
    return rows


def fairness(port: int, probe: bytes, heavy: bytes, repeats: int = 30) -> dict:
    """The probe's latency idle, then back to back while `heavy` requests run one after another."""

    async def run() -> dict:
        idle = [(await send(port, probe))[1] for _ in range(repeats)]
        busy, heavy_runs, stop = [], [], False

        async def heavy_loop() -> None:
            while not stop:
                status, seconds, _ = await send(port, heavy)
                heavy_runs.append((status, seconds))

        runner = asyncio.create_task(heavy_loop())
        await asyncio.sleep(0.5)
        statuses: list = []
        while len(busy) < repeats or not heavy_runs:
            status, seconds, _ = await send(port, probe)
            statuses.append(status)
            if status == 200:
                busy.append(seconds)
        stop = True
        await runner
        return {"probe_statuses": {str(s): statuses.count(s) for s in set(statuses)},
                "idle_p50_ms": 1000 * pct(idle, 50), "idle_p99_ms": 1000 * pct(idle, 99),
                "busy_p50_ms": 1000 * pct(busy, 50), "busy_p99_ms": 1000 * pct(busy, 99),
                "p99_ratio": pct(busy, 99) / pct(idle, 99), "heavy_requests": len(heavy_runs),
                "heavy_status": sorted({s for s, _ in heavy_runs}, key=str),
                "heavy_seconds": round(float(np.mean([s for _, s in heavy_runs])), 2)}

    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asyncio.run(run()).items()}


def _setup(server, tenants: int) -> tuple[dict[str, str], list[bytes], list[bytes]]:
    """Register tenants; per tenant a classify request (4 world images) and a local prompt upload."""
    import httpx

    from promptfolio.embedded import world
    from promptfolio.encoder import load_encoder
    from promptfolio.prompts import init_context
    from prompts_store.artifact import PromptMeta, artifact_bytes
    from service_helpers import ADMIN_KEY, auth

    encoder = load_encoder("embedded")
    images, _ = world.task_dataset(64, world.calibrated("noise"), seed=3)
    classes = ["red circle", "blue star", "green square", "yellow triangle", "purple cross", "orange circle"]
    keys, classify, uploads = {}, [], []
    for i in range(tenants):
        r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": f"t{i}", "classes": classes}, headers=auth(ADMIN_KEY))
        keys[f"t{i}"] = key = r.json()["api_key"]
        content_type, body = multipart([png(images[(i + j) % 64]) for j in range(4)])
        classify.append(request_bytes(f"/v1/tenants/t{i}/classify", key, content_type, body))
        ctx = init_context(encoder, n_ctx=4, generator=__import__("torch").Generator().manual_seed(i))
        meta = PromptMeta(kind="local", tenant=f"t{i}", encoder=encoder.fingerprint, n_ctx=4, width=ctx.shape[1],
                          theta=0.5)
        content_type, body = multipart([artifact_bytes(ctx, meta)], name="file")
        uploads.append(request_bytes(f"/v1/tenants/t{i}/prompt", key, content_type, body))
    return keys, classify, uploads


def add_arguments(parser: argparse.ArgumentParser, parts: str = "overload,fairness") -> None:
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each open-loop run")
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--deadline", type=float, default=1.0, help="PROMPTFOLIO_ADMISSION_DEADLINE_S")
    parser.add_argument("--parts", default=parts, help="which parts to run (overload, fairness, soak)")
    parser.add_argument("--soak-minutes", type=int, default=4)
    parser.add_argument("--soak-fraction", type=float, default=0.5, help="of the capacity for 1-image requests")
    parser.add_argument("--soak-rate", type=float, default=0.0, help="req/s (0: --soak-fraction of capacity)")
    parser.add_argument("--soak-upload-every", type=float, default=5.0, help="seconds between uploads (0: none)")


def run(args: argparse.Namespace) -> None:
    """Start a server, run the parts asked for, print the tables (and write JSON to args.out)."""
    from service_helpers import Server

    base = Path(tempfile.mkdtemp(prefix="pf-overload-"))
    server = Server(base / "store", base / "server.log", PROMPTFOLIO_ADMISSION_DEADLINE_S=str(args.deadline)).start()
    try:
        keys, classify, uploads = _setup(server, args.tenants)
        rows, fair, capacity, soak_rows = [], {}, None, []  # None: not measured (null in the JSON)
        if "overload" in args.parts:
            asyncio.run(closed_loop(server.port, classify, 4, 3.0))  # warm up
            capacity = asyncio.run(closed_loop(server.port, classify, 16, max(10.0, args.seconds / 3)))
            print(f"capacity (16 closed-loop clients, 4 images per request): {capacity:.1f} req/s")
            rows = overload(server.port, classify, capacity, seconds=args.seconds, side_requests=uploads)
            _print_overload(rows, args)
        if "fairness" in args.parts:
            fair = _fairness_run(server, keys)
        if "soak" in args.parts:
            soak_rows = _soak_run(server, keys, uploads, args)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"capacity_rps": capacity, "overload": rows, "fairness": fair,
                                                  "soak": soak_rows},
                                                 indent=1))
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "runs" / "overload.json"))
    run(parser.parse_args())
    return 0


def _print_overload(rows: list[dict], args) -> None:
    print(f"\nopen loop, {args.seconds:.0f} s each, deadline {args.deadline:g} s, {args.tenants} tenants, "
          "an upload every 10 s")
    print("| load | offered req/s | requests | admitted p50 / p99 ms | server's p99 at most | generator lag p99 | "
          "shed (at the gate / in the queue) | failed (no answer) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['load']:.0%} | {row['offered_rps']} | {row['requests']} | {row['admitted_p50_ms']} / "
              f"{row['admitted_p99_ms']} | {row['server_p99_at_most_s']:g} s | {row['generator_lag_p99_ms']} ms | "
              f"{row['shed_fraction']:.1%} ({row['shed_at_gate']} / {row['shed_in_queue']}) | "
              f"{row['failed']} {row['failures']} |")


def _soak_run(server, keys: dict[str, str], uploads: list[bytes], args) -> list[dict]:
    """A long steady run: 1 image per request over the tenants at --soak-rate (or --soak-fraction of the
    measured capacity), a local prompt upload every --soak-upload-every seconds (0: none)."""
    import psutil

    from promptfolio.embedded import world

    images, _ = world.task_dataset(16, world.calibrated("noise"), seed=4)
    requests = []
    for i, (tenant, key) in enumerate(keys.items()):
        content_type, body = multipart([png(images[i % 16])])
        requests.append(request_bytes(f"/v1/tenants/{tenant}/classify", key, content_type, body))
    asyncio.run(closed_loop(server.port, requests, 4, 3.0))  # warm up
    capacity = asyncio.run(closed_loop(server.port, requests, 8, 15.0))
    rate = args.soak_rate or args.soak_fraction * capacity

    def rss() -> float:
        root = psutil.Process(server.proc.pid)
        return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)

    print(f"\nsoak: capacity {capacity:.1f} req/s (8 closed-loop clients, 1 image each); {rate:.1f} req/s for "
          f"{args.soak_minutes} min over {len(keys)} tenants, "
          + (f"an upload every {args.soak_upload_every:g} s" if args.soak_upload_every > 0 else "no uploads"))
    print("| minute | requests | admitted p50 / p99 ms | shed | failed (no answer) | other statuses | RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    every = args.soak_upload_every
    return soak(server.port, requests, rate, args.soak_minutes, uploads if every > 0 else None, every or 5.0, rss)


def _fairness_run(server, keys: dict[str, str]) -> dict:
    probe_ct, probe_body = multipart([png(Image.new("RGB", (64, 64), (200, 30, 30)))])
    heavy_ct, heavy_body = multipart([png(Image.new("RGB", (4000, 4000), (90, 90, 90)))] * 64)
    fair = fairness(server.port, request_bytes("/v1/tenants/t1/classify", keys["t1"], probe_ct, probe_body),
                    request_bytes("/v1/tenants/t0/classify", keys["t0"], heavy_ct, heavy_body))
    print("\nfairness: a 64x64 probe (tenant t1) idle vs while t0 sends 64 RGB 4000x4000 PNGs per request")
    print(json.dumps(fair))
    return fair


if __name__ == "__main__":
    sys.exit(main())
