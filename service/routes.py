"""The REST routes (mounted under /v1): one module-level function per endpoint.

The RequestGuard middleware (service/guard.py) has already checked the key and bounded the body
from the headers before a route runs; each route still states its access (`AdminEngine`,
`TenantEngine`, `MemberEngine`), which checks again (cheap) so no route is reachable without its
check, and gives the OpenAPI schema its Bearer security scheme.
"""

from __future__ import annotations

import base64
import binascii
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.utils import get_flat_dependant
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile as StarletteUpload

from prompts_store.artifact import TENANT_PATTERN, artifact_bytes
from service import metrics, writes
from service import images as image_io
from service.engine import Engine, TenantView
from service.errors import responses
from service.guard import AUTHORIZED, CLOCK, APIError, check_admin, check_member, check_tenant, presented_key
from service.schemas import (
    DEFAULT_PAGE, DEFAULT_TOP_K, MAX_PAGE, MAX_TOP_K, THETA_OVERRIDE, Classification, ClassifyForm, ClassifyJSON,
    GlobalVersion, NewKey, NewTenant, PublishedGlobal, RegisteredTenant, Repin, Repinned, Rollback, RolledBack,
    ServiceInfo, TenantInfo, TenantPage, TenantUpdate, UploadedLocal,
)

_DECLARED: dict[int, tuple[set[str], set[str]]] = {}  # id(route) -> its query parameters, its form fields


async def strict_request(request: Request) -> None:
    """Unknown or repeated query parameters and form fields are a 422, as unknown JSON fields are
    (FastAPI ignores the former, and takes the last of a repeated one): a misspelt `?top_k=` or
    `allow_unpined` is an error, not a silent default. Classify's own multipart form is checked
    where it is parsed (`_form_images`)."""
    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    if id(route) not in _DECLARED:  # once per route: flattening its dependencies takes ~25 µs
        flat = get_flat_dependant(route.dependant)
        _DECLARED[id(route)] = {p.alias for p in flat.query_params}, {p.alias for p in flat.body_params}
    query, fields = _DECLARED[id(route)]
    _check_names("query parameter", [name for name, _ in request.query_params.multi_items()], query)
    if fields and request.headers.get("content-type", "").startswith("multipart/form-data"):
        _check_names("form field", [name for name, _ in (await request.form()).multi_items()], fields)


