"""The REST API's request and response models: what `/v1/openapi.json` describes, field by field.

The constraints here are the ones the server enforces (tenant-id pattern, non-empty unique class
names, θ in [0, 1], versions ≥ 1, top-k bounds), so a request the schema allows is not refused for
its shape, and one it forbids is answered 422 before any work is done.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from annotated_types import Ge, Le
from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, StringConstraints, model_validator,
)

from prompts_store.artifact import SHA256_PATTERN, TENANT_PATTERN
from prompts_store.registry import CLASS_NAME_PATTERN, MAX_CLASS_NAME, MAX_CLASSES

BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"  # what b64decode(validate=True) takes
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
MAX_PAGE = 1000
DEFAULT_PAGE = 100

THETA_DOC = ("θ in [0, 1]. Mixing happens on features, so any θ is served exactly, but a local prompt is trained "
             "together with its global at its training θ: only there is the answer the classifier that was trained; "
             "θ=1 is 'local only' only for a prompt trained at θ=1.")
THETA_OVERRIDE = "Per-request θ (default: the tenant's setting, else the θ its local artifact was trained at). " + THETA_DOC

TenantId = Annotated[str, StringConstraints(pattern=TENANT_PATTERN)]
ClassName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CLASS_NAME, pattern=CLASS_NAME_PATTERN)]


def _unique(classes: list[str]) -> list[str]:
    """The schema's uniqueItems, enforced as a 422 like the rest of it (the store's own check is a 400)."""
    repeated = sorted(c for c, n in Counter(classes).items() if n > 1)
    if repeated:
        raise ValueError(f"class names must be unique; given more than once: {repeated[:5]}")
    return classes


ClassList = Annotated[list[ClassName], Field(min_length=1, max_length=MAX_CLASSES, json_schema_extra={"uniqueItems": True},
                                             description="Class names: unique, non-empty, no control characters, "
                                                         "no leading or trailing space."), AfterValidator(_unique)]


def _json_integer(value: Any) -> Any:
    """JSON Schema's integer: 3 and 3.0 alike; never a boolean or a string (left for Strict to refuse)."""
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        return int(value)
    return value


# JSON booleans are not numbers here: `{"theta": false}` is a 422, not θ = 0
Theta = Annotated[float, Strict(), Field(ge=0.0, le=1.0, allow_inf_nan=False, description=THETA_DOC)]
Version = Annotated[int, Strict(), Ge(1), BeforeValidator(_json_integer)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_PATTERN)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent no-op


class ErrorBody(BaseModel):
    """Every error answer: 4xx (or 503 with Retry-After) and one message saying what was wrong."""

    error: str = Field(examples=["unknown tenant 'acme'"])


# ---- requests ------------------------------------------------------------------------------
class NewTenant(Request):
    tenant: TenantId = Field(description="1-63 characters a-z, 0-9, '-' or '_', starting with a letter or digit")
    classes: ClassList
    theta: Theta | None = Field(None, description="a fixed θ; null: the uploaded artifact's θ, else 0.4")

    @model_validator(mode="before")
    @classmethod
    def _id_alias(cls, data: Any) -> Any:
        """`id` is the deprecated name of `tenant` (accepted, not documented)."""
        if isinstance(data, dict) and "id" in data and "tenant" not in data:
            data = {("tenant" if k == "id" else k): v for k, v in data.items()}
        return data


class TenantUpdate(Request):
    classes: ClassList | None = None
    theta: Theta | None = Field(None, description="an explicit null returns θ to 'auto' (the artifact's θ or 0.4)")


class Rollback(Request):
    version: Version | None = Field(None, description="the version to serve; omitted or null: the previous one")


class Repin(Request):
    global_version: Annotated[int, Strict(), Ge(0), BeforeValidator(_json_integer)] | None = Field(
        description="the global version to serve the local prompt with (0: the built-in prompt); null: follow the "
                    "current global")


