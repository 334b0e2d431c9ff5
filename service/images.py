"""Decode untrusted image bytes into model input, bounding the work before any pixel is decoded.

`probe` reads only the header and refuses what would be expensive: a side over the limit, an
extreme aspect ratio, too many input pixels, too many pixels held after the (reduced-size)
decode, and too many pixels produced by the resize to the encoder's size (the resize scales the
short side *up* to the target, so a 1×80,000 strip would become 224×17.9 M). `decode_probed`
then decodes at reduced size where the format allows (JPEG DCT scaling via `draft`), shrinks by an
integer box filter in the image's own mode before converting to RGB (a 1-bit or grey image never
exists as full-size RGB), applies the EXIF orientation and runs the encoder's own preprocess.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import Compose, Normalize, ToTensor

from promptfolio.images import IMAGE_FORMATS, upright_rgb

ALLOWED_FORMATS = IMAGE_FORMATS  # one list with training's image folders
ALLOWED_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif",
                         "application/octet-stream"}
LIGHT_PIXELS = 1 << 20  # decodes up to this many pixels are "light" for the fair decode scheduler
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


class ImageError(ValueError):
    """An uploaded image is empty, corrupt, too large or of an unsupported kind."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int  # input pixels
    max_decoded_pixels: int  # pixels in memory after the reduced-size decode
    max_side: int
    max_aspect: float
    max_resized_pixels: int  # pixels the resize to `target_size` produces
    target_size: int  # the encoder's input side


@dataclass
class Probed:
    """An opened (not yet decoded) image that passed the limits, with what decoding it will cost."""

    image: Image.Image | None  # None once handed to the decoder, so the full-size pixels do not linger
    name: str
    decoded_pixels: int
    full_size: tuple[int, int] = (0, 0)  # (w, h) in the header; `image.size` is the reduced size after draft

    @property
    def light(self) -> bool:
        return self.decoded_pixels <= LIGHT_PIXELS


def check_content_type(content_type: str | None, name: str) -> None:
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in ALLOWED_CONTENT_TYPES:
        raise ImageError(f"{name}: content type {kind!r} is not an image (send JPEG or PNG)", status=415)


def _draft_scale(fmt: str, w: int, h: int, target: int) -> int:
    """The factor libjpeg's DCT scaling will shrink by (1, 2, 4 or 8; the short side stays >= target)."""
    if fmt != "JPEG":
        return 1
    scale = 1
    while scale < 8 and min(w, h) // (scale * 2) >= target:
        scale *= 2
    return scale


def _check_geometry(name: str, fmt: str, w: int, h: int, limits: ImageLimits) -> int:
    """Refuses (413) what would be costly, from the header alone; returns the pixels the decode holds."""
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if max(w, h) > limits.max_side:
        raise ImageError(f"{name}: {w}x{h} exceeds the limit of {limits.max_side} pixels per side", status=413)
    aspect = max(w, h) / min(w, h)
    if aspect > limits.max_aspect:
        shown = f"{aspect:.2f}".rstrip("0").rstrip(".")  # 2001x100: 20.01, not a rounded 20 over a limit of 20
        raise ImageError(f"{name}: {w}x{h} has an aspect ratio of {shown}:1, over the limit of "
                         f"{limits.max_aspect:g}:1", status=413)
    if w * h > limits.max_pixels:
        raise ImageError(f"{name}: {w}x{h} pixels exceeds the limit of {limits.max_pixels}", status=413)
    scale = _draft_scale(fmt, w, h, limits.target_size)
    decoded = math.ceil(w / scale) * math.ceil(h / scale)
    if decoded > limits.max_decoded_pixels:
        raise ImageError(f"{name}: {w}x{h} {fmt} decodes to {decoded} pixels, over the limit of "
                         f"{limits.max_decoded_pixels} (JPEG may be larger: it decodes at reduced size)", status=413)
    resized = limits.target_size * math.ceil(limits.target_size * aspect)
    if resized > limits.max_resized_pixels:
        raise ImageError(f"{name}: resizing {w}x{h} to the encoder's {limits.target_size} px would produce "
                         f"{resized} pixels, over the limit of {limits.max_resized_pixels}", status=413)
    return decoded


def probe(data: bytes, name: str, limits: ImageLimits) -> Probed:
    """Open the header and check every limit; no pixel is decoded."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(f"{name}: unsupported image format {img.format}", status=415)
            w, h = img.size
            decoded = _check_geometry(name, img.format, w, h, limits)
            if img.format == "JPEG":
                img.draft("RGB", (limits.target_size, limits.target_size))  # DCT scaling while decoding
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own check (89 M pixels) runs in Image.open, before ours can see the size
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(f"{name}: {pixels[1] if pixels else 'its'} pixels exceeds the limit of {limits.max_pixels}",
                         status=413) from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a decodable image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: corrupt image ({e})") from None
    return Probed(img, name, decoded, (w, h))


def decode_probed(probed: Probed, preprocess, target_size: int) -> torch.Tensor:
    """A probed image -> float `[3, H, W]` via the encoder's own preprocess."""
    name = probed.name
    img, probed.image = probed.image, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            img = upright_rgb(img, target_size)  # the same pixels as promptfolio's own loader
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: not a decodable image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{name}: corrupt image ({e})") from None
    return preprocess(img)


