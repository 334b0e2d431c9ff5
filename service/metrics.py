"""Prometheus metrics with bounded cardinality, beside BentoML's own (all served at /metrics).

Request metrics: BentoML 1.4 labels its HTTP metrics (`bentoml_service_request_total`,
`..._duration_seconds`, `..._in_progress`) with the raw URL path (`scope["path"]`, read in
`RunnerTrafficMetricsMiddleware`; no setting changes that), so every tenant's URL would become
its own series. `install()` swaps that middleware for a subclass that hands it the route template
instead (`/v1/tenants/{tenant}/classify`; paths that match no route: `{unmatched}`), keeping
BentoML's metric names and labels. Per-tenant counters exist only with `tenant_metrics` on.

The batcher (what Triton users look at): queue depth, batch size, queue wait, encoder time and CPU
per batch. Metrics are created at import in the worker, after BentoML has set up Prometheus'
multiprocess folder, so every worker's values are summed at /metrics.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from prometheus_client import Counter, Gauge, Histogram

UNMATCHED = "{unmatched}"
# BentoML's own routes at the root; anything else outside the API is {unmatched}
ROOT_ROUTES = frozenset({"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json"})
_RAW_PATH = "promptfolio.raw_path"  # scope key: the real path while BentoML's middleware sees the template

_per_tenant = False
_routes: list[tuple[str, re.Pattern, str]] = []  # (mount prefix, path regex, template) of the API's routes

_requests = Counter("promptfolio_tenant_requests", "Classify requests per tenant (tenant_metrics on)", ["tenant"])
_images = Counter("promptfolio_tenant_images", "Images classified per tenant (tenant_metrics on)", ["tenant"])
_uploads = Counter("promptfolio_tenant_uploads", "Local prompt uploads per tenant (tenant_metrics on)", ["tenant"])
_classified = Counter("promptfolio_classified_images", "Images classified (all tenants)")
_cache = Counter("promptfolio_feature_cache", "Tenant feature cache lookups", ["result"])
_errors = Counter("promptfolio_errors", "Error responses by status", ["status"])

queue_depth = Gauge("promptfolio_queue_depth_images", "Images waiting for or in the encoder",
                    multiprocess_mode="livesum")
batch_size = Histogram("promptfolio_batch_size_images", "Images per encoder call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
queue_wait = Histogram("promptfolio_queue_wait_seconds", "From a request's images entering the encoder queue to "
                       "the start of the batch that encodes them (once per request and batch)",
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
answered_seconds = Histogram("promptfolio_classify_answered_seconds", "Classify requests answered 200: from their "
                             "bytes arriving (the kernel's record, so the accept queue counts) to the answer "
                             "written", buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.025, 1.05,
                                                 1.1, 1.2, 1.5, 2, 3, 5, 10, 30, 60))
encoder_seconds = Histogram("promptfolio_encoder_seconds", "Encoder wall time per batch",
                            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10))
encoder_cpu = Counter("promptfolio_encoder_cpu_seconds", "CPU time of the thread that calls the encoder (all "
                      "of the encoder's CPU when it runs on that thread: encoder_threads 1)")


def configure(tenant_metrics: bool) -> None:
    global _per_tenant
    _per_tenant = tenant_metrics


def use_routes(prefix: str, routes: Iterable[Any]) -> None:
    """Label requests under `prefix` by these (Starlette/FastAPI) routes' templates."""
    _routes[:] = [(prefix, r.path_regex, prefix + r.path) for r in _flat(routes)]


def _flat(routes: Iterable[Any]) -> Iterable[Any]:
    """Routes with a path regex; FastAPI >= 0.138 keeps an included router as one lazy entry."""
    for route in routes:
        if hasattr(route, "path_regex"):
            yield route
        elif hasattr(route, "original_router"):
            yield from _flat(route.original_router.routes)


def route_template(path: str) -> str:
    """The route template a path belongs to; a bounded set of values whatever paths arrive."""
    if path in ROOT_ROUTES:
        return path
    for prefix, regex, template in _routes:
        if path.startswith(prefix) and regex.match(path[len(prefix):]):
            return template
    return UNMATCHED


def count_classify(tenant: str, n_images: int) -> None:
    _classified.inc(n_images)
    if _per_tenant:
        _requests.labels(tenant=tenant).inc()
        _images.labels(tenant=tenant).inc(n_images)


def count_upload(tenant: str) -> None:
    if _per_tenant:
        _uploads.labels(tenant=tenant).inc()


def count_cache(hit: bool) -> None:
    _cache.labels(result="hit" if hit else "miss").inc()


def count_error(status: int) -> None:
    _errors.labels(status=str(status)).inc()


class _RestorePath:
    """Inside BentoML's metrics middleware: the app sees the real path again."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if _RAW_PATH in scope:
            scope["path"] = scope.pop(_RAW_PATH)
        await self.app(scope, receive, send)


def install() -> bool:
    """Make BentoML build its HTTP metrics middleware with route templates (call at import, before the
    worker builds its app; False if this BentoML has no such middleware)."""
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:
        return False
    base = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None or getattr(base, "route_templates", False):
        return base is not None

    class RouteTemplateMetricsMiddleware(base):
        route_templates = True

        def __init__(self, app, *args, **kwargs) -> None:
            super().__init__(_RestorePath(app), *args, **kwargs)

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http" and scope["path"] != "/metrics":
                template = route_template(scope["path"])
                scope = {**scope, "path": template, _RAW_PATH: scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = RouteTemplateMetricsMiddleware
    return True
