"""Two small ASGI middlewares around the whole BentoML app (its own routes included).

Light on purpose: BentoML's supervisor imports service/service.py, which installs these.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version

API_PREFIX = "/v1"


def service_version() -> str:
    try:
        return version("promptfolio")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class UnroutablePaths:
    """A /v1 path with a line break in it (`%0A`) escapes BentoML's mount (its pattern's `.` stops at a
    newline), which would answer a plain-text 404: answer it in the API's JSON error shape instead."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith(API_PREFIX + "/") and ("\n" in path or "\r" in path):
            await _send_json(send, 404, {"error": f"no route {scope['method']} {path!r}"})
            return
        await self.app(scope, receive, send)


class VersionedDocs:
    """BentoML's own page at `/` shows the version of a built Bento's tag, and "None" for a service served
    from source (`bentoml serve module:Service`, as `promptfolio serve` does): there, its schema
    (`/docs.json`) gets the package's version instead."""

    def __init__(self, app) -> None:
        self.app = app
        self.version = service_version()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/docs.json":
            await self.app(scope, receive, send)
            return
        start, chunks = {}, []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        try:
            spec = json.loads(body)
            if spec.get("info", {}).get("version") in (None, "None"):
                spec["info"]["version"] = self.version
                body = json.dumps(spec).encode()
        except (ValueError, AttributeError, TypeError):
            pass  # not the JSON we expect: pass it on unchanged
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})
