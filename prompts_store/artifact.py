"""Prompt artifacts: one safetensors file holding `ctx [n_ctx, width]` and self-describing metadata.

Reading validates everything before a tensor is trusted: size, header length, JSON nesting and
counts (bounded before any JSON is parsed), the single `ctx` tensor, its dtype, shape against the
running encoder, finiteness, required metadata, encoder fingerprint and the content hash. Any
failure is an `ArtifactError` with a message for the user; no input can raise anything else.

dtype: float32 is the format. float16 and bfloat16 contexts are converted to float32, which is
exact (every such value is a float32), and the content hash is always taken over float32 values.
float64 and every other dtype are refused: narrowing float64 would change the prompt silently.
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
MAX_JSON_DEPTH = 4  # a safetensors header is {name: {dtype, shape: [..], data_offsets: [..]}}: depth 3
MAX_METADATA_KEYS = 32
MAX_CLASS_NAMES = 10_000
EXACT_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # all exactly representable in float32
SHA256_PATTERN = r"^[0-9a-f]{64}$"
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
    classes: list[str] = Field(default_factory=list, max_length=MAX_CLASS_NAMES)
    theta: float | None = None
    # local prompts: the global prompt they were trained with (its content hash, and its store
    # version when known); absent in artifacts from before pinning ("unpinned")
    global_sha256: str | None = Field(default=None, pattern=SHA256_PATTERN)
    global_version: int | None = Field(default=None, ge=0)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    producer: str = Field(default="unknown", max_length=200)
    content_sha256: str = ""

    @field_validator("theta")
    @classmethod
    def _theta_in_range(cls, v: float | None) -> float | None:
        return None if v is None else check_theta(v)

    @model_validator(mode="after")
    def _local_needs_tenant(self) -> "PromptMeta":
        if self.kind == "local" and not self.tenant:
            raise ValueError("a local prompt names its tenant")
        if self.kind == "global" and (self.tenant or self.global_sha256 or self.global_version is not None):
            raise ValueError("a global prompt has no tenant and no global_sha256/global_version")
        return self

    def to_strings(self) -> dict[str, str]:
        out = {}
        for key, value in self.model_dump().items():
            if value is None:
                continue
            out[key] = json.dumps(value) if key == "classes" else str(value)
        return out

    @classmethod
    def from_strings(cls, raw: object) -> "PromptMeta":
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise ArtifactError("safetensors metadata must map names to strings")
        if len(raw) > MAX_METADATA_KEYS:
            raise ArtifactError(f"metadata has {len(raw)} fields, at most {MAX_METADATA_KEYS} are allowed")
        data: dict[str, object] = dict(raw)
        if "classes" in data:
            text = str(data["classes"])
            check_json_depth(text.encode(), 1, "metadata 'classes'")  # a flat list of names
            try:
                data["classes"] = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ArtifactError(f"metadata 'classes' is not a JSON list: {e}") from None
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ArtifactError(f"invalid metadata: {validation_problems(e)}") from None


def validation_problems(e: ValidationError) -> str:
    """One line naming each problem of a pydantic validation error (field: message)."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'metadata'}: {err['msg']}"[:300]
                     for err in e.errors()[:5])


def check_json_depth(text: bytes, max_depth: int, what: str) -> None:
    """Refuse JSON nested deeper than `max_depth` before parsing it.

    Why hand-written: Python's json module recurses per nesting level, so a hostile header of a
    few kilobytes of '[' raises RecursionError (or exhausts the stack) inside the parser; a linear
    scan that skips string contents bounds the nesting first.
    """
    depth, in_string, escaped = 0, False, False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > max_depth:
                raise ArtifactError(f"{what} is JSON nested deeper than {max_depth} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def content_sha256(ctx: torch.Tensor) -> str:
    t = ctx.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(t.shape)};".encode() + t.numpy().tobytes()).hexdigest()


