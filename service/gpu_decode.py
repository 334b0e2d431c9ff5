"""JPEG decoding on the encoder's GPU (nvJPEG through torchvision), batched per request.

With the image encoder on CUDA, decoding JPEGs on the CPU (libjpeg, PIL, the encoder's preprocess)
costs milliseconds of CPU per image and bounds the service long before the GPU does. Here a
request's JPEGs are decoded in one `torchvision.io.decode_jpeg(list, device=...)` call (a list is
what nvJPEG batches), then resized, cropped and normalised on the device with the encoder's own
preprocess parameters, and handed to the encoder without leaving the GPU.

Limits stay where they are: every image has been probed first (`service/images.probe`: header
checks, 413/415 before any pixel is decoded). nvJPEG decodes at full size (libjpeg's reduced-size
DCT decoding has no GPU counterpart), so a JPEG goes to the GPU only when its full-size pixels are
within `max_decoded_pixels`, in sub-batches of at most `BATCH_PIXELS`. Larger JPEGs, CMYK/YCCK
JPEGs (PIL converts those the way training saw them), other formats, and any batch the GPU decoder
refuses (it returns no partial results: the batch is retried image by image) are decoded on the
CPU by `service/images.decode_probed`, which also gives a corrupt file its 400.
EXIF orientation is read from the probed header and applied on the device (torchvision applies it
on the CPU only). `device="cpu"` runs the same code with torchvision's CPU decoder: that is how
this path is tested and dry-run on machines without a GPU.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import warnings
from dataclasses import dataclass

import torch
from torchvision.transforms import CenterCrop, InterpolationMode, Normalize, Resize
from torchvision.transforms.v2 import functional as TF

from service.images import Probed, decode_probed

log = logging.getLogger("promptfolio.service")

MAX_FAILED_CALLS = 16  # calls in a row that refuse every image before the decoder is switched off
BATCH_PIXELS = 64_000_000  # full-size pixels per decode call (~190 MB of RGB on the device)
_PASSIVE_STEPS = {"MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb", "convert_to_rgb"}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class PreprocessSpec:
    """The geometric and colour steps of an open_clip preprocess, to replay on tensors."""

    resize: list[int]  # [short side] or [height, width]
    interpolation: InterpolationMode
    antialias: bool
    crop: list[int]  # [height, width]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transform(cls, preprocess) -> "PreprocessSpec | None":
        """Resize -> CenterCrop -> (RGB, to tensor) -> Normalize, or None for anything else."""
        steps = getattr(preprocess, "transforms", None)
        if steps is None:
            return None
        found: dict[str, object] = {}
        for step in steps:
            name = getattr(step, "__name__", type(step).__name__)
            if isinstance(step, (Resize, CenterCrop, Normalize)) and type(step).__name__ not in found:
                found[type(step).__name__] = step
            elif name not in _PASSIVE_STEPS:
                return None
        if set(found) != {"Resize", "CenterCrop", "Normalize"}:
            return None
        resize, crop, norm = found["Resize"], found["CenterCrop"], found["Normalize"]
        size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        return cls(size, resize.interpolation, bool(resize.antialias), list(crop.size),
                   tuple(norm.mean), tuple(norm.std))


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """`[C, H, W]` turned as PIL's `ImageOps.exif_transpose` turns an image with this EXIF orientation."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))  # 90° clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))  # 90° counter-clockwise
    return image


