"""The one prepared check for a machine with an NVIDIA GPU (about 4-6 minutes; at most 8):

    scripts/gpu-check.sh                      # fresh checkout: makes .cache/gpu-venv with the `gpu` extra, runs this
    python bench/gpu_check.py                 # in an environment with the project and onnxruntime-gpu
    python bench/gpu_check.py --dry-run       # the same code on the CPU, tiny sizes (checks the script; no GPU verdict)

1. Devices: every ONNX Runtime session really uses CUDAExecutionProvider (session.get_providers(),
   not the available list, which names CUDA even where it cannot run), and the torch models and
   their outputs are on CUDA.
2. Parity against torch fp32 on the GPU, on L2-normalised image features:
   - ONNX Runtime fp32: max abs diff <= 2e-3. Not 1e-5 as on the CPU: both runtimes may use TF32
     (10-bit mantissa, ~1e-3 relative) in matmuls/convolutions on Ampere and later.
   - fp16 (torch half, ONNX Runtime fp16 export): cosine >= 0.999 for every image, and on the
     embedded model with its world images and 30 classes, top-1 agreement >= 99%. Why these
     bounds: fp16 keeps 11 significant bits (unit roundoff 2^-11 ~ 4.9e-4, ~3 decimal digits);
     errors of that size per operation, through 12 residual blocks with LayerNorm re-centring,
     leave ~1e-3 relative error on the feature vector, i.e. cosine ~1 - 5e-7; a cosine under
     0.999 (relative error ~4.5e-2) is a real defect (overflow, a layer fed fp16 it cannot take),
     not rounding. CLIP scores are 100 * cosine, so a feature error e moves an image's score gap
     between two classes by at most 100 * e * |t_a - t_b| <= 200 * e: a top-1 flips only where
     fp32's own top-2 gap is that small, which the check prints for every flip.
3. Encoder throughput, images/s per batch size, for torch and ONNX Runtime in fp32 and fp16 (inputs
   on the GPU, features back on the CPU, as the service uses them), and which backend the service's
   `auto` picks at batch 32 (the same timing code it runs at start).
4. JPEG decoding: images/s of the CPU path (PIL with reduced-size decode + the preprocess; one
   thread and all cores) and of the batched GPU path (nvJPEG through torchvision + resize/normalise
   on the GPU); which JPEG kinds nvJPEG takes (baseline, progressive, grey, EXIF-rotated; CMYK goes
   to the CPU by design), and how close each path's features are to training's loader (a full
   decode, as the batched decoder does; the CPU path decodes JPEGs at reduced size).
5. The service end to end on the GPU: `promptfolio serve` on 127.0.0.1 with the defaults
   (precision auto = fp16, backend auto, GPU decode auto), then with GPU decode off; concurrent
   clients send 1-image and 32-image multipart requests of 640x480 JPEGs: images/s, p50/p99 and
   service/raw (raw = step 3's batch-32 images/s of the backend and precision /v1/info reports).
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
sys.path.insert(0, str(REPO / "bench"))

ORT_FP32_TOL = 2e-3
FP16_MIN_COSINE = 0.999
FP16_MIN_TOP1 = 0.99
BUDGET_S = 480  # the whole check; the optional second service run is skipped when it would not fit


@dataclass
class Plan:
    device: str  # "cuda" (the check) or "cpu" (dry run)
    arch: str  # encoder for throughput and the service
    batches: list[int]
    seconds: float  # per throughput cell
    requests: int  # per request size, service load
    concurrency: int
    parity_images: int
    decode_images: int
    onnxruntime: bool = True  # False: torch only (a host whose onnxruntime has no CUDA provider)
    profile: Path | None = None  # py-spy profiles of the server go here


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random weights), or 'embedded'")
    p.add_argument("--batches", default="1,8,32,128", help="comma-separated batch sizes for the throughput table")
    p.add_argument("--seconds", type=float, default=1.5, help="seconds per throughput cell")
    p.add_argument("--requests", type=int, default=300, help="requests per size (1 and 32 images) and service run")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients for the service")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="encoder backends to check: 'torch,onnxruntime' or 'torch' (for a host whose "
                        "onnxruntime is the CPU build; the service then runs with PROMPTFOLIO_BACKEND=torch)")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write a py-spy profile of the server under the 1-image load into DIR (needs py-spy)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step on the CPU with the embedded model and tiny sizes (checks the script only)")
    a = p.parse_args(argv)
    try:
        batches = [int(v) for v in a.batches.split(",") if v.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    if not batches or min(batches) < 1 or a.seconds <= 0 or a.requests < 1 or a.concurrency < 1:
        p.error("--batches, --seconds, --requests and --concurrency must be positive")
    chosen = {v.strip() for v in a.backends.split(",") if v.strip()}
    if "torch" not in chosen or not chosen <= {"torch", "onnxruntime"}:
        p.error(f"--backends must be 'torch,onnxruntime' or 'torch', got {a.backends!r}")
    ort = "onnxruntime" in chosen
    if a.dry_run:
        return Plan("cpu", "embedded", [1, 4], 0.2, 6, 2, 32, 16, ort, a.profile)
    return Plan("cuda", a.arch, batches, a.seconds, a.requests, a.concurrency, 256, 256, ort, a.profile)


def report(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    return ok


def build_backends(plan: Plan, enc, base: Path) -> dict[str, object]:
    """torch and ONNX Runtime, fp32 and fp16, on the plan's device."""
    from service.backends import OnnxImageBackend, TorchImageBackend

    providers = "cuda,cpu" if plan.device == "cuda" else "cpu"
    built = {"torch fp32": TorchImageBackend(enc, "fp32"), "torch fp16": TorchImageBackend(enc, "fp16")}
    if plan.onnxruntime:
        built["onnxruntime fp32"] = OnnxImageBackend(enc, base / "onnx", providers, precision="fp32")
        built["onnxruntime fp16"] = OnnxImageBackend(enc, base / "onnx", providers, precision="fp16")
    return built


def check_devices(plan: Plan, backends: dict) -> bool:
    import torch

    want = "CUDAExecutionProvider" if plan.device == "cuda" else "CPUExecutionProvider"
    ok = True
    for name in [n for n in backends if n.startswith("onnxruntime")]:
        used = backends[name].session.get_providers()
        ok &= report(used[0] == want, f"1. {name}: session providers {used}")
    half = backends["torch fp16"]
    x = torch.randn(2, 3, half.encoder.image_size, half.encoder.image_size, device=plan.device)
    with torch.no_grad():
        out = half.visual(x.half())
    where = {str(next(half.visual.parameters()).device), str(half.encoder.device), str(out.device)}
    return ok & report(all(w.startswith(plan.device) for w in where) and out.dtype == torch.float16,
                       f"1. torch: weights, fp32 encoder and fp16 output on {sorted(where)} ({out.dtype})")


def parity_row(name: str, feats, ref, text=None) -> tuple[float, float, float | None, str]:
    cos = (feats * ref).sum(-1)
    diff = (feats - ref).abs().max().item()
    agree, note = None, ""
    if text is not None:
        s_ref, s_new = ref @ text.T, feats @ text.T
        flips = s_ref.argmax(-1) != s_new.argmax(-1)
        agree = 1 - flips.float().mean().item()
        if flips.any():
            top2 = s_ref.topk(2, dim=-1).values
            note = f"; fp32 top-2 gaps of the {int(flips.sum())} flips: max {(top2[:, 0] - top2[:, 1])[flips].max():.2e}"
    print(f"   {name}: min cosine {cos.min().item():.6f}, max abs diff {diff:.2e}"
          + (f", top-1 agreement {agree:.4f}" if agree is not None else "") + note)
    return cos.min().item(), diff, agree, note


def check_parity(plan: Plan, enc, backends: dict) -> bool:
    """Every backend against torch fp32: random inputs on `plan.arch`, world images on the embedded model."""
    import torch
    from PIL import Image

    from promptfolio.embedded import world
    from promptfolio.encoder import load_encoder
    from promptfolio.prompts import encode_classes, init_context
    from service.backends import OnnxImageBackend, TorchImageBackend

    verdict = plan.device == "cuda"
    ok = True
    x = torch.randn(16, 3, enc.image_size, enc.image_size, device=plan.device)
    ref = backends["torch fp32"](x)
    print(f"2a. {plan.arch}, random inputs, batch 16, against torch fp32:")
    for name in [n for n in ("onnxruntime fp32", "torch fp16", "onnxruntime fp16") if n in backends]:
        cos, diff, _, _ = parity_row(name, backends[name](x), ref)
        if verdict:
            ok &= report(diff <= ORT_FP32_TOL if "fp32" in name else cos >= FP16_MIN_COSINE,
                         f"{name}: " + (f"max abs diff <= {ORT_FP32_TOL:g}" if "fp32" in name
                                        else f"cosine >= {FP16_MIN_COSINE}"))

    tiny = load_encoder("embedded", "embedded", device=plan.device)
    images, _ = world.task_dataset(plan.parity_images, world.calibrated("noise"), seed=7)
    batch = torch.stack([tiny.preprocess(Image.fromarray(im)) for im in images]).to(plan.device)
    with torch.no_grad():
        text = encode_classes(tiny, init_context(tiny, phrase="a photo of a"), list(world.CLASS_NAMES)).float().cpu()
    ref = TorchImageBackend(tiny, "fp32")(batch)
    print(f"2b. embedded, {len(images)} world images, {len(world.CLASS_NAMES)} classes, against torch fp32:")
    halves = [("torch fp16", TorchImageBackend(tiny, "fp16"))]
    if plan.onnxruntime:
        providers = "cuda,cpu" if plan.device == "cuda" else "cpu"
        onnx_dir = backends["onnxruntime fp32"].path.parent.parent
        halves.append(("onnxruntime fp16", OnnxImageBackend(tiny, onnx_dir, providers, precision="fp16")))
    for name, backend in halves:
        cos, _, agree, _ = parity_row(name, backend(batch), ref, text)
        if verdict:
            ok &= report(cos >= FP16_MIN_COSINE and agree >= FP16_MIN_TOP1,
                         f"{name}: cosine >= {FP16_MIN_COSINE} and top-1 agreement >= {FP16_MIN_TOP1:.0%}")
    if not verdict:
        ok &= report(True, "2. dry run: parity computed (fp16 on the CPU is no verdict for the GPU)")
    return ok