def artifact_bytes(ctx: torch.Tensor, meta: PromptMeta) -> bytes:
    """Serialise; the content hash and shape fields are filled in from `ctx`."""
    ctx = ctx.detach().to("cpu", torch.float32).contiguous()
    if ctx.ndim != 2:
        raise ArtifactError(f"ctx must be 2-D [n_ctx, width], got shape {tuple(ctx.shape)}")
    meta = meta.model_copy(update={"n_ctx": ctx.shape[0], "width": ctx.shape[1], "content_sha256": content_sha256(ctx)})
    try:
        PromptMeta.model_validate(meta.model_dump())  # re-check after the update
    except ValidationError as e:
        raise ArtifactError(f"invalid metadata: {validation_problems(e)}") from None
    return st_save({"ctx": ctx}, metadata=meta.to_strings())


def _header(data: bytes) -> tuple[int, dict]:
    if len(data) < 8:
        raise ArtifactError(f"truncated file: {len(data)} bytes, not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if len(data) > 8 and data[8:9] != b"{":  # a safetensors header is a JSON object right after its length
        raise ArtifactError("not a safetensors file (corrupt safetensors header)")
    if n > MAX_HEADER_BYTES:
        raise ArtifactError(f"safetensors header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > len(data):
        raise ArtifactError(f"truncated file: header claims {n} bytes but only {len(data) - 8} follow")
    check_json_depth(data[8 : 8 + n], MAX_JSON_DEPTH, "the safetensors header")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ArtifactError("corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactError("corrupt safetensors header (not an object)")
    return n, header


def read_artifact(data: bytes, encoder_fingerprint: str | None = None, width: int | None = None,
                  max_bytes: int = MAX_ARTIFACT_BYTES) -> tuple[torch.Tensor, PromptMeta]:
    """Validate and load an artifact from bytes -> (ctx float32 `[n_ctx, width]`, metadata)."""
    try:
        return _read(data, encoder_fingerprint, width, max_bytes)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - a backstop: a malformed artifact is the sender's problem, never a 5xx
        raise ArtifactError(f"unreadable artifact ({type(e).__name__}: {str(e)[:200]})") from None


def _read(data: bytes, encoder_fingerprint: str | None, width: int | None,
          max_bytes: int) -> tuple[torch.Tensor, PromptMeta]:
    if len(data) > max_bytes:
        raise ArtifactError(f"artifact of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    _, header = _header(data)
    tensors = sorted(k for k in header if k != "__metadata__")
    if tensors != ["ctx"]:
        raise ArtifactError(f"an artifact holds exactly one tensor named 'ctx', found {[t[:40] for t in tensors[:5]]}")
    meta = PromptMeta.from_strings(header.get("__metadata__") or {})
    try:
        loaded = st_load(data)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise ArtifactError(f"corrupt safetensors data: {str(e)[:200]}") from None
    ctx = loaded["ctx"]
    if ctx.dtype not in EXACT_FLOAT_DTYPES:
        raise ArtifactError(f"ctx must be a float32 tensor (float16 and bfloat16 are converted exactly), "
                            f"got {str(ctx.dtype).removeprefix('torch.')}")
    if ctx.ndim != 2 or not 1 <= ctx.shape[0] <= MAX_N_CTX:
        raise ArtifactError(f"ctx must have shape [n_ctx <= {MAX_N_CTX}, width], got {tuple(ctx.shape)}")
    if width is not None and ctx.shape[1] != width:
        raise ArtifactError(f"ctx width {ctx.shape[1]} does not match the encoder's text width {width}")
    ctx = ctx.to(torch.float32)
    if not torch.isfinite(ctx).all():
        raise ArtifactError("ctx contains NaN or infinite values")
    if (meta.n_ctx, meta.width) != tuple(ctx.shape):
        raise ArtifactError(f"metadata says [{meta.n_ctx}, {meta.width}] but ctx is {list(ctx.shape)}")
    if meta.content_sha256 != content_sha256(ctx):
        raise ArtifactError("content hash mismatch: the tensor was altered after the artifact was written")
    if encoder_fingerprint is not None and meta.encoder != encoder_fingerprint:
        raise ArtifactError(f"artifact was made for encoder {meta.encoder[:60]}…, "
                            f"not the running {encoder_fingerprint[:60]}…")
    return ctx, meta
