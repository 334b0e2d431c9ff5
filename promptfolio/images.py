"""Opening images the same way everywhere: training folders, the late-joiner path and serving.

One list of accepted file types and one loader, so an image that trains also serves, and an
EXIF-rotated phone photo is seen upright by every component (`ImageOps.exif_transpose`).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# file name endings read from image folders, and the decoder formats they stand for
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
IMAGE_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard (the service's default limit too)

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


class ImageLoadError(ValueError):
    """An image cannot be used: unreadable, corrupt, of an unsupported format or too large."""


def is_image_file(path: str | os.PathLike) -> bool:
    """An accepted extension and not a hidden file (macOS `._name.jpg` forks are not images)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def shrink_for(img: Image.Image, target: int) -> Image.Image:
    """Integer box-reduce in the image's own mode until the short side is within 2x of `target`.

    Hand-written because the encoder's preprocess (torchvision Resize, antialiased) would first need
    a full-size RGB copy; a box reduce then the antialiased bicubic resize gives the same picture
    within a grey level, and a 1-bit or grey image never exists as full-size RGB.
    """
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    factor = min(img.size) // target
    if factor >= 2:
        img = img.reduce(factor)
    return img


# high-depth grey modes (16-bit PNG/TIFF, float TIFF) and the value that maps to white: PIL's own
# convert("RGB") clips them at 255 (a 16-bit image turns white) and its box reduce refuses them
HIGH_DEPTH_WHITE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def to_8bit(img: Image.Image) -> Image.Image:
    """A high-depth grey image scaled to 8-bit grey ("L"); any other image unchanged."""
    white = HIGH_DEPTH_WHITE.get(img.mode)
    if white is None:
        return img
    scaled = np.asarray(img, dtype=np.float32) * (255.0 / white)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def upright_rgb(img: Image.Image, target: int | None = None) -> Image.Image:
    """The one way every component turns a decoded image into model input pixels: EXIF orientation
    applied (phones store rotation in EXIF, not in pixels), reduced toward `target` when given, RGB."""
    img = to_8bit(ImageOps.exif_transpose(img))
    if target:
        img = shrink_for(img, target)
    return img.convert("RGB")


def load_image(source: ImageSource, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
               draft_size: int | None = None) -> Image.Image:
    """An upright RGB image, fully decoded, from a path, bytes or a PIL image.

    draft_size: the encoder's input size, to decode as the service does (libjpeg downscales while
    decoding, then a box reduce to within 2x of it); leave None where pixels must match a full decode.
    """
    if isinstance(source, Image.Image):
        return upright_rgb(source, draft_size)
    label = name or (f"{len(source)}-byte image" if isinstance(source, bytes) else str(source))
    if isinstance(source, bytes) and not source:
        raise ImageLoadError(f"{label}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as img:
                if img.format not in IMAGE_FORMATS:
                    raise ImageLoadError(f"{label}: unsupported image format {img.format}")
                w, h = img.size  # from the header, before any pixel is decoded
                if w * h > max_pixels:
                    raise ImageLoadError(f"{label}: {w}x{h} pixels exceeds the limit of {max_pixels}")
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.load()
                return upright_rgb(img, draft_size)
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageLoadError(f"{label}: not a decodable image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{label}: corrupt image ({e})") from None
