"""The GPU serving path's code, run on the CPU: fp16 encoders against fp32, and the batched
torchvision JPEG decoder (nvJPEG's code path with device="cpu") against the PIL decode path.
What only a GPU can show (CUDA provider, speed, nvJPEG itself) is bench/gpu_check.py's job."""

import asyncio
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError

from promptfolio.embedded import world
from promptfolio.images import load_image
from promptfolio.prompts import encode_classes, init_context
from service import images as image_io
from service.backends import BackendError, OnnxImageBackend, TorchImageBackend, make_backend
from service.batcher import FairPool
from service.config import ServiceConfig
from service.gpu_decode import GpuJpegDecoder, PreprocessSpec, make_decoder


def world_batch(encoder, n: int) -> torch.Tensor:
    images, _ = world.task_dataset(n, world.calibrated("noise"), seed=3)
    return torch.stack([encoder.preprocess(Image.fromarray(im)) for im in images])


def test_fp16_backends_keep_fp32_features_and_top1(embedded_encoder, tmp_path):
    x = world_batch(embedded_encoder, 60)
    with torch.no_grad():
        text = encode_classes(embedded_encoder, init_context(embedded_encoder, phrase="a photo of a"),
                              list(world.CLASS_NAMES)).float()
    ref = TorchImageBackend(embedded_encoder)(x)
    onnx16 = OnnxImageBackend(embedded_encoder, tmp_path, precision="fp16")
    assert onnx16.path.name == "visual-fp16.onnx" and onnx16.precision == "fp16"
    for backend in (TorchImageBackend(embedded_encoder, "fp16"), onnx16):
        feats = backend(x)
        assert feats.dtype == torch.float32 and feats.shape == ref.shape
        assert (feats * ref).sum(-1).min().item() >= 0.999, backend.name
        agree = ((feats @ text.T).argmax(-1) == (ref @ text.T).argmax(-1)).float().mean().item()
        assert agree >= 0.95, (backend.name, agree)
    # the IO-binding path (used for tensors already on the GPU) gives what session.run gives
    assert torch.allclose(onnx16.run_bound(x), onnx16(x), atol=1e-6)
    stamp = onnx16.path.stat().st_mtime_ns  # the conversion is cached beside the fp32 export
    assert OnnxImageBackend(embedded_encoder, tmp_path, precision="fp16").path.stat().st_mtime_ns == stamp


def test_precision_setting(embedded_encoder, tmp_path):
    assert make_backend("torch", embedded_encoder, tmp_path).precision == "fp32"  # auto on the CPU
    assert make_backend("torch", embedded_encoder, tmp_path, precision="fp16").precision == "fp16"
    assert embedded_encoder.model.visual.conv1.weight.dtype == torch.float32  # fp16 used a copy
    with pytest.raises(BackendError, match="unknown precision"):
        make_backend("torch", embedded_encoder, tmp_path, precision="int8")
    assert ServiceConfig.from_env({"PROMPTFOLIO_PRECISION": "fp16"}).precision == "fp16"
    with pytest.raises(ValidationError):
        ServiceConfig.from_env({"PROMPTFOLIO_GPU_DECODE": "yes"})
    assert make_decoder("auto", embedded_encoder, 1000) is None  # auto: only beside a CUDA encoder