def exif_orientation(probed: Probed) -> int:
    try:
        return int(probed.image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: PIL's loader ignores it too
        return 1


def ends_with_eoi(data: bytes) -> bool:
    """A whole JPEG ends with its EOI marker (FF D9), give or take a little padding. nvJPEG
    (torchvision 0.26 on an H200) decodes a truncated stream without an error, grey where the data
    stops, where PIL refuses it: such a file goes to the CPU path, which answers 400. In the
    entropy-coded data an FF is always followed by 00 or a restart marker, so FF D9 there is EOI."""
    return data.rfind(b"\xff\xd9", max(0, len(data) - 32)) != -1


class GpuJpegDecoder:
    def __init__(self, spec: PreprocessSpec, device: str | torch.device, max_pixels: int):
        self.spec = spec
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self.mean = torch.tensor(spec.mean, device=self.device).view(-1, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(-1, 1, 1)
        self.decoded = 0  # images decoded here / refused and handed to the CPU (the GPU check reads them)
        self.refused = 0
        self.failed_calls = 0  # consecutive calls where the decoder refused every image
        self.disabled = False

    def accepts(self, probed: Probed, data: bytes) -> bool:
        img, (w, h) = probed.image, probed.full_size  # nvJPEG decodes at full size: bound that
        return (not self.disabled and img is not None and img.format == "JPEG" and img.mode in ("RGB", "L")
                and 0 < w * h <= self.max_pixels and ends_with_eoi(data))

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 `[3, H, W]` -> normalised float `[3, h, w]`, as the encoder's preprocess makes it."""
        spec = self.spec
        x = TF.resize(image.float(), spec.resize, interpolation=spec.interpolation, antialias=spec.antialias)
        x = TF.center_crop(x, spec.crop)
        x = x.clamp_(0, 255).round_().div_(255)  # PIL resizes in uint8: clamped and rounded, then ToTensor
        return (x - self.mean) / self.std

    def _decode(self, data: list[bytes]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bytes are read-only buffers (never written); 0.29's deprecation note
            encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def decode_batch(self, data: list[bytes], orientations: list[int]) -> list[torch.Tensor | None]:
        """Decode + preprocess; None where the decoder refused the image (the CPU path takes it)."""
        try:
            decoded: list[torch.Tensor | None] = list(self._decode(data))
        except RuntimeError:  # no partial results: find the refused ones one by one
            decoded = []
            for d in data:
                try:
                    decoded.append(self._decode([d])[0])
                except RuntimeError:
                    decoded.append(None)
        self._note(all(image is None for image in decoded))
        out: list[torch.Tensor | None] = []
        for image, orientation in zip(decoded, orientations):
            out.append(None if image is None else self.preprocess(upright(image, orientation)))
        return out

    def _note(self, all_refused: bool) -> None:
        """A decoder that refuses everything (no nvJPEG, a broken CUDA context) is switched off
        rather than tried and retried image by image on every request."""
        self.failed_calls = self.failed_calls + 1 if all_refused else 0
        if self.failed_calls >= MAX_FAILED_CALLS and not self.disabled:
            self.disabled = True
            log.error("GPU JPEG decoding switched off: %d calls in a row refused every image; decoding on the CPU",
                      self.failed_calls)

    def _chunks(self, indices: list[int], probed: list[Probed]) -> list[list[int]]:
        chunks: list[list[int]] = [[]]
        pixels = 0
        for i in indices:
            w, h = probed[i].full_size
            if chunks[-1] and pixels + w * h > BATCH_PIXELS:
                chunks.append([])
                pixels = 0
            chunks[-1].append(i)
            pixels += w * h
        return chunks

    async def decode(self, pool, key: str, images: list[tuple[bytes, str]], probed: list[Probed],
                     cpu_preprocess, target_size: int) -> torch.Tensor:
        """A request's probed images -> normalised `[n, 3, h, w]` on the device, in request order."""
        out: list[torch.Tensor | None] = [None] * len(probed)
        gpu = [i for i, p in enumerate(probed) if self.accepts(p, images[i][0])]
        for chunk in self._chunks(gpu, probed) if gpu else []:
            results = await pool.run(key, functools.partial(
                self.decode_batch, [images[i][0] for i in chunk], [exif_orientation(probed[i]) for i in chunk]))
            for i, tensor in zip(chunk, results):
                out[i] = tensor
                if tensor is not None:
                    probed[i].image = None  # the header-only PIL image is not needed any more
        cpu = [i for i, t in enumerate(out) if t is None]
        self.decoded += len(probed) - len(cpu)
        self.refused += len(set(cpu) & set(gpu))
        decoded = await asyncio.gather(*[
            pool.run(key, functools.partial(decode_probed, probed[i], cpu_preprocess, target_size),
                     heavy=not probed[i].light) for i in cpu])
        for i, tensor in zip(cpu, decoded):
            out[i] = tensor.to(self.device, non_blocking=True)
        return torch.stack(out)


def make_decoder(setting: str, encoder, max_pixels: int) -> GpuJpegDecoder | None:
    """The decoder for `setting` ("auto": when the encoder is on CUDA; "on"; "off"), or None."""
    device = str(encoder.device)
    if setting == "off" or (setting == "auto" and not device.startswith("cuda")):
        return None
    spec = PreprocessSpec.from_transform(encoder.preprocess)
    if spec is None:
        log.warning("GPU JPEG decoding off: the encoder's preprocess is not Resize/CenterCrop/Normalize")
        return None
    try:
        from torchvision.io import decode_jpeg  # noqa: F401 - torchvision built without image ops lacks it
    except ImportError as e:
        log.warning("GPU JPEG decoding off: %s", e)
        return None
    log.info("JPEG decoding on %s (nvJPEG through torchvision) up to %d pixels per image", device, max_pixels)
    return GpuJpegDecoder(spec, device, max_pixels)
