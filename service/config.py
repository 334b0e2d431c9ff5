"""The service's one configuration object, read from PROMPTFOLIO_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

ENV_PREFIX = "PROMPTFOLIO_"


def env_name(setting: str) -> str:
    return ENV_PREFIX + setting.upper()


class ServiceConfig(BaseModel):
    store: Path = Path(".cache/store")  # prompts store root
    arch: str = "embedded"  # open_clip architecture, or "embedded"
    pretrained: str | None = "embedded"  # open_clip tag, checkpoint path, "embedded"; "none" = random
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    backend: str = "auto"  # image encoder: "auto" (ONNX Runtime if installed), "onnx" or "torch"
    onnx_providers: str = "auto"  # "auto" (CUDA on a GPU, then CPU) or a list such as "cuda,cpu"
    onnx_cache: Path = Path(".cache/onnx")  # exported image towers, keyed by encoder fingerprint
    # image encoder precision: "auto" = fp16 on CUDA, fp32 on the CPU; with backend "auto" on CUDA the
    # service times ONNX Runtime and torch at this precision at start and keeps the faster
    precision: Literal["auto", "fp32", "fp16"] = "auto"
    # JPEG decoding with torchvision/nvJPEG on the encoder's device: "auto" = when the encoder is on CUDA
    # (other formats and JPEGs it refuses are decoded on the CPU as usual); "on" forces it on any device
    gpu_decode: Literal["auto", "on", "off"] = "auto"
    admin_key: str | None = None  # enables the admin endpoints; never logged
    max_batch: int = Field(32, ge=1, le=1024)  # images per encoder call
    max_wait_ms: float = Field(4.0, ge=0, le=1000)  # how long a batch waits to fill
    max_pending_images: int = Field(512, ge=1)  # queued images beyond this get 503 + Retry-After
    # a classify request whose expected queue wait exceeds this is shed (503 + Retry-After)
    admission_deadline_s: float = Field(1.0, gt=0, le=600)
    # Python's gen-0 collection threshold (its default is 700); objects alive at start are frozen
    gc_threshold: int = Field(10_000, ge=100)
    max_images_per_request: int = Field(64, ge=1)
    max_image_bytes: int = Field(20 << 20, ge=1)
    max_request_bytes: int = Field(64 << 20, ge=1)  # a whole classify body, counted as it streams in
    max_json_bytes: int = Field(1 << 20, ge=1)  # JSON bodies (tenant registration, PATCH, rollback)
    max_image_pixels: int = Field(40_000_000, ge=1)  # input pixels, from the header (JPEG decodes reduced)
    max_decoded_pixels: int = Field(16_000_000, ge=1)  # pixels held in memory after a reduced-size decode
    max_image_side: int = Field(16384, ge=1)
    max_image_aspect: float = Field(20.0, ge=1)  # long side / short side
    max_resized_pixels: int = Field(4_000_000, ge=1)  # what the resize to the encoder's size produces
    max_upload_bytes: int = Field(1 << 20, ge=1)  # prompt artifacts
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this
    body_timeout_s: float = Field(60.0, gt=0)  # and its body within this after the headers
    keep_alive_s: float = Field(20.0, gt=0)  # idle keep-alive connections close after this
    max_connections: int = Field(1024, ge=1)  # beyond it idle connections are closed, then new ones refused
    cache_mb: float = Field(256.0, gt=0)  # tenant feature cache bound
    decode_threads: int = Field(2, ge=1, le=64)
    encoder_threads: int = Field(0, ge=0, le=256)  # ONNX Runtime intra-op threads; 0: one per core
    tenant_metrics: bool = False  # per-tenant request/image/upload counters (one series per tenant)

    @classmethod
    def env_values(cls, environ: dict[str, str] | None = None) -> dict[str, str]:
        """The settings the environment gives (raw text, not yet validated), by field name."""
        environ = dict(os.environ if environ is None else environ)
        return {name: raw for name in cls.model_fields
                if (raw := environ.get(env_name(name))) is not None and raw != ""}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServiceConfig":
        return cls.model_validate(cls.env_values(environ))

    @classmethod
    def setting(cls, name: str, environ: dict[str, str] | None = None) -> object:
        """One setting as the service will see it (environment, else the default), without validating the
        others (which may import torch): what `promptfolio serve` needs to check before it starts."""
        return cls.env_values(environ).get(name, cls.model_fields[name].default)

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained(cls, v):
        from promptfolio.encoder import parse_pretrained  # torch: not in the supervisor, which imports this

        return parse_pretrained(v)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
