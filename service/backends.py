"""Image-encoder backends for the service: torch, or ONNX Runtime (CPU or CUDA provider), fp32 or fp16.

The image tower is the only model on the request path (class features are cached), so it is the
part worth exporting. The ONNX graph includes the L2 normalisation and has a dynamic batch
axis; exports are cached on disk under the encoder fingerprint and built in a temporary folder
that is renamed into place, so concurrent workers never read a half-written model.

Precision: fp16 halves the weights' memory traffic and runs on the GPU's tensor cores; on the CPU
it is slower than fp32, so "auto" means fp16 on CUDA and fp32 elsewhere. The fp16 ONNX model is
the fp32 export converted by onnxruntime's own converter (`onnxruntime.transformers.float16`,
shipped in both onnxruntime wheels) with float32 inputs and outputs kept, so callers never see
the difference. Parity with fp32 is what bench/gpu_check.py checks (README: "GPU serving").
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from promptfolio.encoder import Encoder

log = logging.getLogger("promptfolio.service")


PRECISIONS = ("auto", "fp32", "fp16")


class BackendError(RuntimeError):
    pass


class Backend(Protocol):
    """What the engine needs of an image encoder: preprocessed images in, unit-norm features out."""

    name: str  # "torch" or "onnxruntime", as /v1/info reports it
    precision: str  # "fp32" or "fp16", as /v1/info reports it
    providers: list[str]  # where it really runs (e.g. ["CPUExecutionProvider"], ["torch:cuda"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` float -> L2-normalised `[B, D]` float32 on the CPU."""
        ...


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> fp16 on CUDA (tensor cores), fp32 elsewhere (CPU fp16 is emulated and slower)."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if str(device).startswith("cuda") else "fp32"
    return precision