def throughput(backend, batch: int, size: int, seconds: float, device: str) -> float:
    import torch

    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(3):
        backend(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        backend(x)  # features come back to the CPU: each call has finished on the device
        n += batch
    return n / (time.perf_counter() - start)


def throughput_table(plan: Plan, enc, backends: dict) -> dict[str, float]:
    """images/s per backend and batch; returns each backend's batch-32 rate (or its best)."""
    from service.backends import fastest

    names = list(backends)
    print(f"3. {plan.arch} encoder, images/s ({plan.seconds:g} s per cell; inputs on {plan.device})")
    print("| batch | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    rates: dict[str, dict[int, float]] = {n: {} for n in names}
    for b in plan.batches:
        for n in names:
            rates[n][b] = throughput(backends[n], b, enc.image_size, plan.seconds, plan.device)
        print(f"| {b} | " + " | ".join(f"{rates[n][b]:.0f}" for n in names) + " |", flush=True)
    probe = 32 if 32 in plan.batches else max(plan.batches)
    for precision in ("fp32", "fp16") if plan.onnxruntime else ():
        pick = fastest([backends[f"onnxruntime {precision}"], backends[f"torch {precision}"]], probe,
                       enc.image_size, plan.device)
        print(f"   service backend auto at {precision}, batch {probe}: picks {pick.name}")
    return {n: r.get(32, max(r.values())) for n, r in rates.items()}


async def load(port: int, raw: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float], dict]:
    """Concurrent clients sending pre-built requests (bench/overload.py's raw sockets: an httpx
    client in this process costs more CPU per request than the server); returns (requests/s
    answered 200, their latencies, a count of every other outcome by status or failure)."""
    from overload import send

    latencies: list[float] = []
    other: dict = {}
    counter = iter(range(requests))

    async def worker():
        for i in counter:
            status, seconds, _ = await send(port, raw[i % len(raw)])
            if status == 200:
                latencies.append(seconds)
            else:
                other[status] = other.get(status, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return len(latencies) / (time.perf_counter() - start), latencies, other


class Profile:
    """`py-spy record` of the server (all its processes) while the 1-image load runs, in py-spy's
    raw format (collapsed stacks, one line per stack with its sample count): where a request's time
    goes on this machine. Nothing when py-spy is not on PATH."""

    def __init__(self, out: Path):
        self.out = out
        self.proc = None

    def start(self, server, label: str) -> None:
        import shutil
        import subprocess

        exe = shutil.which("py-spy")
        if exe is None:
            print("   no py-spy on PATH: no profile")
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "record", "--subprocesses", "--nonblocking", "--rate", "200", "--format", "raw",
             "--pid", str(server.proc.pid), "-o", str(self.out / f"profile-{label}.txt")],
            stdout=subprocess.DEVNULL, stderr=open(self.out / f"py-spy-{label}.log", "wb"))

    def stop(self) -> None:
        import signal

        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
            self.proc.wait(60)
            self.proc = None


