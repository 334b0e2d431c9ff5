"""Prompt artifacts: one safetensors file holding `ctx [n_ctx, width]` and self-describing metadata.

Reading validates everything before a tensor is trusted: size, header length, the single `ctx`
tensor, float dtype, shape against the running encoder, finiteness, required metadata, encoder
fingerprint and the content hash. Any failure is an `ArtifactError` with a message for the user.
"""

from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime, timezone
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from promptfolio.portfolio import check_theta

FORMAT = "promptfolio.prompt/1"
MAX_ARTIFACT_BYTES = 1 << 20  # 1 MiB: a [64, 1024] fp32 context is 256 KiB
MAX_HEADER_BYTES = 64 << 10
MAX_N_CTX = 64
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class ArtifactError(ValueError):
    """A prompt artifact is malformed, hostile, or made for another encoder."""


class PromptMeta(BaseModel):
    """Metadata stored beside `ctx` (as safetensors string metadata)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["promptfolio.prompt/1"] = FORMAT
    kind: Literal["global", "local"]
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    version: int = Field(default=0, ge=0)  # assigned by the store when written there; 0 = not stored yet
    encoder: str = Field(min_length=1, max_length=200)  # encoder fingerprint
    n_ctx: int = Field(ge=1, le=MAX_N_CTX)
    width: int = Field(ge=1, le=8192)
    classes: list[str] = Field(default_factory=list, max_length=10_000)
    theta: float | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    producer: str = Field(default="unknown", max_length=200)
    content_sha256: str = ""
    global_sha256: str | None = None  # local prompts: content hash of the global prompt trained with
    global_version: int | None = None  # ... and its store version, when known

    @field_validator("theta")
    @classmethod
    def _theta_in_range(cls, v: float | None) -> float | None:
        return None if v is None else check_theta(v)

    @model_validator(mode="after")
    def _local_needs_tenant(self) -> "PromptMeta":
        if self.kind == "local" and not self.tenant:
            raise ValueError("a local prompt names its tenant")
        if self.kind == "global" and self.tenant:
            raise ValueError("a global prompt has no tenant")
        return self

    def to_strings(self) -> dict[str, str]:
        out = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            out[key] = json.dumps(value) if key == "classes" else str(value)
        return out

    @classmethod
    def from_strings(cls, raw: dict[str, str]) -> "PromptMeta":
        data: dict[str, object] = dict(raw)
        if "classes" in data:
            try:
                data["classes"] = json.loads(str(data["classes"]))
            except json.JSONDecodeError as e:
                raise ArtifactError(f"metadata 'classes' is not a JSON list: {e}") from None
        return cls.model_validate(data)


def content_sha256(ctx: torch.Tensor) -> str:
    t = ctx.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)};".encode() + t.numpy().tobytes()).hexdigest()


def artifact_bytes(ctx: torch.Tensor, meta: PromptMeta) -> bytes:
    """Serialise; the content hash and shape fields are filled in from `ctx`."""
    ctx = ctx.detach().to("cpu", torch.float32).contiguous()
    if ctx.ndim != 2:
        raise ArtifactError(f"ctx must be 2-D [n_ctx, width], got shape {tuple(ctx.shape)}")
    meta = meta.model_copy(update={"n_ctx": ctx.shape[0], "width": ctx.shape[1], "content_sha256": content_sha256(ctx)})
    PromptMeta.model_validate(meta.model_dump())  # re-check after the update
    return st_save({"ctx": ctx}, metadata=meta.to_strings())


def _header(data: bytes) -> tuple[int, dict]:
    if len(data) < 8:
        raise ArtifactError(f"truncated file: {len(data)} bytes, not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ArtifactError(f"safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(data):
        raise ArtifactError(f"truncated file: header claims {n} bytes but only {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError("corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactError("corrupt safetensors header (not an object)")
    return n, header


def read_artifact(data: bytes, encoder_fingerprint: str | None = None, width: int | None = None,
                  max_bytes: int = MAX_ARTIFACT_BYTES) -> tuple[torch.Tensor, PromptMeta]:
    """Validate and load an artifact from bytes -> (ctx float32 `[n_ctx, width]`, metadata)."""
    if len(data) > max_bytes:
        raise ArtifactError(f"artifact of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    _, header = _header(data)
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != ["ctx"]:
        raise ArtifactError(f"an artifact holds exactly one tensor named 'ctx', found {tensors[:5]}")
    try:
        loaded = st_load(data)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"corrupt safetensors data: {e}") from None
    ctx = loaded["ctx"]
    if ctx.dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"ctx must be a float tensor, got {ctx.dtype}")
    if ctx.ndim != 2 or not 1 <= ctx.shape[0] <= MAX_N_CTX:
        raise ArtifactError(f"ctx must have shape [n_ctx <= {MAX_N_CTX}, width], got {tuple(ctx.shape)}")
    if width is not None and ctx.shape[1] != width:
        raise ArtifactError(f"ctx width {ctx.shape[1]} does not match the encoder's text width {width}")
    ctx = ctx.to(torch.float32)
    if not torch.isfinite(ctx).all():
        raise ArtifactError("ctx contains NaN or infinite values")
    raw = header.get("__metadata__") or {}
    try:
        meta = PromptMeta.from_strings(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'metadata'}: {err['msg']}" for err in e.errors())
        raise ArtifactError(f"invalid metadata: {problems}") from None
    if (meta.n_ctx, meta.width) != tuple(ctx.shape):
        raise ArtifactError(f"metadata says [{meta.n_ctx}, {meta.width}] but ctx is {list(ctx.shape)}")
    if meta.content_sha256 != content_sha256(ctx):
        raise ArtifactError("content hash mismatch: the tensor was altered after the artifact was written")
    if encoder_fingerprint is not None and meta.encoder != encoder_fingerprint:
        raise ArtifactError(f"artifact was made for encoder {meta.encoder[:60]}…, "
                            f"not the running {encoder_fingerprint[:60]}…")
    return ctx, meta