class TorchImageBackend:
    name = "torch"

    def __init__(self, encoder: Encoder, precision: str = "fp32"):
        self.encoder = encoder
        self.precision = resolve_precision(precision, str(encoder.device))
        self.dtype = torch.float16 if self.precision == "fp16" else torch.float32
        # fp16: a half copy of the image tower only; the text tower (class features) stays fp32
        self.visual = (copy.deepcopy(encoder.model.visual).half() if self.precision == "fp16"
                       else encoder.model.visual)
        self.providers = [f"torch:{encoder.device}"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` float -> normalised `[B, D]` float32 on the CPU."""
        x = images.to(self.encoder.device, self.dtype, non_blocking=True)
        return F.normalize(self.visual(x).float(), dim=-1).cpu()


class _NormalizedVisual(torch.nn.Module):
    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, D]
        return F.normalize(self.visual(images).float(), dim=-1)


def onnx_path(encoder: Encoder, cache_dir: Path) -> Path:
    digest = hashlib.sha256(encoder.fingerprint.encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{encoder.arch}-{digest}" / "visual.onnx"


def export_onnx(encoder: Encoder, cache_dir: Path) -> Path:
    """Export the image tower once per fingerprint; later calls return the cached file."""
    path = onnx_path(encoder, cache_dir)
    if path.is_file():
        return path
    path.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=path.parent.parent))
    start = time.perf_counter()
    module = _NormalizedVisual(encoder.model.visual).cpu().eval()
    size = encoder.image_size
    dummy = torch.randn(2, 3, size, size)
    try:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX export
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes about constant shapes in attention pooling
            torch.onnx.export(module, (dummy,), str(tmp / "visual.onnx"), input_names=["images"],
                              output_names=["features"], dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
        try:
            tmp.rename(path.parent)
        except OSError:  # another worker finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - any exporter failure is reported the same way
        shutil.rmtree(tmp, ignore_errors=True)
        raise BackendError(f"ONNX export of {encoder.arch} failed: {e}") from e
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        encoder.model.to(encoder.device)
    log.info("exported %s image tower to %s in %.1f s", encoder.arch, path, time.perf_counter() - start)
    return path


def export_onnx_fp16(encoder: Encoder, cache_dir: Path) -> Path:
    """The fp32 export converted to fp16 (float32 inputs and outputs kept), cached beside it."""
    source = export_onnx(encoder, cache_dir)
    path = source.with_name("visual-fp16.onnx")
    if path.is_file():
        return path
    import onnx
    # (importing onnxruntime.transformers appends its folder to sys.path: harmless, it only adds names)
    from onnxruntime.transformers.float16 import convert_float_to_float16

    start = time.perf_counter()
    try:
        model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        fd, tmp = tempfile.mkstemp(prefix=".fp16-", suffix=".onnx", dir=path.parent)
        os.close(fd)
        onnx.save(model, tmp)
        os.replace(tmp, path)  # atomic: a concurrent worker sees the whole file or none
    except Exception as e:  # noqa: BLE001 - any converter failure is reported the same way
        raise BackendError(f"fp16 conversion of the {encoder.arch} ONNX export failed: {e}") from e
    log.info("converted %s to fp16 in %.1f s", path, time.perf_counter() - start)
    return path


def choose_providers(requested: str, device: str) -> list[str]:
    """'auto': CUDA first when the service runs on a GPU, then CPU; or an explicit comma list."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested == "auto":
        wanted = (["CUDAExecutionProvider"] if device.startswith("cuda") else []) + ["CPUExecutionProvider"]
    else:
        aliases = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider",
                   "tensorrt": "TensorrtExecutionProvider"}
        wanted = [aliases.get(p.strip().lower(), p.strip()) for p in requested.split(",") if p.strip()]
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")  # the fallback that always exists
    return chosen


class OnnxImageBackend:
    name = "onnxruntime"

    def __init__(self, encoder: Encoder, cache_dir: Path, providers: str = "auto", threads: int | None = None,
                 precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed (pip install 'promptfolio[cpu]' or '[gpu]')") from e
        self.precision = resolve_precision(precision, str(encoder.device))
        self.path = (export_onnx_fp16 if self.precision == "fp16" else export_onnx)(encoder, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # fp16: "extended" (fusions), not "all": with ORT_ENABLE_ALL, onnxruntime 1.32 and onnxruntime-gpu 1.31.1
        # segfault creating a CPU-provider session for the fp16 ViT-B-32 export (seen; onnxruntime issues
        # #15494 and #26717 report fp16 models failing there too); "all" adds only CPU layout passes
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED if self.precision == "fp16"
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        # ONNX Runtime's pool threads busy-wait after each run by default: with frequent small batches one
        # of them spun a whole core (half the service's CPU with the tiny model). Off: they sleep between runs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        device = str(encoder.device)
        chosen = choose_providers(providers, device)
        if "CUDAExecutionProvider" in chosen and hasattr(ort, "preload_dlls"):
            try:  # CUDA/cuDNN from the nvidia-* wheels torch brings, where the system has none
                ort.preload_dlls()
            except Exception as e:  # noqa: BLE001 - the session below reports what it really got
                log.warning("onnxruntime could not preload CUDA libraries: %s", e)
        gpu = {"device_id": torch.device(device).index or 0}  # cuda:1 runs on GPU 1, where its inputs are
        self.session = ort.InferenceSession(str(self.path), options, providers=[
            (p, gpu) if p == "CUDAExecutionProvider" else p for p in chosen])
        # what the session really uses (the available list names CUDA even where it cannot run)
        self.providers = self.session.get_providers()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in self.providers:
            log.warning("CUDAExecutionProvider unavailable; ONNX Runtime falls back to %s", self.providers)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.device.type == "cuda" and self.providers[0] == "CUDAExecutionProvider":
            return self.run_bound(images)  # decoded on the GPU: hand ONNX Runtime the device buffer
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["features"], {"images": x})[0])

    def run_bound(self, images: torch.Tensor) -> torch.Tensor:
        """Run on a tensor where it lies (CUDA or CPU memory) through IO binding: no host round trip
        for images decoded on the GPU. Features come back in CPU memory (ranking runs there)."""
        x = images.detach().to(torch.float32).contiguous()
        if x.device.type == "cuda":  # torch's kernels that produced x run on torch's stream, not ORT's
            torch.cuda.synchronize(x.device)
        binding = self.session.io_binding()
        binding.bind_input("images", x.device.type, x.device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output("features")  # allocated by ONNX Runtime in CPU memory
        self.session.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])

def seconds_per_batch(backend, batch: int, image_size: int, device: str, repeats: int = 5) -> float:
    """Median seconds of one encoder call on `batch` random images (after two warm-up calls)."""
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        backend(x)  # returns CPU features: the call has finished on the device too
        if i >= 2:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def make_backend(kind: str, encoder: Encoder, cache_dir: Path, providers: str = "auto", precision: str = "auto",
                 probe_batch: int = 32, threads: int | None = None) -> Backend:
    """kind: 'torch', 'onnx', or 'auto'. On the CPU, auto is ONNX Runtime when installed and exportable,
    else torch. On CUDA, auto builds both at `precision` and keeps the one faster on a `probe_batch`
    batch (which wins depends on the GPU and the architecture; measuring costs a second at start).
    threads: ONNX Runtime's intra-op threads (None: one per core)."""
    if kind == "torch":
        return TorchImageBackend(encoder, precision)
    if kind == "onnx":
        return OnnxImageBackend(encoder, cache_dir, providers, threads, precision=precision)
    if kind != "auto":
        raise BackendError(f"unknown backend {kind!r}; choose torch, onnx or auto")
    try:
        onnx = OnnxImageBackend(encoder, cache_dir, providers, threads, precision=precision)
    except BackendError as e:
        log.warning("%s; using the torch backend", e)
        return TorchImageBackend(encoder, precision)
    device = str(encoder.device)
    if not device.startswith("cuda"):
        return onnx
    if "CUDAExecutionProvider" not in onnx.providers:
        return TorchImageBackend(encoder, precision)  # ONNX Runtime on the CPU beside a GPU: never faster
    return fastest([onnx, TorchImageBackend(encoder, precision)], probe_batch, encoder.image_size, device)


def fastest(backends: list, batch: int, image_size: int, device: str):
    """The backend with the lowest median time per `batch`-image call; the timings are logged."""
    timed = [(seconds_per_batch(b, batch, image_size, device), b) for b in backends]
    log.info("encoder backends at batch %d: %s", batch, ", ".join(
        f"{b.name} {b.precision} {batch / s:.0f} img/s" for s, b in timed))
    return min(timed, key=lambda t: t[0])[1]
