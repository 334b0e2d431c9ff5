"""The request path's decode: grouped decode tasks and the batched ToTensor/Normalize give exactly the
encoder's own preprocess, image by image, in the request's order."""

import asyncio
import io

import numpy as np
import torch
from PIL import Image

from promptfolio.embedded import world
from service import images as image_io
from service.batcher import FairPool


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def test_grouped_decode_equals_the_encoders_preprocess(embedded_encoder):
    rng = np.random.default_rng(0)
    noise = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    small = [encoded(Image.fromarray(im), "JPEG") for im in world.task_dataset(4, world.calibrated("noise"), 1)[0]]
    # light images around a heavy one (> 1 M pixels: its own task), light groups split by the pixel budget,
    # and modes that the PIL steps must convert (grey, palette, RGBA)
    images = small[:2] + [encoded(noise(1100, 1000), "PNG")] + small[2:] + [
        encoded(noise(1200, 1000).convert("L"), "PNG"), encoded(noise(700, 700), "JPEG"),
        encoded(noise(800, 900).convert("P"), "PNG"), encoded(noise(90, 70).convert("RGBA"), "PNG")]
    named = [(data, f"image {i}") for i, data in enumerate(images)]
    size = embedded_encoder.image_size
    limits = image_io.ImageLimits(40_000_000, 16_000_000, 16384, 20.0, 4_000_000, size)
    expected = torch.stack([image_io.decode_probed(image_io.probe(data, name, limits), embedded_encoder.preprocess, size)
                            for data, name in named])
    split = image_io.SplitPreprocess.of(embedded_encoder.preprocess)
    assert split.pil_steps is not None  # open_clip's preprocess: PIL steps, then ToTensor + Normalize
    pool = FairPool(2)
    try:
        got = asyncio.run(image_io.decode_request(pool, "tenant", named, limits, split))
        one = asyncio.run(image_io.decode_request(pool, "tenant", named[:1], limits, split))
    finally:
        pool.close()
    assert got.shape == expected.shape and torch.equal(got, expected)
    assert torch.equal(one, expected[:1])
