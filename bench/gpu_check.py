"""GPU check in one prepared script (a few minutes on one NVIDIA GPU):

    python bench/gpu_check.py [--arch ViT-B-32] [--seconds 5]

1. CUDAExecutionProvider is really used by the ONNX Runtime session (session.get_providers()).
2. Parity of the ONNX image encoder against torch on the GPU (fp32, max abs diff <= 1e-4).
3. Throughput table, images/s: torch fp32, torch fp16, ONNX Runtime CUDA fp32, per batch size.
Exits non-zero when a check fails. Needs onnxruntime-gpu (not the CPU onnxruntime) and a CUDA torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from promptfolio.encoder import load_encoder  # noqa: E402
from service.backends import OnnxImageBackend  # noqa: E402


def throughput(fn, batch: int, size: int, seconds: float, dtype=torch.float32) -> float:
    x = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype)
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += batch
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batches", default="1,8,32,128")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL: torch sees no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; available providers {ort.get_available_providers()}")
    enc = load_encoder(args.arch, None, device="cuda")
    size = enc.image_size
    ok = True
    backend = OnnxImageBackend(enc, Path(tempfile.mkdtemp()), providers="cuda,cpu")
    used = backend.session.get_providers()
    print(f"1. providers in use: {used}")
    if used[0] != "CUDAExecutionProvider":
        print("FAIL: CUDAExecutionProvider is not the session's first provider")
        ok = False
    x = torch.randn(16, 3, size, size, device="cuda")
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(x).float(), dim=-1).cpu()
    diff = (backend(x) - ref).abs().max().item()
    print(f"2. parity ONNX Runtime vs torch (fp32, batch 16): max abs diff {diff:.2e}")
    if diff > 1e-4:
        print("FAIL: parity above 1e-4")
        ok = False
    half = load_encoder(args.arch, None, device="cuda").model.half()

    def torch32(t):
        with torch.no_grad():
            return enc.model.encode_image(t)

    def torch16(t):
        with torch.no_grad():
            return half.encode_image(t)

    print(f"3. {args.arch} images/s ({args.seconds:.0f} s per cell)")
    print("| batch | torch fp32 | torch fp16 | onnxruntime CUDA fp32 |\n|---|---|---|---|")
    for b in (int(v) for v in args.batches.split(",")):
        cells = [throughput(torch32, b, size, args.seconds), throughput(torch16, b, size, args.seconds, torch.half),
                 throughput(lambda t: backend(t), b, size, args.seconds)]
        print(f"| {b} | " + " | ".join(f"{c:.0f}" for c in cells) + " |", flush=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
