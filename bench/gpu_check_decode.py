"""bench/gpu_check.py step 4: JPEG decoding on the CPU path and the batched (nvJPEG) path.

Throughput of both, which JPEG kinds the batched decoder takes, and each path's distance to
training's loader. Run through bench/gpu_check.py (the dry run runs it on the CPU).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gpu_check import Plan


def report(ok: bool, what: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'}: {what}", flush=True)
    return ok


def photo_jpegs(n: int, size: tuple[int, int] = (640, 480), seed: int = 5) -> list[bytes]:
    """World images scaled to photo size (640x480 by default) as quality-90 JPEGs."""
    import io

    from PIL import Image

    from promptfolio.embedded import world

    images, _ = world.task_dataset(n, world.calibrated("noise"), seed=seed)
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def jpeg_kinds() -> dict[str, bytes]:
    """One JPEG of each kind the GPU decoder may meet."""
    import io

    from PIL import Image

    base = Image.open(io.BytesIO(photo_jpegs(1, seed=9)[0]))
    kinds = {}
    for name, img, save in (("baseline", base, {}), ("progressive", base, {"progressive": True}),
                            ("grey", base.convert("L"), {}), ("cmyk", base.convert("CMYK"), {}),
                            ("4:4:4", base, {"subsampling": 0}), ("exif-rotated", base, {"exif": _exif(6)})):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90, **save)
        kinds[name] = buf.getvalue()
    kinds["truncated"] = kinds["baseline"][: len(kinds["baseline"]) // 2]
    return kinds


def _exif(orientation: int):
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def rate(fn, count: int, seconds: float) -> float:
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += count
    return n / (time.perf_counter() - start)


def check_decode(plan: Plan, enc) -> bool:
    """CPU vs GPU JPEG decode throughput; which kinds nvJPEG takes; parity with training's loader."""
    import asyncio
    import os
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from service import images as image_io
    from service.batcher import FairPool
    from service.gpu_decode import GpuJpegDecoder, PreprocessSpec, exif_orientation

    limits = image_io.ImageLimits(40_000_000, 16_000_000, 16384, 20.0, 4_000_000, enc.image_size)
    decoder = GpuJpegDecoder(PreprocessSpec.from_transform(enc.preprocess), plan.device, 16_000_000)
    jpegs = photo_jpegs(plan.decode_images)

    def cpu_one(data: bytes) -> torch.Tensor:
        return image_io.decode_probed(image_io.probe(data, "x.jpg", limits), enc.preprocess, enc.image_size)

    def gpu_batch(batch: list[bytes]) -> None:
        probed = [image_io.probe(d, "x.jpg", limits) for d in batch]
        decoder.decode_batch(batch, [exif_orientation(p) for p in probed])
        if plan.device == "cuda":
            torch.cuda.synchronize()

    threads = os.cpu_count() or 1
    with ThreadPoolExecutor(threads) as pool:
        rows = {"CPU, 1 thread": rate(lambda: [cpu_one(d) for d in jpegs[:32]], 32, plan.seconds),
                f"CPU, {threads} threads": rate(lambda: list(pool.map(cpu_one, jpegs)), len(jpegs), plan.seconds)}
    for b in (1, 32):
        rows[f"{plan.device} batched, {b} per call"] = rate(lambda: gpu_batch(jpegs[:b]), b, plan.seconds)
    print(f"4. JPEG 640x480 -> {enc.image_size}x{enc.image_size} model input, images/s (probe included)")
    print("| decoder | images/s |\n|---|---|\n" + "\n".join(f"| {k} | {v:.0f} |" for k, v in rows.items()))

    fair = FairPool(2)
    ok, paths = True, {}
    for name, data in jpeg_kinds().items():
        before = (decoder.decoded, decoder.refused)
        try:
            probed = [image_io.probe(data, name, limits)]
            asyncio.run(decoder.decode(fair, "k", [(data, name)], probed, enc.preprocess, enc.image_size))
            paths[name] = "GPU decoder" if decoder.decoded > before[0] else (
                "CPU (refused by the GPU decoder)" if decoder.refused > before[1] else "CPU (by design)")
        except image_io.ImageError as e:
            paths[name] = f"HTTP {e.status} (refused by both)"
    fair.close()
    print("   " + "; ".join(f"{k}: {v}" for k, v in paths.items()))
    ok &= report(paths["baseline"] == "GPU decoder", "4. a baseline JPEG is decoded by the batched decoder")
    ok &= report(paths["truncated"].startswith("HTTP 400"), "4. a truncated JPEG is refused (400), never served")

    return ok & decode_parity(plan, enc, decoder, jpegs[:32], cpu_one)


def decode_parity(plan: Plan, enc, decoder, sample: list[bytes], cpu_one) -> bool:
    """The batched decoder and the service's CPU path against training's loader (a full decode)."""
    import torch
    import torch.nn.functional as F

    from promptfolio.images import load_image
    from service import images as image_io
    from service.gpu_decode import exif_orientation

    limits = image_io.ImageLimits(40_000_000, 16_000_000, 16384, 20.0, 4_000_000, enc.image_size)
    probed = [image_io.probe(d, "x.jpg", limits) for d in sample]
    inputs = {"batched decoder": torch.stack(decoder.decode_batch(sample, [exif_orientation(p) for p in probed])),
              "service CPU path": torch.stack([cpu_one(d) for d in sample]),
              "training loader": torch.stack([enc.preprocess(load_image(d)) for d in sample])}
    with torch.no_grad():
        feats = {k: F.normalize(enc.model.encode_image(v.to(plan.device)).float(), dim=-1) for k, v in inputs.items()}
    train = inputs["training loader"].to(plan.device)
    cos = {}
    for name in ("batched decoder", "service CPU path"):
        cos[name] = (feats[name] * feats["training loader"]).sum(-1).min().item()
        print(f"   {name} vs training's loader (full decode), {len(sample)} JPEGs: mean abs input diff "
              f"{(inputs[name].to(plan.device) - train).abs().mean():.4f} (normalised units), "
              f"min feature cosine {cos[name]:.5f}")
    # nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo's by a grey level; the CPU path
    # (reduced-size decode) is further from training's pixels than that
    return report(cos["batched decoder"] >= 0.999, "4. the batched decoder gives training's features (cosine >= 0.999)")