def _jpeg(w: int, h: int, seed: int, **save) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)).resize((w, h))
    if save.pop("cmyk", False):
        img = img.convert("CMYK")
    if "orientation" in save:
        exif = Image.Exif()
        exif[0x0112] = save.pop("orientation")
        save["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **save)
    return buf.getvalue()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def test_batched_jpeg_decoder_matches_the_pil_path(embedded_encoder):
    enc = embedded_encoder
    limits = image_io.ImageLimits(40_000_000, 16_000_000, 16384, 20.0, 4_000_000, enc.image_size)
    images = [(_jpeg(160, 96, seed=o, orientation=o), f"exif {o}") for o in range(1, 9)]  # every EXIF turn
    images += [(_jpeg(640, 480, 10), "vga"), (_jpeg(300, 500, 11, progressive=True), "progressive"),
               (_jpeg(120, 120, 12, cmyk=True), "cmyk"), (_png(90, 70), "png"), (_jpeg(700, 600, 13), "large")]
    decoder = GpuJpegDecoder(PreprocessSpec.from_transform(enc.preprocess), "cpu", max_pixels=400_000)
    pool = FairPool(2)
    try:
        probed = [image_io.probe(data, name, limits) for data, name in images]
        routed = [decoder.accepts(p, data) for p, (data, _) in zip(probed, images)]
        # CMYK, PNG and a JPEG over the full-size pixel bound go to the CPU decoder
        assert [name for (_, name), ok in zip(images, routed) if not ok] == ["cmyk", "png", "large"]
        batch = asyncio.run(decoder.decode(pool, "t", images, probed, enc.preprocess, enc.image_size))
        ref = torch.stack([image_io.decode_probed(image_io.probe(d, n, limits), enc.preprocess, enc.image_size)
                           for d, n in images])
        assert (decoder.decoded, decoder.refused) == (10, 0)
        # small images: the same pixels within rounding (a wrong EXIF turn would differ by whole units)
        assert (batch[:8] - ref[:8]).abs().max().item() < 0.1
        with torch.no_grad():
            f_gpu = F.normalize(enc.model.encode_image(batch), dim=-1)
            f_cpu = F.normalize(enc.model.encode_image(ref), dim=-1)
        # larger JPEGs: libjpeg's reduced-size decode + box filter vs a full decode + antialiased resize
        assert (f_gpu * f_cpu).sum(-1).min().item() >= 0.999
        # a full decode + resize is what training's loader does (promptfolio.images.load_image, no draft):
        # the batched decoder reproduces those pixels within rounding
        train = torch.stack([enc.preprocess(load_image(d)) for d, _ in images[:10]])  # those decoded batched
        assert (batch[:10] - train).abs().mean().item() < 0.005
        # a truncated JPEG never reaches the batched decoder (nvJPEG decodes one without an error,
        # as seen on an H200); the CPU path answers 400. Trailing bytes after EOI are still accepted.
        whole = _jpeg(640, 480, 14)
        data = whole[:3000]
        assert not decoder.accepts(image_io.probe(data, "t.jpg", limits), data)
        assert decoder.accepts(image_io.probe(whole, "w.jpg", limits), whole + b"\0" * 16)
        broken = [(data, "truncated.jpg")]
        with pytest.raises(image_io.ImageError, match="truncated.jpg") as err:
            asyncio.run(decoder.decode(pool, "t", broken, [image_io.probe(data, "truncated.jpg", limits)],
                                       enc.preprocess, enc.image_size))
        assert err.value.status == 400 and decoder.refused == 0
    finally:
        pool.close()


def test_a_decoder_that_refuses_everything_is_switched_off(embedded_encoder):
    decoder = GpuJpegDecoder(PreprocessSpec.from_transform(embedded_encoder.preprocess), "cpu", 1 << 20)
    limits = image_io.ImageLimits(1 << 20, 1 << 20, 4096, 20.0, 1 << 20, embedded_encoder.image_size)
    good = _jpeg(64, 48, 1)
    broken = good[:400]  # a header that probes, then nothing
    assert decoder.decode_batch([good, broken], [1, 1])[1] is None  # one refused: no count
    for _ in range(15):
        decoder.decode_batch([broken], [1])
    assert not decoder.disabled and decoder.accepts(image_io.probe(good, "g.jpg", limits), good)
    decoder.decode_batch([broken], [1])  # the 16th call in a row that refuses everything
    assert decoder.disabled and not decoder.accepts(image_io.probe(good, "g.jpg", limits), good)


def test_engine_serves_the_gpu_path_like_the_default_one(embedded_encoder, tmp_path):
    """The seam in Engine.classify: fp16 ONNX + the batched decoder (forced onto the CPU) answer what
    fp32 torch + PIL answer, for a request mixing JPEGs, a PNG and a CMYK JPEG."""
    from service.engine import Engine

    images, labels = world.task_dataset(6, world.calibrated("noise"), seed=11)
    request = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).resize((320, 240), Image.BICUBIC).save(buf, "JPEG", quality=92)
        request.append((buf.getvalue(), f"{i}.jpg"))
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, "PNG")
    request.append((buf.getvalue(), "png"))
    buf = io.BytesIO()
    Image.fromarray(images[1]).resize((320, 240)).convert("CMYK").save(buf, "JPEG", quality=92)
    request.append((buf.getvalue(), "cmyk"))

    base = dict(store=tmp_path / "store", onnx_cache=tmp_path / "onnx")
    default = Engine(ServiceConfig(**base, backend="torch"), embedded_encoder)
    gpu_path = Engine(ServiceConfig(**base, backend="onnx", precision="fp16", gpu_decode="on"), embedded_encoder)
    assert default.gpu_decoder is None and gpu_path.gpu_decoder is not None
    assert gpu_path.backend.precision == "fp16"
    default.store.add_tenant("t", list(world.CLASS_NAMES))
    try:
        ref = asyncio.run(default.classify("t", request, top_k=3)).model_dump()
        out = asyncio.run(gpu_path.classify("t", request, top_k=3)).model_dump()
        assert (gpu_path.gpu_decoder.decoded, gpu_path.gpu_decoder.refused) == (6, 0)  # the PNG and CMYK: CPU
        # the same top-1 everywhere. Scores are a softmax over 100 x cosine, and the CPU path decodes JPEGs
        # at reduced size (libjpeg's DCT scaling) while the batched decoder decodes them whole, as training
        # does: JPEG scores differ by up to ~0.1 (seen: 0.53 vs 0.63 on a near tie); PNG/CMYK (both on
        # the CPU) differ only by fp16 rounding
        for a, b in zip(ref["predictions"], out["predictions"]):
            assert a["file"] == b["file"] and a["top"][0]["label"] == b["top"][0]["label"]
        for a, b in zip(ref["predictions"][-2:], out["predictions"][-2:]):
            assert abs(a["top"][0]["score"] - b["top"][0]["score"]) < 2e-3
        with pytest.raises(image_io.ImageError) as err:
            asyncio.run(gpu_path.classify("t", [request[0], (request[1][0][:500], "cut.jpg")], top_k=1))
        assert err.value.status == 400 and "cut.jpg" in str(err.value)
    finally:
        for engine in (default, gpu_path):
            engine.batcher.close()
            engine.decode_pool.close()
