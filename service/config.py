"""The service's one configuration object, read from PROMPTFOLIO_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from promptfolio.encoder import parse_pretrained

ENV_PREFIX = "PROMPTFOLIO_"


class ServiceConfig(BaseModel):
    store: Path = Path(".cache/store")  # prompts store root
    arch: str = "embedded"  # open_clip architecture, or "embedded"
    pretrained: str | None = "embedded"  # open_clip tag, checkpoint path, "embedded"; "none" = random
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    backend: str = "auto"  # image encoder: "auto" (ONNX Runtime if installed), "onnx" or "torch"
    onnx_providers: str = "auto"  # "auto" (CUDA on a GPU, then CPU) or a list such as "cuda,cpu"
    onnx_cache: Path = Path(".cache/onnx")  # exported image towers, keyed by encoder fingerprint
    admin_key: str | None = None  # enables the admin endpoints; never logged
    max_batch: int = Field(32, ge=1, le=1024)  # images per encoder call
    max_wait_ms: float = Field(4.0, ge=0, le=1000)  # how long a batch waits to fill
    max_pending_images: int = Field(512, ge=1)  # queued images beyond this get 503 + Retry-After
    max_images_per_request: int = Field(64, ge=1)
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)  # decompression-bomb guard
    max_upload_bytes: int = Field(1 << 20, ge=1)  # prompt artifacts
    cache_mb: float = Field(256.0, gt=0)  # tenant feature cache bound
    decode_threads: int = Field(2, ge=1, le=64)
    top_k: int = Field(5, ge=1)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServiceConfig":
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        return cls.model_validate(values)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v):
        return parse_pretrained(v)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
