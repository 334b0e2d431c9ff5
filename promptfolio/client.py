"""A Python client for the PromptFolio REST service (`promptfolio serve`), on httpx.

    from promptfolio import Client

    client = Client("http://127.0.0.1:3000")            # keys from PROMPTFOLIO_KEY / PROMPTFOLIO_ADMIN_KEY
    answer = client.classify(["photo1.png", "photo2.jpg"], top_k=3)
    answer.predictions[0].top[0].label                    # 'red circle'

Every failure, from a refused connection to a 4xx answer, is raised as one exception type,
`PromptFolioError`, carrying the HTTP status (None when no answer came) and the server's message.
A tenant key (`pf.<tenant>.<secret>`) names its tenant, so a tenant's calls need no tenant id.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, TypeVar, Union
from urllib.parse import quote, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, model_validator

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

ImageInput = Union[str, os.PathLike, bytes, "Image.Image", "np.ndarray"]
DEFAULT_URL = "http://127.0.0.1:3000"
API_PREFIX = "/v1"

__all__ = ["Client", "PromptFolioError", "Classification", "Prediction", "Label", "TenantInfo",
           "RegisteredTenant", "TenantPage", "ServingState", "UploadResult", "KeyRotation", "GlobalPrompt",
           "normalize_url"]


class PromptFolioError(Exception):
    """Any failure of a client call. `status` is the HTTP status, or None when no answer came
    (connection refused, timeout, bad input found before sending); `message` says what was wrong."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message if status is None else f"server answered {status}: {message}")
        self.message, self.status, self.retry_after = message, status, retry_after


# ---- typed answers (extra fields pass through, so a newer server's additions are kept) ----------
class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _tenant_field(cls, data: Any) -> Any:
        # servers before the REST contract of issue 12 called the tenant's id `id` in some answers
        if isinstance(data, dict) and "id" in data and "tenant" not in data:
            data = {**data, "tenant": data["id"]}
        return data


class Label(_Answer):
    label: str
    score: float


class Prediction(_Answer):
    file: str
    top: list[Label]


class ServingState(_Answer):
    """The prompt pair a tenant serves (answers of classify, rollback and pin carry it too)."""

    tenant: str
    global_version: int
    local_version: int | None = None
    theta: float
    pinned: bool = False
    trained_together: bool | None = None
    notes: list[str] = []


class Classification(ServingState):
    predictions: list[Prediction]


class TenantInfo(ServingState):
    classes: list[str]
    theta: float | None = None  # the tenant's own setting; None: auto
    effective_theta: float  # the θ served
    local_theta: float | None = None  # the θ the served local prompt was trained at
    local_versions: list[int] = []
    created_at: str | None = None


class RegisteredTenant(_Answer):
    tenant: str
    api_key: str
    classes: list[str]


class TenantPage(_Answer):
    tenants: list[str]
    next: str | None = None


class UploadResult(_Answer):
    version: int
    content_sha256: str
    n_ctx: int
    tenant: str | None = None  # None for a global prompt
    notes: list[str] = []


class KeyRotation(_Answer):
    tenant: str
    api_key: str


class GlobalPrompt(BaseModel):
    data: bytes  # the safetensors artifact
    version: int | None
    content_sha256: str | None


T = TypeVar("T", bound=BaseModel)


