"""/metrics on the real server: route templates instead of tenant URLs, and the batcher made visible."""

import re

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from service import metrics
from service_helpers import ADMIN_KEY, Server, auth, png_bytes
from test_service import ACME, images_for

MAX_BATCH = 4
TENANTS = ("metrics-alpha", "metrics-beta")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """A fresh server (max batch 4); known requests; then one scrape of /metrics."""
    base = tmp_path_factory.mktemp("metrics")
    server = Server(base / "store", base / "server.log", PROMPTFOLIO_MAX_BATCH=str(MAX_BATCH),
                    PROMPTFOLIO_MAX_WAIT_MS="1").start()
    try:
        keys = {}
        for tenant in TENANTS:
            r = httpx.post(f"{server.url}/v1/tenants", json={"id": tenant, "classes": ACME}, headers=auth(ADMIN_KEY))
            assert r.status_code == 201, r.text
            keys[tenant] = r.json()["api_key"]
        images = images_for(ACME, n=10)
        sent = []
        for tenant, n in ((TENANTS[0], 1), (TENANTS[1], 3), (TENANTS[0], 10)):  # one at a time: known batches
            files = [("images", (f"i{i}.png", images[i], "image/png")) for i in range(n)]
            r = httpx.post(f"{server.url}/v1/tenants/{tenant}/classify", files=files, headers=auth(keys[tenant]),
                           timeout=60)
            assert r.status_code == 200, r.text
            sent.append(n)
        assert httpx.get(f"{server.url}/v1/tenants/{TENANTS[1]}/nothing-here", headers=auth(keys[TENANTS[1]])
                         ).status_code == 404
        text = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    return text, sent


def samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric's samples."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{.*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def test_request_metrics_use_route_templates_and_name_no_tenant(scraped):
    text, sent = scraped
    labelled = [line for line in text.splitlines() if not line.startswith("#") and "{" in line]
    assert labelled
    for tenant in TENANTS:  # no tenant id in any label (tenant_metrics is off by default)
        assert not [line for line in labelled if tenant in line], tenant
    totals = samples(text, "bentoml_service_request_total")
    classify = [v for k, v in totals.items() if 'endpoint="/v1/tenants/{tenant}/classify"' in k
                and 'http_response_code="200"' in k]
    assert classify == [len(sent)]
    assert any('endpoint="{unmatched}"' in k and 'http_response_code="404"' in k for k in totals)
    endpoints = {re.search(r'endpoint="([^"]*)"', k).group(1) for k in totals}
    assert {"/v1/tenants", "/v1/tenants/{tenant}/classify", "{unmatched}"} <= endpoints
    assert all(e in metrics.ROOT_ROUTES or e == metrics.UNMATCHED or e.startswith("/v1") for e in endpoints)
    assert samples(text, "promptfolio_tenant_requests_total") == {}
    assert samples(text, "promptfolio_classified_images_total") == {"": sum(sent)}


def test_batcher_histograms_and_split_into_max_batch_pieces(scraped):
    text, sent = scraped
    # requests of 1, 3 and 10 images, one at a time, max batch 4: batches 1 | 3 | 4, 4, 2
    expected_batches = sum(-(-n // MAX_BATCH) for n in sent)
    size = samples(text, "promptfolio_batch_size_images_bucket")
    assert samples(text, "promptfolio_batch_size_images_count") == {"": expected_batches}
    assert samples(text, "promptfolio_batch_size_images_sum") == {"": sum(sent)}
    assert size['{le="4.0"}'] == expected_batches  # none larger than max_batch
    assert size['{le="2.0"}'] == 2 and size['{le="1.0"}'] == 1  # the 1-image batch and the last 2 of the 10
    assert samples(text, "promptfolio_encoder_seconds_count") == {"": expected_batches}
    assert samples(text, "promptfolio_encoder_seconds_sum")[""] > 0
    assert samples(text, "promptfolio_encoder_cpu_seconds_total")[""] > 0
    assert samples(text, "promptfolio_queue_wait_seconds_count") == {"": expected_batches}  # one per request and batch
    assert samples(text, "promptfolio_queue_depth_images") == {"": 0.0}  # all answered
    # the three classify requests answered 200, timed from their bytes arriving; the 404 is not one
    assert samples(text, "promptfolio_classify_answered_seconds_count") == {"": len(sent)}
    answered = samples(text, "promptfolio_classify_answered_seconds_sum")[""]
    assert 0 < answered < 60


def test_route_templates_and_the_per_tenant_setting():
    class Route:
        def __init__(self, path):
            self.path, self.path_regex = path, re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")

    metrics.use_routes("/v1", [Route("/tenants"), Route("/tenants/{tenant}"), Route("/tenants/{tenant}/classify")])
    assert metrics.route_template("/v1/tenants/clinic-1/classify") == "/v1/tenants/{tenant}/classify"
    assert metrics.route_template("/v1/tenants/clinic-1") == "/v1/tenants/{tenant}"
    assert metrics.route_template("/v1/tenants/a/b/c") == metrics.UNMATCHED
    assert metrics.route_template("/livez") == "/livez" and metrics.route_template("/x/y") == metrics.UNMATCHED
    registry = CollectorRegistry()
    registry.register(metrics._requests)
    metrics.count_classify("quiet", 2)
    metrics.configure(tenant_metrics=True)
    try:
        metrics.count_classify("loud", 2)
    finally:
        metrics.configure(tenant_metrics=False)
    text = generate_latest(registry).decode()
    assert 'tenant="loud"' in text and 'tenant="quiet"' not in text
