"""Server CPU per request outside the encoder: what bounds a GPU service (issue 13 §3).

    .venv/bin/python bench/request_cpu.py [--model tiny] [--workers 1,2] [--seconds 8] [--concurrency 8]
    (also part f of bench/serve.py)

The tiny embedded model stands in for a GPU encoder (thousands of images/s raw), so what is left is
the request path: HTTP, parsing, auth, decoding, batching, ranking, answering. For single-image and
32-image requests, multipart and JSON (base64), a closed loop of keep-alive clients (pre-built
HTTP/1.1 requests on raw sockets: its own cost stays far below the server's) runs for --seconds;
the server's process tree CPU seconds (supervisor and workers) over that phase, minus the
encoder's, divided by the requests answered, is the CPU per request outside the encoder.

The encoder's CPU is measured, not estimated: the server runs with PROMPTFOLIO_ENCODER_THREADS=1,
so ONNX Runtime computes on the batcher's encoder thread only, and the benchmark reads each worker
thread's CPU time from /proc (the service names its threads: pf-encoder, pf-decode-N; the event
loop is the worker's main thread). The table itemises per request: event loop (HTTP, middleware,
multipart/JSON parsing, auth, probing headers, batching, ranking, the JSON answer), decode pool,
encoder, other threads, and BentoML's supervisor process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

TARGET_SINGLE_MS = 1.0  # server CPU outside the encoder per single-image request
TARGET_PER_IMAGE_MS = 0.2  # per image in 32-image requests


def multipart_body(images: list[bytes]) -> tuple[str, bytes]:
    boundary = "pf-cpu-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="i{i}.jpg"\r\n'
             f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(images)]
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def json_body(images: list[bytes]) -> tuple[str, bytes]:
    return "application/json", json.dumps({"images": [base64.b64encode(i).decode() for i in images]}).encode()


def keepalive_request(tenant: str, key: str, content_type: str, body: bytes) -> bytes:
    return (f"POST /v1/tenants/{tenant}/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> tuple[int, bytes]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def one(port: int, raw: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await _exchange(reader, writer, raw)
    finally:
        writer.close()


async def closed_loop(port: int, requests: list[bytes], concurrency: int, seconds: float) -> dict[int, int]:
    """Status counts from `concurrency` keep-alive connections sending back to back for `seconds`."""
    counts: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def client(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                status, _ = await _exchange(reader, writer, requests[i % len(requests)])
                counts[status] = counts.get(status, 0) + 1
                i += concurrency
        finally:
            writer.close()

    await asyncio.gather(*[client(i) for i in range(concurrency)])
    return counts


def cpu_snapshot(root: psutil.Process) -> dict[str, float]:
    """CPU seconds of the server tree by part: supervisor, event loops, decode pool, encoder, other threads."""
    parts = {"supervisor": 0.0, "event loop": 0.0, "decode pool": 0.0, "encoder": 0.0, "other threads": 0.0}
    times = root.cpu_times()
    parts["supervisor"] = times.user + times.system
    for worker in root.children(recursive=True):
        try:
            for thread in worker.threads():
                try:
                    name = Path(f"/proc/{worker.pid}/task/{thread.id}/comm").read_text().strip()
                except OSError:
                    name = ""
                part = ("event loop" if thread.id == worker.pid else "encoder" if name.startswith("pf-encoder")
                        else "decode pool" if name.startswith("pf-decode") else "other threads")
                parts[part] += thread.user_time + thread.system_time
        except psutil.NoSuchProcess:
            pass
    return parts


def measure(server, keys: dict[str, str], images: list[bytes], per_request: int, kind: str,
            concurrency: int, seconds: float) -> dict | None:
    """One closed-loop phase; None when the server does not take this body kind (415/422)."""
    build = multipart_body if kind == "multipart" else json_body
    requests = []
    for i, (tenant, key) in enumerate(keys.items()):
        chosen = [images[(i + j) % len(images)] for j in range(per_request)]
        requests.append(keepalive_request(tenant, key, *build(chosen)))
    status, body = asyncio.run(one(server.port, requests[0]))
    if status != 200:
        print(f"   {kind}, {per_request} image(s): the server answers {status} {body[:120]!r}; skipped", flush=True)
        return None
    asyncio.run(closed_loop(server.port, requests, concurrency, 1.0))  # warm: connections, caches, shapes
    root = psutil.Process(server.proc.pid)
    before, start = cpu_snapshot(root), time.perf_counter()
    counts = asyncio.run(closed_loop(server.port, requests, concurrency, seconds))
    elapsed, after = time.perf_counter() - start, cpu_snapshot(root)
    answered = counts.get(200, 0)
    used = {part: (after[part] - before[part]) * 1000 / max(answered, 1) for part in before}  # ms per request
    total = sum(used.values())
    return {"kind": kind, "images_per_request": per_request, "requests": answered, "statuses": counts,
            "images_per_s": answered * per_request / elapsed, "cpu_ms_per_request": total,
            "encoder_ms_per_request": used["encoder"], "outside_ms_per_request": total - used["encoder"],
            "outside_ms_per_image": (total - used["encoder"]) / per_request, "parts_ms_per_request": used}


def run(model: str = "tiny", workers: tuple[int, ...] = (1, 2), seconds: float = 8.0, concurrency: int = 8,
        tenants: int = 8) -> list[dict]:
    from promptfolio.encoder import load_encoder
    from prompts_store.store import PromptStore
    from serve import CLASS_NAMES, MODELS, jpeg_images
    from service_helpers import Server

    arch, pretrained = MODELS[model]
    encoder = load_encoder(arch, pretrained)
    images = jpeg_images(64, encoder.image_size)
    base = Path(tempfile.mkdtemp(prefix="pf-bench-cpu-"))
    rows: list[dict] = []
    try:
        store = PromptStore(base / "store", encoder.fingerprint, encoder.text_width, create=True)
        keys = {f"t{i:03d}": store.add_tenant(f"t{i:03d}", CLASS_NAMES) for i in range(tenants)}
        for n_workers in workers:
            server = Server(base / "store", base / f"server-{n_workers}.log", PROMPTFOLIO_ARCH=arch,
                            PROMPTFOLIO_PRETRAINED=pretrained or "none", PROMPTFOLIO_MAX_BATCH="32",
                            PROMPTFOLIO_ENCODER_THREADS="1",
                            BENTOML_CONFIG_OPTIONS=f"services.promptfolio.workers={n_workers}").start(timeout=300)
            try:
                cells = [("multipart", 1), ("multipart", 32), ("json", 1), ("json", 32)]
                for kind, per_request in cells if n_workers == workers[0] else cells[:2]:
                    row = measure(server, keys, images, per_request, kind, concurrency, seconds)
                    if row is not None:
                        row["workers"] = n_workers
                        rows.append(row)
                        print_row(row)
            finally:
                server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows


def print_row(row: dict) -> None:
    parts = ", ".join(f"{k} {v:.3f}" for k, v in row["parts_ms_per_request"].items())
    print(f"f. {row['workers']} worker(s), {row['kind']}, {row['images_per_request']} image(s)/request: "
          f"{row['images_per_s']:.0f} images/s; server CPU {row['cpu_ms_per_request']:.3f} ms/request, outside the "
          f"encoder {row['outside_ms_per_request']:.3f} ms/request = {row['outside_ms_per_image']:.3f} ms/image "
          f"({parts}; statuses {row['statuses']})", flush=True)


def print_table(rows: list[dict]) -> None:
    print("\n| workers | body | images/request | images/s | server CPU ms/request | encoder | outside the encoder "
          "ms/request | ms/image | target | event loop | decode pool | other threads | supervisor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["parts_ms_per_request"]
        single = r["images_per_request"] == 1
        target = f"≤ {TARGET_SINGLE_MS} ms/request" if single else f"≤ {TARGET_PER_IMAGE_MS} ms/image"
        met = (r["outside_ms_per_request"] <= TARGET_SINGLE_MS if single
               else r["outside_ms_per_image"] <= TARGET_PER_IMAGE_MS)
        print(f"| {r['workers']} | {r['kind']} | {r['images_per_request']} | {r['images_per_s']:.0f} | "
              f"{r['cpu_ms_per_request']:.3f} | {r['encoder_ms_per_request']:.3f} | {r['outside_ms_per_request']:.3f} | "
              f"{r['outside_ms_per_image']:.3f} | {target}: {'met' if met else 'missed'} | {p['event loop']:.3f} | "
              f"{p['decode pool']:.3f} | {p['other threads']:.3f} | {p['supervisor']:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--seconds", type=float, default=8.0, help="per measured phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = run(args.model, tuple(int(w) for w in args.workers.split(",")), args.seconds, args.concurrency)
    print_table(rows)
    load = psutil.getloadavg()
    print(f"\nload average while measured (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} on "
          f"{psutil.cpu_count()} cores")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
