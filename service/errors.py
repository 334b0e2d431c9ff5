"""Every failure as `{"error": "..."}` with the status that says what was wrong.

A 4xx names the problem; 503 carries Retry-After; 405 carries Allow. Only a bug can produce a
500, and it carries no traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from prompts_store.artifact import ArtifactError
from prompts_store.errors import (
    NothingToRollBack, StoreError, TenantExists, UnknownGlobal, UnknownTenant, UnknownVersion, Unservable,
)
from service import metrics
from service.batcher import Overloaded
from service.guard import APIError
from service.images import ImageError
from service.schemas import ErrorBody

log = logging.getLogger("promptfolio.service")
STATUS_MEANING = {
    400: "Bad input: a malformed image or artifact, an invalid tenant id, a write that cannot be served",
    401: "Missing or invalid API key",
    403: "The key may not act here (another tenant's key, or not the admin key)",
    404: "Unknown tenant or version, or no global prompt published yet",
    405: "Method not allowed here (see the Allow header)",
    409: "Conflicts with the store's state: the tenant exists, no earlier version to roll back to, the pinned "
         "global is unknown, or the prompts could not serve the result (class names too long for the context, "
         "non-finite scores)",
    413: "Too large: body, image, pixels or number of images",
    415: "Not an image content type or format",
    422: "The request does not match the schema",
    503: "Overloaded or starting: retry after the Retry-After header's seconds",
}


def responses(*statuses: int) -> dict[int | str, dict]:
    """The error answers a route documents (`responses=` of a route decorator)."""
    return {status: {"model": ErrorBody, "description": STATUS_MEANING[status]} for status in statuses}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.count_error(status)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def format_validation(errors: list[dict]) -> str:
    """Pydantic's errors as one line: `body.classes.0: String should match pattern ...; ...`."""
    return "; ".join(f"{_where(e)}: {e['msg']}" for e in errors)


def _where(error: dict) -> str:
    """The field an error names; a malformed JSON body is `body` (pydantic puts a character offset there)."""
    if error.get("type") == "json_invalid":
        return "body"
    return ".".join(str(p) for p in error["loc"]) or "body"


def store_status(exc: StoreError) -> int:
    if isinstance(exc, (UnknownTenant, UnknownVersion)):
        return 404
    # a well-formed write that the store's state cannot take: an existing id, a global the store lacks, class
    # names too long for the served prompts' context, a global that would break tenants following it
    if isinstance(exc, (UnknownGlobal, TenantExists, Unservable, NothingToRollBack)):
        return 409
    return 400


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    return error_response(store_status(exc), str(exc))


async def _artifact_error(request: Request, exc: ArtifactError) -> JSONResponse:
    return error_response(400, f"invalid prompt artifact: {exc}")


async def _image_error(request: Request, exc: ImageError) -> JSONResponse:
    return error_response(exc.status, str(exc))


async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return error_response(503, str(exc), {"Retry-After": str(int(exc.retry_after_s + 0.999))})


async def _validation(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/json" and any(tuple(e["loc"]) == ("body",) for e in exc.errors()):
        # e.g. curl -d without -H 'Content-Type: application/json': the body was not read as JSON at all
        return error_response(422, f"invalid request: send the body as JSON with 'Content-Type: application/json' "
                                   f"(got {kind or 'no content type'!r})")
    return error_response(422, f"invalid request: {format_validation(exc.errors())}")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on this path (Starlette's 405 names only the first route's)."""
    methods, routes = set(), list(request.app.router.routes)
    while routes:
        route = routes.pop()
        included = getattr(route, "original_router", None)  # FastAPI keeps an included router whole
        if included is not None:
            routes.extend(included.routes)
        elif route.matches({**request.scope, "method": "*"})[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):  # FastAPI's json.loads, wrapped
        return error_response(422, "invalid request: body: JSON nested too deeply")  # as other malformed JSON
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
    message = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, headers)


async def _value_error(request: Request, exc: ValueError) -> JSONResponse:  # θ out of range and friends
    return error_response(400, str(exc))


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client closed the connection (or sent what the HTTP parser refused) before its body was
    read: nobody reads an answer. One log line, not three tracebacks any client could cause at will."""
    log.info("client went away during the body of %s %s", request.method, request.url.path)
    return Response(status_code=400)  # never delivered


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """Only a bug gets here: logged with its traceback, answered in the same JSON shape without one."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (logged by the service)")


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(ArtifactError, _artifact_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(ValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ValueError, _value_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _bug)
