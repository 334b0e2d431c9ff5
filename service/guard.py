"""Who may send a request, and how much: decided from the headers before any body byte is read.

FastAPI reads (and spools to disk) a whole body before it runs a route's dependencies, so a key
check inside a route comes too late: an unauthenticated client could stream gigabytes first. This
pure ASGI middleware sits in front of the routes and, per route, checks the key, refuses a
declared Content-Length over the route's limit, counts the bytes that actually stream in
(Content-Length or chunked alike) and answers 413 the moment the count passes the limit, and sheds
classify requests (503 + Retry-After) while the expected queue wait exceeds the deadline. A
refusal made before the body is read drops a small body (so closing cannot reset the connection
under the answer) and carries `Connection: close` past that, so the server stops reading.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping

from prompts_store.errors import StoreError, UnknownTenant
from prompts_store.keys import hash_key, key_tenant
from service import metrics
from service.batcher import Overloaded, RequestClock
from service.connections import ARRIVED

if TYPE_CHECKING:
    from service.engine import Engine

MULTIPART_SLACK = 64 << 10  # multipart boundaries, part headers and small form fields
# A refusal made before the body is read still reads (and drops) a small body: closing a socket with
# unread bytes makes the kernel send a reset, which can destroy the answer before the client reads it
# (seen as connections dropped without a response when bursts were shed). Larger bodies are not read.
DRAIN_BYTES = 256 << 10  # a refused body this small is read and dropped: the connection stays usable
DRAIN_S = 1.0  # for at most this long: a client that declared a body and sends none still gets its answer
AUTHORIZED = "promptfolio.authorized"  # scope key: (key, tenant) the guard accepted for this request
CLOCK = "promptfolio.clock"  # scope["state"] key: an admitted classify request's RequestClock


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


def is_admin(engine: Engine, key: str) -> bool:
    admin = engine.cfg.admin_key
    return bool(admin) and hmac.compare_digest(hash_key(admin), hash_key(key))


def check_admin(engine: Engine, key: str | None) -> None:
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <admin key>'")
    if not engine.cfg.admin_key:
        raise APIError(403, "admin endpoints are disabled: start the service with PROMPTFOLIO_ADMIN_KEY set")
    if not is_admin(engine, key):
        raise APIError(403, "this endpoint needs the admin key")


def check_tenant(engine: Engine, key: str | None, tenant: str) -> str:
    """The tenant's own key or the admin key; 401 for a missing/invalid key, 403 for another tenant's."""
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <tenant key>'")
    if is_admin(engine, key):
        engine.store.tenant(tenant)  # 404 for an unknown tenant
        return tenant
    owner = key_tenant(key)
    if owner is None or not engine.store.verify_key(owner, key):
        raise APIError(401, "invalid API key")
    if owner != tenant:
        raise APIError(403, f"this API key belongs to tenant {owner!r} and cannot act on tenant {tenant!r}")
    return tenant


def check_member(engine: Engine, key: str | None) -> None:
    """The admin key or any tenant's valid key (401 otherwise)."""
    if key is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <tenant or admin key>'")
    owner = key_tenant(key)
    if not is_admin(engine, key) and (owner is None or not engine.store.verify_key(owner, key)):
        raise APIError(401, "invalid API key")


@dataclass(frozen=True)
class Access:
    """What a route needs from the caller, and which body limit applies to it."""

    who: Literal["public", "admin", "tenant", "member"]  # member: the admin key or any tenant's valid key
    body: Literal["json", "upload", "classify"]
    tenant: str | None = None


def route_access(path: str, method: str = "POST") -> Access:
    """The API's route table as the guard sees it (paths relative to the API root, /v1)."""
    parts = [p for p in path.split("/") if p]
    if parts == ["tenants"]:
        return Access("admin", "json")
    if parts == ["global", "prompt"] and method == "GET":  # a late joiner reads the global it trains against
        return Access("member", "json")
    if len(parts) == 2 and parts[0] == "global":
        return Access("admin", "upload" if parts[1] == "prompt" else "json")
    if parts[:1] == ["tenants"] and len(parts) == 2 and method == "DELETE":
        return Access("admin", "json", parts[1])
    if parts[:1] == ["tenants"] and len(parts) in (2, 3):
        action = parts[2] if len(parts) == 3 else ""
        body = {"prompt": "upload", "classify": "classify"}.get(action, "json")
        return Access("tenant", body, parts[1])
    return Access("public", "json")


def body_limit(engine: Engine, access: Access) -> int:
    cfg = engine.cfg
    if access.body == "upload":
        return cfg.max_upload_bytes + MULTIPART_SLACK
    if access.body == "classify":
        return min(cfg.max_request_bytes, cfg.max_images_per_request * cfg.max_image_bytes + MULTIPART_SLACK)
    return cfg.max_json_bytes


