"""The REST app (FastAPI, mounted into the BentoML service under /v1): routes, errors, guard, schema.

Routes live in service/routes.py, their models in service/schemas.py, the error answers in
service/errors.py; here they are put together. Every error is a JSON `{"error": "..."}`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import errors
from service.guard import APIError, RequestGuard
from service.routes import router
from service.schemas import ClassifyJSON

API_VERSION = "1"

__all__ = ["APIError", "API_VERSION", "create_app"]


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the JSON classify body (declared by hand: the route takes two content types)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                             servers=app.servers)
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ClassifyJSON"] = ClassifyJSON.model_json_schema(ref_template="#/components/schemas/{model}")
        app.openapi_schema = schema
    return app.openapi_schema


def create_app() -> FastAPI:
    """The app; the service sets `app.state.engine` before it serves a request."""
    app = FastAPI(title="PromptFolio", version=API_VERSION,
                  description="Per-tenant zero-shot image classification with federated portfolio prompts. "
                              "Every error is `{\"error\": \"...\"}`; send keys as `Authorization: Bearer <key>`.")
    errors.install(app)
    app.add_middleware(RequestGuard)  # auth and body limits from the headers, before any body is read
    app.include_router(router)
    app.openapi = lambda: _openapi(app)
    return app