class ClassifyJSON(Request):
    images: list[Annotated[str, Field(json_schema_extra={"contentEncoding": "base64", "pattern": BASE64_PATTERN})]] = Field(
        min_length=1, description="base64 of each image file's bytes (JPEG, PNG, WebP, BMP, "
                                                        "GIF); named 'image 0', 'image 1', ... in the answer")
    top_k: Annotated[int, Strict(), Ge(1), Le(MAX_TOP_K), BeforeValidator(_json_integer)] = DEFAULT_TOP_K
    theta: Theta | None = Field(None, description=THETA_OVERRIDE)


class ClassifyForm(Request):
    """The multipart form's fields besides the image files (form values arrive as text)."""

    top_k: int = Field(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K)
    theta: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)


# ---- responses -----------------------------------------------------------------------------
class Served(BaseModel):
    """The prompt pair a tenant is served."""

    global_version: int = Field(ge=0, description="0: the built-in hand prompt 'a photo of a'")
    local_version: int | None = Field(ge=1, description="null: no local prompt yet")
    pinned: bool = Field(description="served with the global its local prompt was trained with")
    trained_together: bool | None = Field(description="null: no local prompt; false: this pair was not trained "
                                                      "together (re-pinned, or unpinned and the global changed)")


class ServedNow(Served):
    theta: float = Field(ge=0, le=1, description="the effective θ (0 while there is no local prompt)")


class RegisteredTenant(Served):
    tenant: str
    api_key: str = Field(description="shown once; stored only as a hash")
    classes: list[str]
    theta: float | None = Field(description="the tenant's θ setting (null: auto)")
    effective_theta: float = Field(ge=0, le=1)


class TenantInfo(Served):
    tenant: str
    classes: list[str]
    theta: float | None = Field(description="the tenant's θ setting (null: auto)")
    effective_theta: float = Field(ge=0, le=1)
    trained_with_global_sha256: str | None
    trained_with_global_version: int | None
    local_theta: float | None = Field(description="the θ the local artifact was trained at")
    local_versions: list[int]
    created_at: str


class TenantPage(BaseModel):
    tenants: list[str] = Field(description="tenant ids in ascending order")
    next: str | None = Field(description="pass as `after` for the next page; null: this is the last page")


class NewKey(BaseModel):
    tenant: str
    api_key: str = Field(description="the new key; the old one stopped working")


class PublishedGlobal(BaseModel):
    version: int = Field(ge=1)
    content_sha256: Sha256
    n_ctx: int
    notes: list[str]


class GlobalVersion(BaseModel):
    version: int = Field(ge=1, description="the global version now current")


class UploadedLocal(ServedNow):
    tenant: str
    version: int = Field(ge=1)
    content_sha256: Sha256
    n_ctx: int
    global_sha256: str | None = Field(description="the global prompt the local prompt was trained with")
    notes: list[str]


class RolledBack(ServedNow):
    tenant: str
    version: int | None = Field(description="the local version now served")
    notes: list[str]


class Repinned(ServedNow):
    tenant: str
    notes: list[str]


class Label(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class Prediction(BaseModel):
    file: str = Field(description="the uploaded file name, or 'image N' (JSON input)")
    top: list[Label]


class Classification(ServedNow):
    tenant: str
    predictions: list[Prediction]


class CacheInfo(BaseModel):
    entries: int
    bytes: int
    hits: int
    misses: int


class BatchingInfo(BaseModel):
    batches: int
    images: int
    max_batch: int


class AdmissionInfo(BaseModel):
    in_flight: int
    shed: int
    expected_wait_s: float
    deadline_s: float
    mean_wait_before_app_s: float
    shed_in_queue: int  # admitted, then refused when their decode or batch would start: past the deadline


class ServiceInfo(BaseModel):
    arch: str
    weights: str
    fingerprint: str
    device: str
    backend: str
    precision: str = Field(description="the image encoder's precision: fp32, or fp16 on CUDA")
    gpu_decode: bool = Field(description="whether JPEGs are decoded on the GPU")
    providers: list[str]
    text_width: int
    image_size: int
    global_version: int
    cache: CacheInfo
    batching: BatchingInfo
    admission: AdmissionInfo