def _authorize(engine: Engine, access: Access, key: str | None) -> None:
    """Raises APIError (401/403) or a StoreError (400 bad tenant id, 404 unknown tenant)."""
    if access.who == "admin":
        check_admin(engine, key)
    elif access.who == "tenant":
        check_tenant(engine, key, access.tenant or "")
    elif access.who == "member":
        check_member(engine, key)


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware: `app.add_middleware(RequestGuard)`; the engine is `app.state.engine`."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        engine: Engine = scope["app"].state.engine
        path, root = scope["path"], scope.get("root_path", "")
        access = route_access(path[len(root):] if root and path.startswith(root) else path, scope["method"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        has_body = headers.get("content-length", "0") != "0" or "chunked" in headers.get("transfer-encoding", "")
        limit = body_limit(engine, access)
        refusal = self._refusal(engine, access, headers, limit)
        if refusal is None and access.who == "tenant":  # the route need not read the key files again
            scope[AUTHORIZED] = (presented_key(headers), access.tenant)
        gate = engine.admission if refusal is None and access.body == "classify" else None
        clock = None
        if gate is not None:
            arrived = scope.get("state", {}).get(ARRIVED)  # stamped by service/connections.py
            now = time.monotonic()  # not loop.time(): see ARRIVED
            try:
                gate.admit(max(0.0, now - arrived) if arrived else 0.0)
                clock = RequestClock(arrived or now)  # its wait, less its own work, for shedding and the gate
                scope.setdefault("state", {})[CLOCK] = clock
            except Overloaded as e:  # shed before the body is read
                refusal = 503, str(e), {"Retry-After": str(max(1, round(e.retry_after_s)))}
                gate = None
        if refusal is not None:
            drained = not has_body or (_worth_draining(headers) and await _drain(receive, DRAIN_BYTES, DRAIN_S))
            await _respond(send, *refusal, close=not drained)
            return
        status = None
        try:
            status = await self._guarded(scope, receive, send, limit, clock)
        finally:
            if gate is not None:
                end = time.monotonic()
                gate.done(max(0.0, end - now - clock.own_work_s))
                if status == 200:
                    metrics.answered_seconds.observe(end - (arrived or now))

    @staticmethod
    def _refusal(engine: Engine, access: Access, headers: dict[str, str],
                 limit: int) -> tuple[int, str, dict[str, str] | None] | None:
        try:
            _authorize(engine, access, presented_key(headers))
        except APIError as e:
            return e.status, e.message, e.headers
        except StoreError as e:
            return (404 if isinstance(e, UnknownTenant) else 400), str(e), None
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body exceeds the {limit}-byte limit", None
        return None

    async def _guarded(self, scope, receive, send, limit: int, clock: RequestClock | None) -> int | None:
        """The app behind a byte count; returns the status it answered (None: no answer). The time
        spent waiting for the body's bytes is the client's upload: the request's own, on `clock`."""
        received, refused, started, status, body_done = 0, False, False, None, False

        async def counted_receive():
            nonlocal received, refused, body_done
            if refused:
                return {"type": "http.disconnect"}
            start = time.monotonic()
            message = await receive()
            if clock is not None and not body_done:
                clock.own_work_s += time.monotonic() - start
            if message["type"] == "http.request":
                body_done = not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise _BodyTooLarge()
            return message

        async def tracked_send(message):
            nonlocal started, status
            if refused:
                return  # the app's answer to the cut-off body; ours has gone out
            started = True
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except Exception:
            if not refused:
                raise
        if refused and not started:
            await _respond(send, 413, f"request body exceeds the {limit}-byte limit", None, close=True)
            return 413
        return status


def _worth_draining(headers: dict[str, str]) -> bool:
    """Whether to read a refused body before answering (else: answered at once, `Connection: close`,
    and the close lingers; service/connections.py). Not when the client sent `Expect: 100-continue`
    (it waits for the answer and sends nothing; reading would tell it to send, 100 Continue), nor
    when the body is declared larger than DRAIN_BYTES (read only to be dropped)."""
    if headers.get("expect", "").lower() == "100-continue":
        return False
    length = headers.get("content-length")
    return length is None or (length.isdigit() and int(length) <= DRAIN_BYTES)  # None: chunked


async def _drain(receive, limit: int, seconds: float) -> bool:
    """Read and discard up to `limit` body bytes for up to `seconds`; True when the body ended."""
    seen, deadline = 0, asyncio.get_running_loop().time() + seconds
    try:
        while seen <= limit:
            left = deadline - asyncio.get_running_loop().time()
            message = await asyncio.wait_for(receive(), max(left, 0.001))
            if message["type"] != "http.request":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return seen <= limit
    except asyncio.TimeoutError:
        pass
    return False


async def _respond(send, status: int, message: str, headers: dict[str, str] | None, close: bool) -> None:
    metrics.count_error(status)
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:  # the body was not read: the connection cannot carry another request
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