@dataclass(frozen=True)
class SplitPreprocess:
    """The encoder's preprocess split where it leaves PIL: per image the PIL steps (resize, crop, mode) give
    uint8 pixels; ToTensor and Normalize then run once over the whole request's `[n, H, W, 3]` array.
    The same float32 operations in the same order (x / 255, then - mean, then / std), so the same
    values, without two torch calls per image. `pil_steps` None: the preprocess has another shape,
    and each image goes through it whole."""

    whole: Callable[[Image.Image], torch.Tensor]
    pil_steps: Callable[[Image.Image], Image.Image] | None = None
    mean: torch.Tensor | None = None  # [1, 3, 1, 1]
    std: torch.Tensor | None = None

    @classmethod
    def of(cls, preprocess: Callable) -> "SplitPreprocess":
        steps = list(getattr(preprocess, "transforms", []))
        if (len(steps) >= 2 and isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize)
                and not steps[-1].inplace):
            norm = steps[-1]
            mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
            return cls(preprocess, Compose(steps[:-2]), mean, std)
        return cls(preprocess)

    def pixels(self, img: Image.Image) -> np.ndarray | torch.Tensor:
        """One image: uint8 `[H, W, 3]` (split), or the whole preprocess' float `[3, H, W]`."""
        if self.pil_steps is None:
            return self.whole(img)
        img = self.pil_steps(img)
        if img.mode != "RGB":  # ToTensor's uint8 path needs 8-bit RGB; anything else goes the whole way
            return self.whole(img)
        return np.asarray(img)

    def batch(self, items: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """`[n, 3, H, W]` float32 model input from what `pixels` gave."""
        if all(isinstance(x, np.ndarray) for x in items) and len({x.shape for x in items}) == 1:
            x = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float().div(255)
            return x.sub_(self.mean).div_(self.std).contiguous()
        return torch.stack([x if isinstance(x, torch.Tensor) else self._finish(x) for x in items])

    def _finish(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)
        return x.sub_(self.mean[0]).div_(self.std[0])


def decode_pixels(probed: Probed, preprocess: SplitPreprocess, target_size: int) -> np.ndarray | torch.Tensor:
    """`decode_probed` with the split preprocess: the image's pixels (see `SplitPreprocess.pixels`)."""
    return decode_probed(probed, preprocess.pixels, target_size)


def decode_group(group: list[Probed], preprocess: SplitPreprocess, target_size: int) -> torch.Tensor:
    """A group's images -> `[k, 3, H, W]` model input (in a decode worker, off the event loop)."""
    return preprocess.batch([decode_pixels(p, preprocess, target_size) for p in group])


async def decode_request(pool, key: str, images: list[tuple[bytes, str]], limits: ImageLimits,
                         preprocess: SplitPreprocess) -> torch.Tensor:
    """A request's images -> `[n, 3, H, W]`: every header probed first (on the event loop: header parsing
    only, ~20 µs an image), then decoded on `pool`, light images grouped into tasks of at most
    LIGHT_PIXELS decoded pixels (one thread hop per group, not two per image; a group is no longer
    than one light image's decode, so fairness between requests holds), heavy images one task each."""
    probed = [probe(data, name, limits) for data, name in images]
    groups: list[tuple[list[Probed], bool]] = []
    light: list[Probed] = []
    budget = 0
    for p in probed:
        if not p.light:
            groups.append(([p], True))
            continue
        if light and budget + p.decoded_pixels > LIGHT_PIXELS:
            groups.append((light, False))
            light, budget = [], 0
        light.append(p)
        budget += p.decoded_pixels
    if light:
        groups.append((light, False))
    size = limits.target_size
    if len(groups) == 1:
        decoded = [await pool.run(key, lambda g=groups[0][0]: decode_group(g, preprocess, size), heavy=groups[0][1])]
    else:
        decoded = await asyncio.gather(*[pool.run(key, lambda g=g: decode_group(g, preprocess, size), heavy=heavy)
                                         for g, heavy in groups])
    if len(decoded) == 1:
        return decoded[0]
    order = {id(p): i for i, p in enumerate(probed)}
    rows = torch.tensor([order[id(p)] for group, _ in groups for p in group])
    merged = torch.cat(decoded)
    return merged if bool((rows == torch.arange(len(rows))).all()) else merged[torch.argsort(rows)]


def return_large_buffers_to_the_os(threshold: int = 1 << 20) -> bool:
    """Serve allocations of `threshold` bytes and more with mmap, so they go back to the OS when freed.

    glibc raises its mmap threshold after the first large free (up to 32 MiB), after which a large
    image's buffers come from the heap and stay resident: tens of MiB per decode thread after one
    big image. A fixed threshold turns that off. Process-wide: the service calls it once at start.
    """
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD
