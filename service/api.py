"""The REST API (FastAPI, mounted into the BentoML service under /v1).

Every error is a JSON `{"error": "..."}` with a 4xx status that says what was wrong; only a bug
can produce a 500, and it carries no traceback.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts_store.artifact import ArtifactError, artifact_bytes
from prompts_store.store import StoreError, UnknownTenant, hash_key, key_tenant
from service import images as image_io
from service import metrics
from service.batcher import Overloaded
from service.engine import Engine


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class NewTenant(BaseModel):
    id: str
    classes: list[str] = Field(min_length=1)
    theta: float | None = None


class TenantUpdate(BaseModel):
    classes: list[str] | None = None
    theta: float | None = None  # an explicit null returns θ to "auto" (the artifact's θ or the default)


class Rollback(BaseModel):
    version: int | None = None


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def _presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _is_admin(engine: Engine, key: str) -> bool:
    admin = engine.cfg.admin_key
    return bool(admin) and hmac.compare_digest(hash_key(admin), hash_key(key))


def require_admin(request: Request) -> None:
    engine, key = engine_of(request), _presented_key(request)
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <admin key>'")
    if not engine.cfg.admin_key:
        raise APIError(403, "admin endpoints are disabled: start the service with PROMPTFOLIO_ADMIN_KEY set")
    if not _is_admin(engine, key):
        raise APIError(403, "this endpoint needs the admin key")


def require_tenant(request: Request, tenant: str) -> str:
    """The tenant's own key or the admin key; 401 for a missing/invalid key, 403 for another tenant's."""
    engine, key = engine_of(request), _presented_key(request)
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <tenant key>'")
    if _is_admin(engine, key):
        engine.store.tenant(tenant)  # 404 for an unknown tenant
        return tenant
    owner = key_tenant(key)
    if owner is None or not engine.store.verify_key(owner, key):
        raise APIError(401, "invalid API key")
    if owner != tenant:
        raise APIError(403, f"this API key belongs to tenant {owner!r} and cannot act on tenant {tenant!r}")
    return tenant


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{what} {upload.filename!r} exceeds the {limit}-byte limit")
    return data


def tenant_info(engine: Engine, tenant: str) -> dict:
    record = engine.store.tenant(tenant)
    view = engine.view(tenant)
    return {"id": tenant, "classes": record.classes, "theta": record.theta, "effective_theta": view.theta,
            "global_version": view.global_version, "local_version": view.local_version,
            "local_versions": engine.store.versions(tenant), "created_at": record.created_at}


def create_app() -> FastAPI:
    app = FastAPI(title="PromptFolio", version="1", description="Per-tenant zero-shot classification with "
                  "federated portfolio prompts.")
    decode_pool: ThreadPoolExecutor | None = None

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.count_error(exc.status)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        status = 404 if isinstance(exc, UnknownTenant) else 400
        metrics.count_error(status)
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(ArtifactError)
    async def _artifact_error(request: Request, exc: ArtifactError):
        metrics.count_error(400)
        return JSONResponse({"error": f"invalid prompt artifact: {exc}"}, status_code=400)

    @app.exception_handler(image_io.ImageError)
    async def _image_error(request: Request, exc: image_io.ImageError):
        metrics.count_error(exc.status)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        metrics.count_error(503)
        return JSONResponse({"error": str(exc)}, status_code=503,
                            headers={"Retry-After": str(int(exc.retry_after_s + 0.999))})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        metrics.count_error(422)
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):  # θ out of range and friends
        metrics.count_error(400)
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        engine: Engine = request.app.state.engine
        length = request.headers.get("content-length")
        if request.url.path.endswith("/prompt"):
            limit = engine.cfg.max_upload_bytes + (64 << 10)
        else:
            limit = engine.cfg.max_images_per_request * engine.cfg.max_image_bytes + (64 << 10)
        if length is not None and (not length.isdigit() or int(length) > limit):
            return JSONResponse({"error": f"request body exceeds the {limit}-byte limit"}, status_code=413)
        return await call_next(request)

    # ---- public -----------------------------------------------------------------------------
    @app.get("/info")
    def info(request: Request) -> dict:
        engine = engine_of(request)
        enc = engine.encoder
        return {"arch": enc.arch, "weights": enc.source, "fingerprint": enc.fingerprint,
                "device": str(enc.device), "backend": engine.backend.name,
                "providers": engine.backend.providers, "text_width": enc.text_width,
                "image_size": enc.image_size, "global_version": engine.store.current_version(None) or 0,
                "cache": {"entries": len(engine.cache), "bytes": engine.cache.bytes,
                          "hits": engine.cache.hits, "misses": engine.cache.misses},
                "batching": {"batches": engine.batcher.batches, "images": engine.batcher.images,
                             "max_batch": engine.cfg.max_batch}}

    # ---- admin ------------------------------------------------------------------------------
    @app.post("/tenants", status_code=201, dependencies=[Depends(require_admin)])
    def register_tenant(request: Request, body: NewTenant) -> dict:
        engine = engine_of(request)
        key = engine.store.add_tenant(body.id, body.classes, body.theta)
        engine.warm(body.id)
        return {"id": body.id, "api_key": key, "classes": engine.store.tenant(body.id).classes, "theta": body.theta}

    @app.get("/tenants", dependencies=[Depends(require_admin)])
    def list_tenants(request: Request) -> dict:
        return {"tenants": engine_of(request).store.tenants()}

    @app.post("/global/prompt", status_code=201, dependencies=[Depends(require_admin)])
    async def publish_global(request: Request, file: UploadFile = File(...)) -> dict:
        engine = engine_of(request)
        data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
        meta = await run_in_threadpool(engine.store.put_bytes, data, None, "upload",
                                       engine.cfg.max_upload_bytes)
        return {"version": meta.version, "content_sha256": meta.content_sha256, "n_ctx": meta.n_ctx}

    @app.get("/global/prompt")
    def download_global(request: Request) -> Response:
        """The current global prompt artifact, for a late joiner to personalize against (any valid
        tenant key or the admin key); its version and content hash also in headers."""
        engine, key = engine_of(request), _presented_key(request)
        if key is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <tenant key>'")
        owner = key_tenant(key)
        if not _is_admin(engine, key) and (owner is None or not engine.store.verify_key(owner, key)):
            raise APIError(401, "invalid API key")
        stored = engine.store.load(None)
        if stored is None:
            raise APIError(404, "no global prompt has been published yet (the service uses the hand prompt "
                                "'a photo of a' until one is)")
        return Response(artifact_bytes(stored.ctx, stored.meta), media_type="application/octet-stream",
                        headers={"X-Prompt-Version": str(stored.meta.version),
                                 "X-Content-SHA256": stored.meta.content_sha256,
                                 "Content-Disposition":
                                     f'attachment; filename="global-v{stored.meta.version}.safetensors"'})

    @app.post("/global/rollback", dependencies=[Depends(require_admin)])
    def rollback_global(request: Request, body: Rollback) -> dict:
        return {"version": engine_of(request).store.rollback(None, body.version)}

    # ---- tenant -----------------------------------------------------------------------------
    @app.get("/tenants/{tenant}")
    def get_tenant(request: Request, tenant: str) -> dict:
        require_tenant(request, tenant)
        return tenant_info(engine_of(request), tenant)

    @app.patch("/tenants/{tenant}")
    def update_tenant(request: Request, tenant: str, body: TenantUpdate) -> dict:
        require_tenant(request, tenant)
        engine = engine_of(request)
        clear = "theta" in body.model_fields_set and body.theta is None
        engine.store.update_tenant(tenant, body.classes, body.theta, clear_theta=clear)
        engine.warm(tenant)
        return tenant_info(engine, tenant)

    @app.post("/tenants/{tenant}/prompt", status_code=201)
    async def upload_local(request: Request, tenant: str, file: UploadFile = File(...)) -> dict:
        require_tenant(request, tenant)
        engine = engine_of(request)
        data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
        meta = await run_in_threadpool(engine.store.put_bytes, data, tenant, "upload", engine.cfg.max_upload_bytes)
        await run_in_threadpool(engine.warm, tenant)  # features ready before we answer
        metrics.count_upload(tenant)
        return {"tenant": tenant, "version": meta.version, "content_sha256": meta.content_sha256,
                "n_ctx": meta.n_ctx, "theta": meta.theta}

    @app.post("/tenants/{tenant}/rollback")
    def rollback_local(request: Request, tenant: str, body: Rollback) -> dict:
        require_tenant(request, tenant)
        engine = engine_of(request)
        version = engine.store.rollback(tenant, body.version)
        engine.warm(tenant)
        return {"tenant": tenant, "version": version}

    @app.post("/tenants/{tenant}/classify")
    async def classify(request: Request, tenant: str, images: list[UploadFile] = File(...),
                       top_k: int = Form(5, ge=1, le=1000), theta: float | None = Form(None)) -> dict:
        nonlocal decode_pool
        require_tenant(request, tenant)
        engine = engine_of(request)
        if len(images) > engine.cfg.max_images_per_request:
            raise APIError(413, f"{len(images)} images exceed the limit of {engine.cfg.max_images_per_request} "
                                f"per request")
        if decode_pool is None:
            decode_pool = ThreadPoolExecutor(engine.cfg.decode_threads, thread_name_prefix="decode")
        loop = asyncio.get_running_loop()
        payloads = []
        for i, upload in enumerate(images):
            name = upload.filename or f"image {i}"
            image_io.check_content_type(upload.content_type, name)
            payloads.append((await _read_limited(upload, engine.cfg.max_image_bytes, "image"), name))
        tensors = await asyncio.gather(*[
            loop.run_in_executor(decode_pool, image_io.decode, data, name, engine.encoder.preprocess,
                                 engine.cfg.max_image_pixels, engine.encoder.image_size)
            for data, name in payloads])
        view = await run_in_threadpool(engine.view, tenant, theta)
        metrics.count_cache(view.cache_hit)
        feats = await engine.batcher.encode(torch.stack(tensors))
        ranked = engine.rank(view, feats, top_k)
        metrics.count_classify(tenant, len(tensors))
        return {"tenant": tenant, "global_version": view.global_version, "local_version": view.local_version,
                "theta": view.theta,
                "predictions": [{"file": name, "top": top} for (_, name), top in zip(payloads, ranked)]}

    return app
