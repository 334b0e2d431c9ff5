"""Image-encoder backends for the service: torch, or ONNX Runtime (CPU or CUDA provider).

The image tower is the only model on the request path (class features are cached), so it is the
part worth exporting. The ONNX graph includes the L2 normalisation and has a dynamic batch
axis; exports are cached on disk under the encoder fingerprint and built in a temporary folder
that is renamed into place, so concurrent workers never read a half-written model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from promptfolio.encoder import Encoder

log = logging.getLogger("promptfolio.service")


class BackendError(RuntimeError):
    pass


class TorchImageBackend:
    name = "torch"

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.providers = [f"torch:{encoder.device}"]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` float -> normalised `[B, D]` float32 on the CPU."""
        x = images.to(self.encoder.device, non_blocking=True)
        return F.normalize(self.encoder.model.encode_image(x).float(), dim=-1).cpu()


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

    def __init__(self, encoder: Encoder, cache_dir: Path, providers: str = "auto", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("onnxruntime is not installed (pip install 'promptfolio[cpu]' or '[gpu]')") from e
        self.path = export_onnx(encoder, cache_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
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
        self.session = ort.InferenceSession(str(self.path), options, providers=chosen)
        # what the session really uses (the available list names CUDA even where it cannot run)
        self.providers = self.session.get_providers()
        if device.startswith("cuda") and "CUDAExecutionProvider" not in self.providers:
            log.warning("CUDAExecutionProvider unavailable; ONNX Runtime falls back to %s", self.providers)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(["features"], {"images": x})[0])


def make_backend(kind: str, encoder: Encoder, cache_dir: Path, providers: str = "auto", threads: int | None = None):
    """kind: 'torch', 'onnx', or 'auto' (ONNX Runtime when installed and exportable, else torch);
    threads: ONNX Runtime's intra-op threads (None: one per core)."""
    if kind == "torch":
        return TorchImageBackend(encoder)
    if kind == "onnx":
        return OnnxImageBackend(encoder, cache_dir, providers, threads)
    if kind != "auto":
        raise BackendError(f"unknown backend {kind!r}; choose torch, onnx or auto")
    try:
        return OnnxImageBackend(encoder, cache_dir, providers, threads)
    except BackendError as e:
        log.warning("%s; using the torch backend", e)
        return TorchImageBackend(encoder)
