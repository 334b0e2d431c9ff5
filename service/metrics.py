"""Prometheus metrics beside BentoML's own (served at /metrics, multiprocess-aware through BentoML)."""

from __future__ import annotations

from prometheus_client import Counter

_requests = Counter(
    name="promptfolio_tenant_requests", documentation="Classify requests per tenant", labelnames=["tenant"])
_images = Counter(
    name="promptfolio_tenant_images", documentation="Images classified per tenant", labelnames=["tenant"])
_uploads = Counter(
    name="promptfolio_tenant_uploads", documentation="Local prompt uploads per tenant", labelnames=["tenant"])
_cache = Counter(
    name="promptfolio_feature_cache", documentation="Tenant feature cache lookups", labelnames=["result"])
_errors = Counter(
    name="promptfolio_errors", documentation="Error responses by status", labelnames=["status"])


def count_classify(tenant: str, n_images: int) -> None:
    _requests.labels(tenant=tenant).inc()
    _images.labels(tenant=tenant).inc(n_images)


def count_upload(tenant: str) -> None:
    _uploads.labels(tenant=tenant).inc()


def count_cache(hit: bool) -> None:
    _cache.labels(result="hit" if hit else "miss").inc()


def count_error(status: int) -> None:
    _errors.labels(status=str(status)).inc()
