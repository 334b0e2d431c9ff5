"""The REST API (FastAPI, mounted into the BentoML service under /v1).

Every error is a JSON `{"error": "..."}` with a 4xx status that says what was wrong; only a bug
can produce a 500, and it carries no traceback.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompts_store.artifact import ArtifactError, artifact_bytes
from prompts_store.errors import StoreError, UnknownGlobal, UnknownTenant
from service import images as image_io
from service import metrics, writes
from service.batcher import Overloaded
from service.engine import Engine, TenantView
from service.guard import APIError, RequestGuard, check_admin, check_member, check_tenant, presented_key


THETA_OVERRIDE = ("Per-request θ in [0, 1] (default: the tenant's setting, else the θ its local artifact was "
                  "trained at). Mixing happens on features, so any θ is served exactly, but a local prompt is "
                  "trained together with its global at its training θ: only there is the answer the classifier "
                  "that was trained; θ=1 is 'local only' only for a prompt trained at θ=1.")

__all__ = ["APIError", "create_app", "require_admin", "require_tenant"]

# JSON booleans are not numbers here: `{"theta": false}` is a 422, not θ = 0
StrictTheta = Annotated[float, Strict(), Field(allow_inf_nan=False)]


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent no-op

    id: str
    classes: list[str] = Field(min_length=1)
    theta: StrictTheta | None = None


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent no-op

    classes: list[str] | None = None
    theta: StrictTheta | None = None  # an explicit null returns θ to "auto" (the artifact's θ or the default)


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent no-op

    version: StrictInt | None = None


class Repin(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent no-op

    # the global version to serve the tenant's local prompt with; null: follow the current global
    global_version: StrictInt | None = Field(ge=0)


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


# The RequestGuard middleware already decided these from the headers before the body was read;
# the routes check again (cheap) so a route is never reachable without its check.
def require_admin(request: Request) -> None:
    check_admin(engine_of(request), presented_key(request.headers))


def require_tenant(request: Request, tenant: str) -> str:
    """The tenant's own key or the admin key; 401 for a missing/invalid key, 403 for another tenant's."""
    return check_tenant(engine_of(request), presented_key(request.headers), tenant)


async def _read_limited(upload: UploadFile, limit: int, what: str) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise APIError(413, f"{what} {upload.filename!r} exceeds the {limit}-byte limit")
    return data


def tenant_info(engine: Engine, tenant: str, view: TenantView | None = None) -> dict:
    record = engine.store.tenant(tenant)
    view = view or engine.view(tenant)
    s = view.serving
    return {"id": tenant, "classes": record.classes, "theta": record.theta, "effective_theta": view.theta,
            "global_version": view.global_version, "local_version": view.local_version, "pinned": s.pinned,
            "trained_together": s.trained_together, "trained_with_global_sha256": s.trained_with_sha256,
            "trained_with_global_version": s.trained_with_version, "local_theta": s.local_theta,
            "local_versions": engine.store.versions(tenant), "created_at": record.created_at}


def _pair_warning(view: TenantView) -> list[str]:
    s = view.serving
    if s.local_version is not None and s.trained_together is False:
        return [f"local version {s.local_version} was not trained with global version {s.global_version}: "
                f"this pair was not trained together"]
    return []


def create_app() -> FastAPI:
    app = FastAPI(title="PromptFolio", version="1", description="Per-tenant zero-shot classification with "
                  "federated portfolio prompts.")
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.count_error(exc.status)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        status = 404 if isinstance(exc, UnknownTenant) else 409 if isinstance(exc, UnknownGlobal) else 400
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

    app.add_middleware(RequestGuard)  # auth and body limits from the headers, before any body is read

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
                             "max_batch": engine.cfg.max_batch},
                "admission": {"in_flight": engine.admission.in_flight, "shed": engine.admission.shed,
                              "expected_wait_s": round(engine.admission.expected_wait_s(), 3),
                              "deadline_s": engine.admission.deadline_s,
                              "mean_wait_before_app_s": round(engine.admission.waited_s, 3)}}

    # ---- admin ------------------------------------------------------------------------------
    @app.post("/tenants", status_code=201, dependencies=[Depends(require_admin)])
    def register_tenant(request: Request, body: NewTenant) -> dict:
        key, view = writes.register(engine_of(request), body.id, body.classes, body.theta)
        return {"id": body.id, "api_key": key, "classes": view.classes, **view.summary(), "theta": body.theta,
                "effective_theta": view.theta}

    @app.get("/tenants", dependencies=[Depends(require_admin)])
    def list_tenants(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     after: str | None = None) -> dict:
        # a page at a time from the store's index: a million tenants never travel in one answer
        page = engine_of(request).store.tenant_page(after, limit)
        return {"tenants": page, "next": page[-1] if len(page) == limit else None}

    @app.post("/global/prompt", status_code=201, dependencies=[Depends(require_admin)])
    async def publish_global(request: Request, file: UploadFile = File(...)) -> dict:
        engine = engine_of(request)
        data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
        result = await run_in_threadpool(writes.publish_global, engine, data)
        return {"version": result.meta.version, "content_sha256": result.meta.content_sha256,
                "n_ctx": result.meta.n_ctx, "notes": result.notes}

    @app.get("/global/prompt")
    def download_global(request: Request) -> Response:
        """The current global prompt artifact, for a late joiner to personalize against (any valid
        tenant key or the admin key); its version and content hash also in headers."""
        engine = engine_of(request)
        check_member(engine, presented_key(request.headers))
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
        return {"version": writes.rollback_global(engine_of(request), body.version)}

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
        view = writes.update_tenant(engine, tenant, body.classes, body.theta, clear)
        return tenant_info(engine, tenant, view)

    @app.post("/tenants/{tenant}/prompt", status_code=201)
    async def upload_local(request: Request, tenant: str, file: UploadFile = File(...),
                           allow_unpinned: bool = Form(False)) -> dict:
        require_tenant(request, tenant)
        engine = engine_of(request)
        data = await _read_limited(file, engine.cfg.max_upload_bytes, "artifact")
        # validated, features computed and persisted, then committed: served by the very next request
        result = await run_in_threadpool(writes.upload_local, engine, tenant, data, allow_unpinned)
        metrics.count_upload(tenant)
        meta = result.meta
        return {"tenant": tenant, "version": meta.version, "content_sha256": meta.content_sha256,
                "n_ctx": meta.n_ctx, "theta": meta.theta, "global_sha256": meta.global_sha256,
                **result.view.summary(), "notes": result.notes + _pair_warning(result.view)}

    @app.post("/tenants/{tenant}/rollback")
    def rollback_local(request: Request, tenant: str, body: Rollback) -> dict:
        require_tenant(request, tenant)
        view = writes.rollback_local(engine_of(request), tenant, body.version)
        return {"tenant": tenant, "version": view.local_version, **view.summary(), "notes": _pair_warning(view)}

    @app.post("/tenants/{tenant}/pin")
    def repin(request: Request, tenant: str, body: Repin) -> dict:
        require_tenant(request, tenant)
        view = writes.repin(engine_of(request), tenant, body.global_version)
        return {"tenant": tenant, **view.summary(), "notes": _pair_warning(view)}

    @app.post("/tenants/{tenant}/classify")
    async def classify(request: Request, tenant: str, images: list[UploadFile] = File(...),
                       top_k: int = Form(5, ge=1, le=1000),
                       theta: float | None = Form(None, description=THETA_OVERRIDE)) -> dict:
        require_tenant(request, tenant)
        engine = engine_of(request)
        if len(images) > engine.cfg.max_images_per_request:
            raise APIError(413, f"{len(images)} images exceed the limit of {engine.cfg.max_images_per_request} "
                                f"per request")
        payloads = []
        for i, upload in enumerate(images):
            name = upload.filename or f"image {i}"
            image_io.check_content_type(upload.content_type, name)
            payloads.append((await _read_limited(upload, engine.cfg.max_image_bytes, "image"), name))
        answer = await engine.classify(tenant, payloads, top_k, theta)
        metrics.count_classify(tenant, len(payloads))
        return answer

    return app