def run_service(plan: Plan, base: Path, label: str, env: dict[str, str], raw: dict[str, float],
                profile: Profile | None = None) -> bool:
    """One server with `env`; 1-image and 32-image request loads; a table row per size. The
    admission deadline is 30 s: this measures throughput at full concurrency, not shedding."""
    import httpx
    import numpy as np

    from promptfolio.embedded import world
    from service_helpers import ADMIN_KEY, Server

    pretrained = "embedded" if plan.arch == "embedded" else "none"
    slug = label.replace(" ", "-")
    server = Server(base / f"store-{slug}", base / f"serve-{slug}.log", PROMPTFOLIO_ARCH=plan.arch,
                    PROMPTFOLIO_PRETRAINED=pretrained, PROMPTFOLIO_DEVICE=plan.device, PROMPTFOLIO_MAX_BATCH="32",
                    PROMPTFOLIO_ADMISSION_DEADLINE_S="30", **env)
    start = time.perf_counter()
    server.start(timeout=240)
    ok = True
    try:
        info = httpx.get(f"{server.url}/v1/info", timeout=30).json()
        print(f"5. service ({label}) ready in {time.perf_counter() - start:.1f} s: device {info['device']}, "
              f"backend {info['backend']} {info['precision']}, providers {info['providers']}, "
              f"GPU decode {info['gpu_decode']}")
        if plan.device == "cuda":
            on_gpu = info["device"].startswith("cuda") and (info["backend"] == "torch"
                                                            or info["providers"][0] == "CUDAExecutionProvider")
            ok &= report(on_gpu, f"5. {label}: the service's encoder runs on the GPU")
        for field in ("tenant", "id"):  # the REST contract's name; "id" for servers from before it
            r = httpx.post(f"{server.url}/v1/tenants", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           json={field: "check", "classes": list(world.CLASS_NAMES)}, timeout=120)
            if r.status_code != 422:
                break
        if r.status_code != 201:
            return report(False, f"register a tenant: HTTP {r.status_code} {r.text[:200]}")
        key = r.json()["api_key"]
        from gpu_check_decode import photo_jpegs
        from overload import multipart, request_bytes

        images = photo_jpegs(64)
        ref = raw.get(f"{info['backend']} {info['precision']}", 0.0)
        port = int(server.url.rsplit(":", 1)[1])
        print("| images/request | requests | images/s | p50 ms | p99 ms | service/raw |\n|---|---|---|---|---|---|")
        for per_request in (1, 32):
            prebuilt = [request_bytes("/v1/tenants/check/classify", key, *multipart(
                [images[(i + j) % len(images)] for j in range(per_request)], kind="jpeg")) for i in range(64)]
            asyncio.run(load(port, prebuilt, plan.concurrency, plan.concurrency))  # warm-up
            if per_request == 1 and profile is not None:
                profile.start(server, slug)
            rps, lat, other = asyncio.run(load(port, prebuilt, plan.requests, plan.concurrency))
            if per_request == 1 and profile is not None:
                profile.stop()
            ms = np.percentile(lat, [50, 99]) * 1000 if lat else [float("nan")] * 2
            speed = rps * per_request
            print(f"| {per_request} | {plan.requests} | {speed:.0f} | {ms[0]:.1f} | {ms[1]:.1f} | "
                  f"{speed / ref if ref else float('nan'):.2f} |", flush=True)
            ok &= report(not other, f"5. {label}, {per_request}-image requests: all answered 200"
                         + (f" (not: {other})" if other else ""))
    finally:
        server.stop()
    return ok


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    t0 = time.perf_counter()
    import torch

    from gpu_check_decode import check_decode
    from promptfolio.encoder import load_encoder

    if plan.device == "cuda" and not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device (use --dry-run to check the script on the CPU)")
        return 1
    import onnxruntime as ort

    name = torch.cuda.get_device_name(0) if plan.device == "cuda" else "CPU (dry run: no GPU verdict)"
    print(f"device: {name}; torch {torch.__version__} (CUDA {torch.version.cuda}); onnxruntime {ort.__version__}, "
          f"available providers {ort.get_available_providers()}"
          + ("" if plan.onnxruntime else "; --backends torch: ONNX Runtime NOT checked"), flush=True)
    base = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    torch.manual_seed(0)
    enc = load_encoder(plan.arch, "embedded" if plan.arch == "embedded" else None, device=plan.device)
    backends = build_backends(plan, enc, base)
    ok = check_devices(plan, backends)
    ok &= check_parity(plan, enc, backends)
    raw = throughput_table(plan, enc, backends)
    ok &= check_decode(plan, enc)
    del backends
    if plan.device == "cuda":
        print(f"   peak torch GPU memory in this process: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        torch.cuda.empty_cache()
    # the dry run forces the GPU path's code (fp16, batched decode) onto the CPU
    forced = {} if plan.device == "cuda" else {"PROMPTFOLIO_PRECISION": "fp16", "PROMPTFOLIO_GPU_DECODE": "on"}
    if not plan.onnxruntime:
        forced["PROMPTFOLIO_BACKEND"] = "torch"
    profile = Profile(plan.profile) if plan.profile is not None else None
    ok &= run_service(plan, base, "defaults", forced, raw, profile)
    if plan.device == "cuda" and time.perf_counter() - t0 > BUDGET_S - 120:
        print(f"   skipped the service with GPU decode off: {time.perf_counter() - t0:.0f} s spent of {BUDGET_S} s")
    elif plan.device == "cuda":  # the CPU decode path is the one every CPU test already serves
        ok &= run_service(plan, base, "CPU decode", {**forced, "PROMPTFOLIO_GPU_DECODE": "off"}, raw, profile)
    print(f"{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s; logs and stores in {base})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
