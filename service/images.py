"""Decode untrusted image bytes into model input, refusing what is not a reasonable image."""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
ALLOWED_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif",
                         "application/octet-stream"}


class ImageError(ValueError):
    """An uploaded image is empty, corrupt, too large or of an unsupported kind."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_content_type(content_type: str | None, name: str) -> None:
    kind = (content_type or "application/octet-stream").split(";")[0].strip().lower()
    if kind not in ALLOWED_CONTENT_TYPES:
        raise ImageError(f"{name}: content type {kind!r} is not an image (send JPEG or PNG)", status=415)


def decode(data: bytes, name: str, preprocess, max_pixels: int, target_size: int) -> torch.Tensor:
    """bytes -> float `[3, H, W]` via the encoder's own preprocess."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(f"{name}: unsupported image format {img.format}", status=415)
            w, h = img.size  # read from the header, before any pixel is decoded
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} pixels exceeds the limit of {max_pixels}", status=413)
            if img.format == "JPEG":
                img.draft("RGB", (target_size, target_size))  # libjpeg downscales while decoding (>= target)
            img = img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: not a decodable image") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{name}: corrupt image ({e})") from None
    return preprocess(img)