def normalize_url(url: str) -> str:
    """The service's base URL without the API prefix: a trailing `/v1` (what the README's examples
    call $URL) or a missing scheme is accepted rather than producing a 404 on `/v1/v1/...`."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PromptFolioError(f"not a service URL: {url!r} (expected e.g. {DEFAULT_URL})")
    if parts.query or parts.fragment:
        raise PromptFolioError(f"the service URL {url!r} has a query or fragment: drop the part after "
                               f"{'?' if parts.query else '#'}")
    path = parts.path.rstrip("/").removesuffix(API_PREFIX)
    if API_PREFIX + "/" in path + "/":  # e.g. .../v1/tenants/acme pasted from an example
        base = urlunsplit((parts.scheme, parts.netloc, path[: path.index(API_PREFIX + "/")], "", ""))
        raise PromptFolioError(f"the service URL {url!r} names a route: drop everything after /v1 ({base}{API_PREFIX})")
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def key_tenant(key: str | None) -> str | None:
    """The tenant a tenant key belongs to (keys are `pf.<tenant>.<secret>`); None for other keys."""
    if key and key.startswith("pf.") and key.count(".") >= 2:
        return key.split(".")[1]
    return None


class Client:
    """Synchronous client. `key` is a tenant key (default: $PROMPTFOLIO_KEY), `admin_key` the admin
    key (default: $PROMPTFOLIO_ADMIN_KEY, read only when no `key` is given: a client built with a
    tenant key acts as that tenant); `tenant` defaults to the one the tenant key names."""

    def __init__(self, url: str = DEFAULT_URL, key: str | None = None, admin_key: str | None = None,
                 tenant: str | None = None, timeout: float = 60.0):
        self.url = normalize_url(url)
        self.key = key if key is not None else os.environ.get("PROMPTFOLIO_KEY") or None
        if admin_key is None and key is None:  # a client given a tenant key stays that tenant's, whatever the env
            admin_key = os.environ.get("PROMPTFOLIO_ADMIN_KEY") or None
        self.admin_key = admin_key
        self.tenant = tenant or key_tenant(self.key)
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url + API_PREFIX, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tenant calls (the tenant's key, or the admin key) ------------------------------------
    def classify(self, images: ImageInput | Iterable[ImageInput], top_k: int = 5, theta: float | None = None,
                 tenant: str | None = None) -> Classification:
        """Top-k labels per image, in input order. Images: file paths, encoded bytes (PNG, JPEG, ...),
        PIL images or uint8 arrays (H×W or H×W×3/4, or a batch N×H×W×3/4; float arrays in [0, 1] are
        scaled to 0-255). One image, or any iterable of them."""
        items = _image_list(images)
        if not items:
            raise PromptFolioError("classify needs at least one image")
        files = [("images", _image_part(item, i)) for i, item in enumerate(items)]
        form: dict[str, str] = {"top_k": str(top_k)}
        if theta is not None:
            form["theta"] = str(theta)
        return self._call("POST", f"/tenants/{self._tenant(tenant)}/classify", Classification,
                          self._tenant_key(tenant), files=files, data=form)

    def tenant_info(self, tenant: str | None = None) -> TenantInfo:
        return self._call("GET", f"/tenants/{self._tenant(tenant)}", TenantInfo, self._tenant_key(tenant))

    def set_theta(self, theta: float | None, tenant: str | None = None) -> TenantInfo:
        """Fix the tenant's θ in [0, 1]; None returns it to auto (the local artifact's θ, else 0.4)."""
        return self._call("PATCH", f"/tenants/{self._tenant(tenant)}", TenantInfo, self._tenant_key(tenant),
                          json={"theta": theta})

    def set_classes(self, classes: Sequence[str], tenant: str | None = None) -> TenantInfo:
        return self._call("PATCH", f"/tenants/{self._tenant(tenant)}", TenantInfo, self._tenant_key(tenant),
                          json={"classes": list(classes)})

    def upload_local(self, artifact: str | os.PathLike | bytes, allow_unpinned: bool = False,
                     tenant: str | None = None) -> UploadResult:
        """Upload a local prompt artifact (.safetensors); the very next classify serves it."""
        return self._call("POST", f"/tenants/{self._tenant(tenant)}/prompt", UploadResult, self._tenant_key(tenant),
                          files={"file": _artifact_part(artifact)},
                          data={"allow_unpinned": "true"} if allow_unpinned else None)

    def rollback(self, version: int | None = None, tenant: str | None = None) -> ServingState:
        """Serve an earlier local version (default: the previous one)."""
        return self._call("POST", f"/tenants/{self._tenant(tenant)}/rollback", ServingState, self._tenant_key(tenant),
                          json={} if version is None else {"version": version})

    def pin(self, global_version: int | None, tenant: str | None = None) -> ServingState:
        """Serve the local prompt with this global version; None follows the current global."""
        return self._call("POST", f"/tenants/{self._tenant(tenant)}/pin", ServingState, self._tenant_key(tenant),
                          json={"global_version": global_version})

    def rotate_key(self, tenant: str | None = None) -> KeyRotation:
        """A new key for the tenant (the old one stops working at once); this client switches to it
        when it was using the old one."""
        rotated = self._call("POST", f"/tenants/{self._tenant(tenant)}/key", KeyRotation, self._tenant_key(tenant))
        if key_tenant(self.key) == rotated.tenant:
            self.key = rotated.api_key
        return rotated

    def download_global(self, path: str | os.PathLike | None = None) -> GlobalPrompt:
        """The current global prompt artifact (any tenant key or the admin key); written to `path` if given."""
        response = self._send("GET", "/global/prompt", self.key or self._admin_key())
        prompt = GlobalPrompt(data=response.content, content_sha256=response.headers.get("X-Content-SHA256"),
                              version=int(response.headers["X-Prompt-Version"])
                              if response.headers.get("X-Prompt-Version", "").isdigit() else None)
        if path is not None:
            Path(path).write_bytes(prompt.data)
        return prompt

    # ---- admin calls (the admin key) ----------------------------------------------------------
    def register(self, tenant: str, classes: Sequence[str], theta: float | None = None) -> RegisteredTenant:
        """Register a tenant; the answer holds its API key (shown once)."""
        body = {"tenant": tenant, "classes": list(classes), "theta": theta}
        try:
            return self._call("POST", "/tenants", RegisteredTenant, self._admin_key(), json=body)
        except PromptFolioError as e:
            # a server from before the `tenant` field (it calls it `id` and refuses unknown fields)
            if e.status == 422 and "id: field required" in e.message.lower():
                return self._call("POST", "/tenants", RegisteredTenant, self._admin_key(),
                                  json={"id": tenant, "classes": list(classes), "theta": theta})
            raise

    def list_tenants(self, limit: int = 100, after: str | None = None) -> TenantPage:
        """One page of tenant ids, ascending; pass `next` of one page as `after` for the next."""
        params: dict[str, str | int] = {"limit": limit}
        if after is not None:
            params["after"] = after
        return self._call("GET", "/tenants", TenantPage, self._admin_key(), params=params)

    def iter_tenants(self, page_size: int = 100) -> Iterator[str]:
        after = None
        while True:
            page = self.list_tenants(page_size, after)
            yield from page.tenants
            if page.next is None:
                return
            after = page.next

    def delete_tenant(self, tenant: str) -> None:
        """Delete a tenant with its versions, key and cached features (nothing of other tenants)."""
        self._send("DELETE", f"/tenants/{_segment(tenant)}", self._admin_key())

    def publish_global(self, artifact: str | os.PathLike | bytes) -> UploadResult:
        return self._call("POST", "/global/prompt", UploadResult, self._admin_key(),
                          files={"file": _artifact_part(artifact)})

    def rollback_global(self, version: int | None = None) -> int:
        """Serve an earlier global version (default: the previous one); returns the version now served."""
        response = self._send("POST", "/global/rollback", self._admin_key(),
                              json={} if version is None else {"version": version})
        return int(response.json()["version"])

    def info(self) -> dict[str, Any]:
        """The server's encoder, fingerprint, cache and batching counters (no key needed)."""
        return self._send("GET", "/info", None).json()

    # ---- plumbing -----------------------------------------------------------------------------
    def _tenant(self, tenant: str | None) -> str:
        tenant = tenant or self.tenant
        if not tenant and self.key:
            raise PromptFolioError("the API key does not name a tenant (tenant keys look like pf.<tenant>.<secret>): "
                                   "check the key, or name the tenant (Python: tenant=; command line: --tenant)")
        if not tenant:
            raise PromptFolioError("which tenant? set PROMPTFOLIO_KEY to the tenant's key (pf.<tenant>.<secret>), "
                                   "or name the tenant (Python: tenant=; command line: --tenant)")
        return _segment(tenant)

    def _tenant_key(self, tenant: str | None) -> str:
        """The tenant key when it is this tenant's (or of unknown form), else the admin key."""
        tenant = tenant or self.tenant
        if self.key and key_tenant(self.key) in (None, tenant):
            return self.key
        if self.admin_key:
            return self.admin_key
        if self.key:
            return self.key  # another tenant's key: the server answers 403 and says so
        raise PromptFolioError("this call needs the tenant's API key: set PROMPTFOLIO_KEY (Python: key=; "
                               "command line: --key), or the admin key")

    def _admin_key(self) -> str:
        if not self.admin_key:
            raise PromptFolioError("this call needs the admin key: set PROMPTFOLIO_ADMIN_KEY (Python: admin_key=; "
                                   "command line: --key)")
        return self.admin_key

    def _call(self, method: str, path: str, model: type[T], key: str | None, **kwargs: Any) -> T:
        response = self._send(method, path, key, **kwargs)
        try:
            return model.model_validate(response.json())
        except ValueError as e:  # not JSON, or not the shape this client knows
            raise PromptFolioError(f"unexpected answer from {response.request.url}: {str(e)[:300]}",
                                   response.status_code) from None

    def _send(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = self._http.request(method, path, headers=headers, **kwargs)
        except httpx.TimeoutException:
            raise PromptFolioError(f"no answer from {self.url} within {self.timeout:g} s (timeout)") from None
        except httpx.ConnectError as e:
            raise PromptFolioError(f"cannot connect to {self.url} ({_reason(e)}): is `promptfolio serve` "
                                   f"running there?") from None
        except httpx.HTTPError as e:
            raise PromptFolioError(f"request to {self.url} failed: {_reason(e)}") from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.split("] ", 1)[-1] if text.startswith("[Errno") else text


def _error_of(response: httpx.Response) -> PromptFolioError:
    try:
        message = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = response.text.strip()[:300] or response.reason_phrase
        if response.status_code == 404:  # not our API's JSON error: the URL points at something else
            message += f" ({response.request.url} is not a PromptFolio route: check the service URL)"
    retry = response.headers.get("Retry-After")
    return PromptFolioError(message, response.status_code,
                            retry_after=float(retry) if retry and retry.isdigit() else None)


def _segment(text: str) -> str:
    return quote(text, safe="")


def _artifact_part(artifact: str | os.PathLike | bytes) -> tuple[str, bytes, str]:
    if isinstance(artifact, bytes):
        return "prompt.safetensors", artifact, "application/octet-stream"
    path = Path(artifact)
    if not path.is_file():
        raise PromptFolioError(f"no such artifact file: {path}")
    return path.name, path.read_bytes(), "application/octet-stream"


def _image_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """One image or many: an N×H×W×C array is a batch, a lower-dimensional one a single image."""
    ndim = getattr(images, "ndim", None)
    if ndim is not None:
        return list(images) if ndim == 4 else [images]
    if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Iterable):
        return [images]
    from PIL import Image

    return [images] if isinstance(images, Image.Image) else list(images)


def _image_part(item: ImageInput, index: int) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) for one image; arrays and PIL images are sent as PNG."""
    if isinstance(item, bytes):
        return f"image {index}", item, "application/octet-stream"
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise PromptFolioError(f"no such image file: {path}")
        return path.name, path.read_bytes(), "application/octet-stream"
    from PIL import Image

    if not isinstance(item, Image.Image):
        item = _array_image(item, index)
    buffer = io.BytesIO()
    item.save(buffer, "PNG")
    return f"image {index}.png", buffer.getvalue(), "image/png"


def _array_image(item: Any, index: int) -> "Image.Image":
    import numpy as np
    from PIL import Image

    if not isinstance(item, np.ndarray):
        raise PromptFolioError(f"image {index}: expected a path, bytes, a PIL image or a numpy array, "
                               f"got {type(item).__name__}")
    array = item
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise PromptFolioError(f"image {index}: array of shape {array.shape} is not H×W or H×W×1/3/4")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise PromptFolioError(f"image {index}: a float array must hold values in [0, 1]")
        array = np.round(array * 255)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise PromptFolioError(f"image {index}: integer pixel values must lie in 0-255")
    return Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))
