"""The BentoML service: loads the encoder once per worker, then serves the REST API under /v1.

Run with `promptfolio serve`, or `bentoml serve service.service:PromptFolio --host 127.0.0.1`.
Configuration comes from PROMPTFOLIO_* environment variables (service/config.py).

Startup: BentoML imports this module twice, in the supervisor (only to read the service's
definition) and in each worker. Nothing heavy is imported at module level, so the supervisor never
pays for torch, open_clip or the API; the worker builds the REST app and the engine in
`__init__`, before BentoML reports it ready.
"""

from __future__ import annotations

import gc
import logging

import bentoml

from service import connections, metrics
from service.edges import API_PREFIX, UnroutablePaths, VersionedDocs

log = logging.getLogger("promptfolio.service")
# header/body read timeouts and a connection cap (uvicorn has none); the worker imports this module
# before it builds its uvicorn server, so the guarded protocol is the one that server uses
connections.install()
metrics.install()  # BentoML's request metrics labelled by route template, not by each tenant's URL


class LazyASGIApp:
    """The REST app, mounted at import time but built by the worker that serves it."""

    def __init__(self) -> None:
        self.app = None

    async def __call__(self, scope, receive, send) -> None:
        if self.app is None:  # only reachable before the worker finished starting
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
                await send({"type": "http.response.body", "body": b'{"error": "the service is starting"}'})
            return
        await self.app(scope, receive, send)


app = LazyASGIApp()


def quiet_collector(threshold: int) -> None:
    """Keep Python's cyclic garbage collector off the latency tail. A worker holds millions of
    long-lived objects (torch, open_clip, BentoML, the app), and every full collection walked them
    all: at 120% load, 330 ms pauses every ~3 s (measured with gc.callbacks), which set the p99 of
    every request caught in one. `gc.freeze()` moves what exists at start out of the collector's
    view (full collections: 40-80 ms, every ~1.3 s); a first threshold of 10,000 instead of 700
    makes collections rarer (none of the full ones in a 30 s run; young ones 10-17 ms)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, *gc.get_threshold()[1:])


# No access log line per request (a tenth of a small request's CPU; turn it on with
# BENTOML_CONFIG_OPTIONS="services.promptfolio.logging.access.enabled=true"), and no tracing spans
# while no tracing exporter is configured (set tracing.excluded_urls to "" with an exporter).
@bentoml.service(name="promptfolio", workers=1, traffic={"timeout": 120},
                 logging={"access": {"enabled": False}}, tracing={"excluded_urls": ".*"})
@bentoml.asgi_app(app, path=API_PREFIX)
class PromptFolio:
    """PromptFolio: per-tenant zero-shot image classification. The REST API, its schema and its own docs
    page are under /v1 (/v1/docs, /v1/openapi.json)."""

    def __init__(self) -> None:
        from service import images
        from service.api import create_app
        from service.config import ServiceConfig
        from service.engine import Engine

        cfg = ServiceConfig.from_env()
        self.engine = Engine(cfg)
        connections.configure(cfg)
        images.return_large_buffers_to_the_os()  # a large image's decode buffers do not stay resident
        api = create_app()
        api.state.engine = self.engine
        metrics.configure(cfg.tenant_metrics)
        metrics.use_routes(API_PREFIX, api.routes)
        app.app = api
        quiet_collector(cfg.gc_threshold)
        enc = self.engine.encoder
        log.warning("promptfolio ready: %s (%s) on %s, image backend %s with providers %s, fingerprint %s, "
                    "store %s, %d temporary files recovered", enc.arch, enc.source, enc.device,
                    self.engine.backend.name, self.engine.backend.providers, enc.fingerprint[:40], cfg.store,
                    self.engine.recovered_tmp_files)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.engine.batcher.close()
        self.engine.decode_pool.close()
        self.engine.text_worker.shutdown(wait=False, cancel_futures=True)


PromptFolio.add_asgi_middleware(UnroutablePaths)
PromptFolio.add_asgi_middleware(VersionedDocs)
