"""The one prepared check for a machine with an NVIDIA GPU (about 4-6 minutes; at most 8):

    python bench/gpu_check.py                 # needs the project's packages + onnxruntime-gpu
    scripts/gpu-check.sh                      # fresh checkout: makes .cache/gpu-venv with the `gpu` extra, runs this
    python bench/gpu_check.py --dry-run       # the same code paths on the CPU, tiny and short (no GPU verdict)

1. Providers: the ONNX Runtime session really uses CUDAExecutionProvider (session.get_providers(),
   not the available list, which names CUDA even where it cannot run).
2. Parity on L2-normalised image features, against torch fp32 on the GPU:
   - ONNX Runtime CUDA fp32: max abs diff <= 2e-3. Not 1e-5 as on the CPU: both runtimes may use
     TF32 (10-bit mantissa) in convolutions/matmuls on Ampere and later.
   - torch fp16: cosine >= 0.999 for every image and top-1 agreement >= 99% over the class features
     (embedded model, world images, its 30 classes). fp16 rounds at 2^-11 ~ 4.9e-4 relative per
     operation; over 12 residual blocks that stays ~1e-3 on unit vectors, so a cosine below 0.999
     means a real defect (overflow, a layer left in fp32 with fp16 inputs), not rounding. Flips of
     the top-1 are expected only where fp32's own top-2 margin is below that error.
3. Encoder throughput, images/s per batch size: torch fp32, torch fp16, ONNX Runtime CUDA fp32.
4. The service end to end on the GPU: `promptfolio serve` on 127.0.0.1 (PROMPTFOLIO_DEVICE=cuda),
   one tenant, concurrent clients sending 1-image and 32-image multipart requests: images/s,
   p50/p99 latency, and service/raw (raw = the best encoder images/s of step 3 for the backend the
   service reports in /v1/info).
Exits 1 when a check fails, 2 on bad arguments. Prints one PASS/FAIL line per check.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

ORT_FP32_TOL = 2e-3
FP16_MIN_COSINE = 0.999
FP16_MIN_TOP1 = 0.99


@dataclass
class Plan:
    device: str  # "cuda" (the check) or "cpu" (dry run)
    arch: str  # encoder for throughput and the service
    batches: list[int]
    seconds: float  # per throughput cell
    requests: int  # per request size, service load
    concurrency: int
    parity_images: int
    service_backend: str  # PROMPTFOLIO_BACKEND for the service: auto | onnx | torch


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights), or 'embedded'")
    p.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes for the throughput table")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput cell")
    p.add_argument("--requests", type=int, default=400, help="requests per size (1 and 32 images) for the service")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients for the service")
    p.add_argument("--service-backend", choices=("auto", "onnx", "torch"), default="auto",
                   help="the service's image backend (torch where only the CPU onnxruntime is installed)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step on the CPU with the embedded model and tiny sizes (checks the script only)")
    a = p.parse_args(argv)
    try:
        batches = [int(v) for v in a.batches.split(",") if v.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    if not batches or min(batches) < 1 or a.seconds <= 0 or a.requests < 1 or a.concurrency < 1:
        p.error("--batches, --seconds, --requests and --concurrency must be positive")
    if a.dry_run:
        return Plan("cpu", "embedded", [1, 8], 0.3, 8, 2, 16, a.service_backend)
    return Plan("cuda", a.arch, batches, a.seconds, a.requests, a.concurrency, 256, a.service_backend)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def throughput(fn, batch: int, size: int, seconds: float, device: str, half: bool = False) -> float:
    import torch

    x = torch.randn(batch, 3, size, size, device=device, dtype=torch.half if half else torch.float32)
    for _ in range(3):
        fn(x)
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += batch
    sync(device)
    return n / (time.perf_counter() - start)


def report(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    return ok


def check_providers(backend, plan: Plan) -> bool:
    used = backend.session.get_providers()
    print(f"1. ONNX Runtime providers in use: {used}")
    if plan.device == "cpu":
        return report(used[0] == "CPUExecutionProvider", "dry run: the CPU provider")
    return report(used[0] == "CUDAExecutionProvider", "CUDAExecutionProvider is the session's first provider")


def check_parity(plan: Plan, enc, backend) -> bool:
    """ONNX fp32 vs torch fp32 on `plan.arch`; torch fp16 vs fp32 on the embedded model with world images."""
    import torch
    import torch.nn.functional as F

    from promptfolio.embedded import world
    from promptfolio.encoder import load_encoder
    from promptfolio.prompts import encode_classes, init_context

    x = torch.randn(16, 3, enc.image_size, enc.image_size, device=plan.device)
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(x).float(), dim=-1).cpu()
    diff = (backend(x) - ref).abs().max().item()
    print(f"2a. {plan.arch}: ONNX Runtime vs torch, fp32, batch 16: max abs diff {diff:.2e}")
    ok = report(diff <= ORT_FP32_TOL, f"ONNX Runtime fp32 parity <= {ORT_FP32_TOL:g}")

    tiny = load_encoder("embedded", "embedded", device=plan.device)
    images, _ = world.task_dataset(plan.parity_images, world.calibrated("noise"), seed=7)
    from PIL import Image

    batch = torch.stack([tiny.preprocess(Image.fromarray(im)) for im in images]).to(plan.device)
    with torch.no_grad():
        text = encode_classes(tiny, init_context(tiny, phrase="a photo of a"), list(world.CLASS_NAMES)).float()
        f32 = F.normalize(tiny.model.encode_image(batch).float(), dim=-1)
        half = load_encoder("embedded", "embedded", device=plan.device).model.half()
        f16 = F.normalize(half.encode_image(batch.half()).float(), dim=-1)
    cos = (f32 * f16).sum(-1)
    s32, s16 = f32 @ text.T, f16 @ text.T
    agree = (s32.argmax(-1) == s16.argmax(-1)).float().mean().item()
    top2 = s32.topk(2, dim=-1).values
    flips = s32.argmax(-1) != s16.argmax(-1)
    margins = (top2[:, 0] - top2[:, 1])[flips]
    print(f"2b. embedded, torch fp16 vs fp32 on {len(images)} world images: min cosine {cos.min().item():.5f}, "
          f"max abs diff {(f32 - f16).abs().max().item():.2e}, top-1 agreement {agree:.4f}"
          + (f" (fp32 top-2 margins of the flips: max {margins.max().item():.2e})" if flips.any() else ""))
    if plan.device == "cpu":
        return report(ok, "dry run: parity computed (fp16 on the CPU is not a verdict)")
    ok &= report(cos.min().item() >= FP16_MIN_COSINE, f"fp16 cosine >= {FP16_MIN_COSINE}")
    return ok & report(agree >= FP16_MIN_TOP1, f"fp16 top-1 agreement >= {FP16_MIN_TOP1:.0%}")


def throughput_table(plan: Plan, enc, backend) -> dict[str, float]:
    import torch

    from promptfolio.encoder import load_encoder

    half = load_encoder(plan.arch, "embedded" if plan.arch == "embedded" else None, device=plan.device).model.half()

    def torch32(t):
        with torch.no_grad():
            return enc.model.encode_image(t)

    def torch16(t):
        with torch.no_grad():
            return half.encode_image(t)

    print(f"3. {plan.arch} encoder, images/s ({plan.seconds:g} s per cell)")
    print("| batch | torch fp32 | torch fp16 | onnxruntime fp32 |\n|---|---|---|---|")
    best = {"torch": 0.0, "onnxruntime": 0.0}
    for b in plan.batches:
        cells = [throughput(torch32, b, enc.image_size, plan.seconds, plan.device),
                 throughput(torch16, b, enc.image_size, plan.seconds, plan.device, half=True),
                 throughput(backend, b, enc.image_size, plan.seconds, plan.device)]
        best["torch"] = max(best["torch"], cells[0])
        best["onnxruntime"] = max(best["onnxruntime"], cells[2])
        print(f"| {b} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    return best


async def load(url: str, key: str, images: list[bytes], per_request: int, requests: int,
               concurrency: int) -> tuple[float, list[float], int]:
    """Concurrent clients; returns (images/s, latencies of the successful requests, failed requests)."""
    import httpx

    latencies: list[float] = []
    failed = 0
    counter = iter(range(requests))

    async with httpx.AsyncClient(timeout=120) as client:
        async def worker():
            nonlocal failed
            for i in counter:
                files = [("images", (f"{i}-{j}.jpg", images[(i + j) % len(images)], "image/jpeg"))
                         for j in range(per_request)]
                start = time.perf_counter()
                r = await client.post(f"{url}/v1/tenants/check/classify", headers={"Authorization": f"Bearer {key}"},
                                      files=files)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failed += 1

        start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        elapsed = time.perf_counter() - start
    return len(latencies) * per_request / elapsed, latencies, failed


def check_service(plan: Plan, best: dict[str, float], base: Path) -> bool:
    import httpx
    import numpy as np

    from promptfolio.embedded import world
    from service_helpers import ADMIN_KEY, Server

    pretrained = "embedded" if plan.arch == "embedded" else "none"
    server = Server(base / "store", base / "serve.log", PROMPTFOLIO_ARCH=plan.arch, PROMPTFOLIO_PRETRAINED=pretrained,
                    PROMPTFOLIO_DEVICE=plan.device, PROMPTFOLIO_MAX_BATCH="32",
                    PROMPTFOLIO_BACKEND=plan.service_backend)
    start = time.perf_counter()
    server.start(timeout=420)
    ok = True
    try:
        info = httpx.get(f"{server.url}/v1/info", timeout=30).json()
        print(f"4. service ready in {time.perf_counter() - start:.1f} s: device {info['device']}, "
              f"backend {info['backend']}, providers {info['providers']}")
        if plan.device == "cuda":
            ok &= report(info["device"].startswith("cuda"), "the service's encoder is on the GPU")
        r = httpx.post(f"{server.url}/v1/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                       json={"id": "check", "classes": list(world.CLASS_NAMES)}, timeout=120)
        if r.status_code != 201:
            return report(False, f"register a tenant: HTTP {r.status_code} {r.text[:200]}")
        key = r.json()["api_key"]
        from serve import jpeg_images  # bench/serve.py: the same noise-style JPEGs as the serving benchmark

        images = jpeg_images(64, info["image_size"])
        raw = best.get(info["backend"], 0.0)
        print("| images/request | requests | images/s | p50 ms | p99 ms | service/raw |\n|---|---|---|---|---|---|")
        for per_request in (1, 32):
            asyncio.run(load(server.url, key, images, per_request, plan.concurrency, plan.concurrency))  # warm-up
            rate, lat, failed = asyncio.run(load(server.url, key, images, per_request, plan.requests,
                                                 plan.concurrency))
            ms = np.percentile(lat, [50, 99]) * 1000 if lat else [float("nan")] * 2
            ratio = rate / raw if raw else float("nan")
            print(f"| {per_request} | {plan.requests} | {rate:.0f} | {ms[0]:.1f} | {ms[1]:.1f} | {ratio:.2f} |",
                  flush=True)
            ok &= report(failed == 0, f"{per_request}-image requests: {failed} failed")
    finally:
        server.stop()
    return ok


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    t0 = time.perf_counter()
    import torch

    from promptfolio.encoder import load_encoder
    from service.backends import OnnxImageBackend

    if plan.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device (use --dry-run to check the script on the CPU)")
        return 1
    import onnxruntime as ort

    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "CPU (dry run: no GPU verdict)"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); onnxruntime {ort.__version__}, "
          f"available providers {ort.get_available_providers()}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    enc = load_encoder(plan.arch, "embedded" if plan.arch == "embedded" else None, device=plan.device)
    backend = OnnxImageBackend(enc, base / "onnx", providers="cuda,cpu" if plan.device == "cuda" else "cpu")
    ok = check_providers(backend, plan)
    ok &= check_parity(plan, enc, backend)
    best = throughput_table(plan, enc, backend)
    ok &= check_service(plan, best, base)
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s; logs and store in {base})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