def _check_names(what: str, given: list[str], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        hint = f" (known: {', '.join(sorted(known))})" if known else f" (this route takes no {what}s)"
        raise APIError(422, f"invalid request: unknown {what}(s) {unknown[:5]!r}{hint}")
    repeated = sorted(name for name, n in Counter(given).items() if n > 1)
    if repeated:
        raise APIError(422, f"invalid request: {what} {repeated[0]!r} given more than once")


router = APIRouter(dependencies=[Depends(strict_request)])
bearer = HTTPBearer(auto_error=False, description="A tenant key (`pf.<tenant>.<secret>`) reaches its own tenant; "
                                                  "the admin key (PROMPTFOLIO_ADMIN_KEY) reaches everything.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN, description="the tenant id")]


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


# async: FastAPI runs a sync dependency on its thread pool, a thread hop per request for a check
# that costs microseconds (the guard has already read the tenant's key record for tenant routes)
async def as_admin(request: Request, _: Credentials) -> Engine:
    engine = engine_of(request)
    check_admin(engine, presented_key(request.headers))
    return engine


async def as_tenant(request: Request, tenant: TenantPath, _: Credentials) -> Engine:
    """The tenant's own key or the admin key; 401 for a missing/invalid key, 403 for another tenant's."""
    engine = engine_of(request)
    key = presented_key(request.headers)
    if request.scope.get(AUTHORIZED) != (key, tenant):  # the guard checked this very pair already
        check_tenant(engine, key, tenant)
    return engine


async def as_member(request: Request, _: Credentials) -> Engine:
    engine = engine_of(request)
    check_member(engine, presented_key(request.headers))
    return engine


AdminEngine = Annotated[Engine, Depends(as_admin)]
TenantEngine = Annotated[Engine, Depends(as_tenant)]
MemberEngine = Annotated[Engine, Depends(as_member)]


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{what} {upload.filename!r} exceeds the {limit}-byte limit")
    return data


def _pair_warning(view: TenantView) -> list[str]:
    s = view.serving
    if s.local_version is not None and s.trained_together is False:
        return [f"local version {s.local_version} was not trained with global version {s.global_version}: "
                f"this pair was not trained together"]
    return []


def tenant_info(engine: Engine, tenant: str, view: TenantView | None = None) -> TenantInfo:
    record = engine.store.tenant(tenant)
    view = view or engine.view(tenant)
    s = view.serving
    return TenantInfo(tenant=tenant, classes=record.classes, theta=record.theta, effective_theta=view.theta,
                      global_version=view.global_version, local_version=view.local_version, pinned=s.pinned,
                      trained_together=s.trained_together, trained_with_global_sha256=s.trained_with_sha256,
                      trained_with_global_version=s.trained_with_version, local_theta=s.local_theta,
                      local_versions=engine.store.versions(tenant), created_at=record.created_at)


# ---- public -------------------------------------------------------------------------------------
@router.get("/info", response_model=ServiceInfo, tags=["service"])
def info(request: Request) -> ServiceInfo:
    """The encoder, image backend, feature cache, batching and admission counters."""
    engine = engine_of(request)
    enc, admission = engine.encoder, engine.admission
    return ServiceInfo(
        arch=enc.arch, weights=enc.source, fingerprint=enc.fingerprint, device=str(enc.device),
        backend=engine.backend.name, precision=engine.backend.precision,
        gpu_decode=engine.gpu_decoder is not None, providers=list(engine.backend.providers), text_width=enc.text_width,
        image_size=enc.image_size, global_version=engine.store.current_version(None) or 0,
        cache={"entries": len(engine.cache), "bytes": engine.cache.bytes, "hits": engine.cache.hits,
               "misses": engine.cache.misses},
        batching={"batches": engine.batcher.batches, "images": engine.batcher.images,
                  "max_batch": engine.cfg.max_batch},
        admission={"in_flight": admission.in_flight, "shed": admission.shed,
                   "expected_wait_s": round(admission.expected_wait_s(), 3), "deadline_s": admission.deadline_s,
                   "mean_wait_before_app_s": round(admission.waited_s, 3),
                   "shed_in_queue": engine.batcher.shed_in_queue + engine.decode_pool.shed_late})


# ---- admin --------------------------------------------------------------------------------------
@router.post("/tenants", status_code=201, response_model=RegisteredTenant, tags=["admin"],
             responses=responses(400, 401, 403, 409, 413, 422))
def register_tenant(body: NewTenant, engine: AdminEngine) -> RegisteredTenant:
    """Register a tenant; its API key is in the answer (shown once). `id` is a deprecated alias of `tenant`."""
    key, view = writes.register(engine, body.tenant, body.classes, body.theta)
    return RegisteredTenant(tenant=body.tenant, api_key=key, classes=view.classes, global_version=view.global_version,
                            local_version=view.local_version, pinned=view.serving.pinned,
                            trained_together=view.serving.trained_together, theta=body.theta,
                            effective_theta=view.theta)


@router.get("/tenants", response_model=TenantPage, tags=["admin"], responses=responses(401, 403, 422))
def list_tenants(engine: AdminEngine, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
                 after: Annotated[str | None, Query(pattern=TENANT_PATTERN,
                                                    description="the last id of the previous page")] = None
                 ) -> TenantPage:
    """Tenant ids in ascending order, one page at a time (follow `next`)."""
    page = engine.store.tenant_page(after, limit + 1)
    return TenantPage(tenants=page[:limit], next=page[limit - 1] if len(page) > limit else None)


@router.delete("/tenants/{tenant}", status_code=204, response_class=Response, tags=["admin"],
               responses=responses(400, 401, 403, 404, 422))
def delete_tenant(tenant: TenantPath, engine: AdminEngine) -> Response:
    """Delete a tenant: its versions, key and features go; nothing of other tenants is touched."""
    writes.delete_tenant(engine, tenant)
    return Response(status_code=204)


@router.post("/global/prompt", status_code=201, response_model=PublishedGlobal, tags=["admin"],
             responses=responses(400, 401, 403, 409, 413, 422))
async def publish_global(engine: AdminEngine, file: UploadFile = File(description="a global .safetensors artifact")
                         ) -> PublishedGlobal:
    """Publish a new global prompt version; refused (nothing changes) if a tenant following the global breaks."""
    data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
    result = await run_in_threadpool(writes.publish_global, engine, data)
    return PublishedGlobal(version=result.meta.version, content_sha256=result.meta.content_sha256,
                           n_ctx=result.meta.n_ctx, notes=result.notes)


@router.post("/global/rollback", response_model=GlobalVersion, tags=["admin"],
             responses=responses(400, 401, 403, 404, 409, 413, 422))
def rollback_global(engine: AdminEngine, body: Rollback | None = None) -> GlobalVersion:
    """Make an earlier global version current (no body: the previous one)."""
    return GlobalVersion(version=writes.rollback_global(engine, None if body is None else body.version))


@router.get("/global/prompt", response_class=Response, tags=["tenant"], responses={
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
          "description": "the artifact; headers X-Prompt-Version and X-Content-SHA256"},
    **responses(401, 404)})
def download_global(engine: MemberEngine) -> Response:
    """The current global prompt artifact, for a late joiner to personalize against (any tenant key or the admin
    key)."""
    stored = engine.store.load(None)
    if stored is None:
        raise APIError(404, "no global prompt has been published yet (the service uses the hand prompt "
                            "'a photo of a' until one is)")
    return Response(artifact_bytes(stored.ctx, stored.meta), media_type="application/octet-stream",
                    headers={"X-Prompt-Version": str(stored.meta.version),
                             "X-Content-SHA256": stored.meta.content_sha256,
                             "Content-Disposition": f'attachment; filename="global-v{stored.meta.version}.safetensors"'})


# ---- tenant (its own key or the admin key) --------------------------------------------------------
TENANT_ERRORS = (400, 401, 403, 404, 409, 413, 422)


@router.get("/tenants/{tenant}", response_model=TenantInfo, tags=["tenant"], responses=responses(*TENANT_ERRORS))
def get_tenant(tenant: TenantPath, engine: TenantEngine) -> TenantInfo:
    """Classes, θ, the served pair and the stored local versions."""
    return tenant_info(engine, tenant)


@router.patch("/tenants/{tenant}", response_model=TenantInfo, tags=["tenant"], responses=responses(*TENANT_ERRORS))
def update_tenant(tenant: TenantPath, body: TenantUpdate, engine: TenantEngine) -> TenantInfo:
    """Change the class list and/or θ (validated and served before it commits)."""
    clear = "theta" in body.model_fields_set and body.theta is None
    view = writes.update_tenant(engine, tenant, body.classes, body.theta, clear)
    return tenant_info(engine, tenant, view)


@router.post("/tenants/{tenant}/key", response_model=NewKey, tags=["tenant"], responses=responses(*TENANT_ERRORS))
def rotate_key(tenant: TenantPath, engine: TenantEngine) -> NewKey:
    """Issue a new API key; the old one stops working at once."""
    return NewKey(tenant=tenant, api_key=writes.rotate_key(engine, tenant))


@router.post("/tenants/{tenant}/prompt", status_code=201, response_model=UploadedLocal, tags=["tenant"],
             responses=responses(*TENANT_ERRORS))
async def upload_local(tenant: TenantPath, engine: TenantEngine,
                       file: UploadFile = File(description="a local .safetensors artifact"),
                       allow_unpinned: bool = Form(False, description="accept a local prompt whose global the store "
                                                                      "does not hold (served unpinned)")
                       ) -> UploadedLocal:
    """Upload a new local prompt version: validated, features computed, then committed (served by the next
    request)."""
    data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
    result = await run_in_threadpool(writes.upload_local, engine, tenant, data, allow_unpinned)
    metrics.count_upload(tenant)
    meta = result.meta
    return UploadedLocal(tenant=tenant, version=meta.version, content_sha256=meta.content_sha256, n_ctx=meta.n_ctx,
                         global_sha256=meta.global_sha256, **result.view.summary(),
                         notes=result.notes + _pair_warning(result.view))


@router.post("/tenants/{tenant}/rollback", response_model=RolledBack, tags=["tenant"],
             responses=responses(*TENANT_ERRORS))
def rollback_local(tenant: TenantPath, engine: TenantEngine, body: Rollback | None = None) -> RolledBack:
    """Serve an earlier local version (no body: the previous one) with the global it was trained with."""
    view = writes.rollback_local(engine, tenant, None if body is None else body.version)
    return RolledBack(tenant=tenant, version=view.local_version, **view.summary(), notes=_pair_warning(view))


@router.post("/tenants/{tenant}/pin", response_model=Repinned, tags=["tenant"],
             responses=responses(*TENANT_ERRORS))
def repin(tenant: TenantPath, body: Repin, engine: TenantEngine) -> Repinned:
    """Serve the current local prompt with another global version (null: follow the current global)."""
    view = writes.repin(engine, tenant, body.global_version)
    return Repinned(tenant=tenant, **view.summary(), notes=_pair_warning(view))


MULTIPART_SCHEMA = {"type": "object", "required": ["images"], "additionalProperties": False, "properties": {
    "images": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"},
               "description": "image files (JPEG, PNG, WebP, BMP, GIF)"},
    "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K},
    "theta": {"type": "number", "minimum": 0, "maximum": 1, "description": THETA_OVERRIDE}}}
CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": MULTIPART_SCHEMA},
    "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyJSON"}}}}}


@router.post("/tenants/{tenant}/classify", response_model=Classification, tags=["tenant"],
             openapi_extra=CLASSIFY_BODY, responses=responses(*TENANT_ERRORS, 415, 503))
async def classify(request: Request, tenant: TenantPath, engine: TenantEngine) -> Classification:
    """Top-k labels for one or more images: multipart files, or JSON with base64-encoded images."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        images, top_k, theta = await _json_images(request, engine)
    elif kind == "multipart/form-data":
        images, top_k, theta = await _form_images(request, engine)
    elif not kind and not _has_body(request):
        raise APIError(422, "invalid request: body: Field required (images as multipart/form-data or JSON)")
    else:
        given = repr(kind) if kind else "a body without a Content-Type"
        raise APIError(415, f"send the images as multipart/form-data or application/json, not {given}")
    clock = request.scope.get("state", {}).get(CLOCK)  # made by the guard at admission
    answer = await engine.classify(tenant, images, top_k, theta, clock)
    metrics.count_classify(tenant, len(images))
    # serialised once by pydantic: returning the model would run FastAPI's encoding pass again (0.7 ms
    # for a 32-image answer); the schema still comes from response_model
    return Response(answer.model_dump_json(), media_type="application/json")


def _has_body(request: Request) -> bool:
    return request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers


def _check_count(engine: Engine, n: int) -> None:
    if n > engine.cfg.max_images_per_request:
        raise APIError(413, f"{n} images exceed the limit of {engine.cfg.max_images_per_request} per request")


async def _json_images(request: Request, engine: Engine) -> tuple[list[tuple[bytes, str]], int, float | None]:
    body = ClassifyJSON.model_validate_json(await request.body())  # a ValidationError is a 422
    images, limit = [], engine.cfg.max_image_bytes
    for i, text in enumerate(body.images):  # the body's size is bounded already (RequestGuard)
        name = f"image {i}"
        if len(text) > 4 * (limit // 3 + 1):
            raise APIError(413, f"{name} exceeds the {limit}-byte limit")
        try:
            images.append((base64.b64decode(text, validate=True), name))
        except (binascii.Error, ValueError):
            raise image_io.ImageError(f"{name}: not valid base64") from None
    _check_count(engine, len(images))  # after the shape checks: a malformed request is a 400, not a 413
    return images, body.top_k, body.theta


async def _form_images(request: Request, engine: Engine) -> tuple[list[tuple[bytes, str]], int, float | None]:
    cfg = engine.cfg
    # parts beyond this are refused by the parser (400); between the limit and this, by the count below (413)
    form = await request.form(max_files=4 * cfg.max_images_per_request + 16, max_fields=16)
    fields = [(k, v) for k, v in form.multi_items() if k != "images"]
    _check_names("form field", [k for k, _ in fields], set(ClassifyForm.model_fields) | {"images"})
    uploads = [v for k, v in form.multi_items() if k == "images"]
    files = [u for u in uploads if isinstance(u, StarletteUpload)]
    if not uploads:
        raise APIError(422, "invalid request: body.images: Field required (one or more image files)")
    if len(files) != len(uploads):
        raise APIError(422, "invalid request: body.images: each 'images' part must be a file")
    for name, value in fields:
        if not isinstance(value, str):
            raise APIError(422, f"invalid request: body.{name}: a value, not a file")
    options = ClassifyForm.model_validate(dict(fields))  # a ValidationError is a 422
    for i, upload in enumerate(files):
        image_io.check_content_type(upload.content_type, upload.filename or f"image {i}")
    _check_count(engine, len(files))
    images = []
    for i, upload in enumerate(files):
        images.append((await _read_limited(upload, cfg.max_image_bytes, "image"), upload.filename or f"image {i}"))
    return images, options.top_k, options.theta
