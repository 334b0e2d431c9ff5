"""promptfolio.client against the real server over HTTP.

`test_contract_*` need the routes of issue 12's REST contract (DELETE /v1/tenants/{tenant},
POST .../key, the paginated list, 409 on a second registration); on a server without them they skip.
"""


import socket

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from promptfolio import Client, PromptFolioError
from promptfolio.embedded import world
from promptfolio.prompts import init_context
from prompts_store.artifact import PromptMeta, artifact_bytes, read_artifact
from service_helpers import ADMIN_KEY, Server, png_bytes

CLASSES = ["red circle", "blue star", "green square", "yellow triangle", "purple cross", "orange circle"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("client")
    srv = Server(base / "store", base / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    with Client(server.url, admin_key=ADMIN_KEY) as client:
        yield client


@pytest.fixture(scope="module")
def acme(server, admin):
    registered = admin.register("acme", CLASSES)
    assert registered.tenant == "acme" and registered.api_key.startswith("pf.acme.")
    with Client(server.url + "/v1/", key=registered.api_key) as client:  # a URL ending in /v1 works
        yield client


def needs_contract(server) -> None:
    paths = httpx.get(f"{server.url}/v1/openapi.json").json()["paths"]
    if not any(p.startswith("/tenants/") and "delete" in ops for p, ops in paths.items()):
        pytest.skip("the server has not the issue-12 routes yet (no DELETE /v1/tenants/{tenant})")


def clean_images(n=6, seed=0):
    labels = [world.CLASS_NAMES.index(CLASSES[i % len(CLASSES)]) for i in range(n)]
    images, _ = world.task_dataset(n, world.calibrated("clean"), seed, labels=labels)
    return images


def local_artifact(encoder, seed, theta=1.0):
    ctx = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
    return artifact_bytes(ctx, PromptMeta(kind="local", tenant="acme", encoder=encoder.fingerprint,
                                          n_ctx=4, width=ctx.shape[1], theta=theta))


def test_classify_accepts_paths_bytes_pil_and_arrays(acme, tmp_path):
    images = clean_images()
    path = tmp_path / "first.png"
    path.write_bytes(png_bytes(images[0]))
    inputs = [path, str(path), png_bytes(images[0]), Image.fromarray(images[0]), images[0], images[0] / 255.0]
    answer = acme.classify(inputs, top_k=3)
    assert answer.tenant == "acme" and answer.global_version == 0 and answer.local_version is None
    assert [p.file for p in answer.predictions[:2]] == ["first.png", "first.png"]
    tops = [[(t.label, t.score) for t in p.top] for p in answer.predictions]
    assert all(len(t) == 3 for t in tops)
    for other in tops[1:]:  # the same pixels, however they were given (PNG is lossless)
        assert [label for label, _ in other] == [label for label, _ in tops[0]]
        assert np.allclose([s for _, s in other], [s for _, s in tops[0]], atol=1e-6)
    # one image alone (not in a list), and the zero-shot labels of all six classes
    assert acme.classify(images[1], top_k=1).predictions[0].top[0].label == CLASSES[1]
    labels = [p.top[0].label for p in acme.classify(list(images), top_k=1).predictions]
    assert sum(a == b for a, b in zip(labels, CLASSES)) >= 5


def test_tenant_lifecycle(acme, admin, embedded_encoder, tmp_path):
    info = acme.tenant_info()
    assert info.tenant == "acme" and info.classes == CLASSES and info.theta is None and info.local_versions == []
    assert acme.set_theta(0.3).theta == 0.3
    assert acme.set_theta(None).theta is None
    assert acme.set_classes(CLASSES + ["green cross"]).classes[-1] == "green cross"

    (tmp_path / "v1.safetensors").write_bytes(local_artifact(embedded_encoder, 1))
    first = acme.upload_local(tmp_path / "v1.safetensors")
    assert first.version == 1 and first.tenant == "acme"
    second = acme.upload_local(local_artifact(embedded_encoder, 2, theta=0.5))
    assert second.version == 2
    served = acme.classify(clean_images(1))
    assert served.local_version == 2 and served.theta == 0.5
    back = acme.rollback()
    assert back.local_version == 1 and back.theta == 1.0
    assert acme.tenant_info().local_versions == [1, 2]

    ctx = init_context(embedded_encoder, n_ctx=4, generator=torch.Generator().manual_seed(9))
    published = admin.publish_global(artifact_bytes(ctx, PromptMeta(
        kind="global", encoder=embedded_encoder.fingerprint, n_ctx=4, width=ctx.shape[1])))
    assert published.version == 1 and published.tenant is None
    downloaded = acme.download_global(tmp_path / "global.safetensors")
    assert downloaded.version == 1 and downloaded.content_sha256 == published.content_sha256
    assert torch.equal(read_artifact((tmp_path / "global.safetensors").read_bytes())[0], ctx)
    assert acme.pin(None).global_version == 1  # follow the current global
    with pytest.raises(PromptFolioError, match="no earlier version") as e:
        admin.rollback_global()
    assert e.value.status in (400, 409)  # 409 (a conflict with the state) from the issue-12 server on
    assert "acme" in admin.list_tenants().tenants and "acme" in list(admin.iter_tenants())


def test_every_failure_is_one_exception_type(server, admin, acme, tmp_path):
    silent = socket.socket()  # accepts connections (the kernel does) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    cases = [
        (lambda: Client(server.url, key="pf.acme.not-the-key").tenant_info(), 401, "invalid API key"),
        (lambda: acme.tenant_info("globex"), 403, "cannot act on tenant 'globex'"),
        (lambda: admin.tenant_info("nobody"), 404, "unknown tenant"),
        (lambda: acme.upload_local(b"\x89PNG\r\n\x1a\n" + b"\0" * 64), 400, "not a safetensors file"),
        (lambda: acme.classify(b"not an image"), 400, "not a decodable image"),
        (lambda: acme.set_theta(2.0), (400, 422), r"θ must be in \[0, 1\]|theta: Input should be less than"),
        (lambda: acme.list_tenants(), None, "needs the admin key"),  # refused before sending
        (lambda: acme.classify([]), None, "at least one image"),
        (lambda: acme.classify(tmp_path / "missing.png"), None, "no such image file"),
        (lambda: acme.classify(np.zeros((4, 4, 7), np.uint8)), None, "not H×W"),
        (lambda: Client("http://127.0.0.1:9/v1", key=acme.key).tenant_info(), None,
         "cannot connect to http://127.0.0.1:9 "),
        (lambda: Client(server.url + "/api", key=acme.key).tenant_info(), 404, "check the service URL"),
        (lambda: Client(server.url + "/v1/tenants/acme", key=acme.key), None, "drop everything after /v1"),
        (lambda: Client(f"http://127.0.0.1:{silent.getsockname()[1]}", key=acme.key, timeout=0.5).tenant_info(),
         None, r"no answer from .* within 0.5 s \(timeout\)"),
    ]
    for call, status, message in cases:
        with pytest.raises(PromptFolioError, match=message) as e:
            call()
        assert e.value.status in (status if isinstance(status, tuple) else (status,)), e.value
    silent.close()


def test_contract_register_answers_tenant_and_409(server, admin):
    needs_contract(server)
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "initech", "classes": ["red circle"]},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 201 and r.json()["tenant"] == "initech" and "id" not in r.json()
    with pytest.raises(PromptFolioError) as e:
        admin.register("initech", ["blue star"])
    assert e.value.status == 409


def test_contract_rotate_and_delete(server, admin, acme):
    needs_contract(server)
    old = admin.register("umbrella", ["red circle", "blue star"]).api_key
    with Client(server.url, key=old) as umbrella:
        rotated = umbrella.rotate_key()
        assert rotated.tenant == "umbrella" and rotated.api_key != old and umbrella.key == rotated.api_key
        assert umbrella.tenant_info().tenant == "umbrella"  # the new key works
        with pytest.raises(PromptFolioError) as e:
            Client(server.url, key=old).tenant_info()
        assert e.value.status == 401
        by_admin = admin.rotate_key("umbrella")
        assert Client(server.url, key=by_admin.api_key).tenant_info().tenant == "umbrella"

    before = acme.classify(clean_images(2))
    assert admin.delete_tenant("umbrella") is None
    with pytest.raises(PromptFolioError) as e:
        admin.tenant_info("umbrella")
    assert e.value.status == 404
    with pytest.raises(PromptFolioError) as e:
        admin.delete_tenant("umbrella")
    assert e.value.status == 404
    assert "umbrella" not in admin.iter_tenants()
    assert acme.classify(clean_images(2)) == before  # nothing of another tenant was touched


def test_contract_pagination(server, admin):
    needs_contract(server)
    for i in range(5):
        admin.register(f"page-{i}", ["red circle"])
    every = list(admin.iter_tenants(page_size=2))
    assert every == sorted(every) and {f"page-{i}" for i in range(5)} <= set(every)
    first = admin.list_tenants(limit=2)
    assert len(first.tenants) == 2 and first.next == first.tenants[-1]
    rest = admin.list_tenants(limit=1000, after=first.next)
    assert first.tenants + rest.tenants == every and rest.next is None
    for limit in (0, 1001):
        with pytest.raises(PromptFolioError) as e:
            admin.list_tenants(limit=limit)
        assert e.value.status == 422


def test_a_client_given_a_tenant_key_stays_that_tenant_and_a_bad_key_is_named(monkeypatch):
    """With PROMPTFOLIO_ADMIN_KEY in the environment, a client built with a tenant key does not turn
    admin behind the user's back; a key that names no tenant is said to be the problem."""
    monkeypatch.setenv("PROMPTFOLIO_ADMIN_KEY", "admin-in-env")
    monkeypatch.delenv("PROMPTFOLIO_KEY", raising=False)
    with pytest.raises(PromptFolioError, match="needs the admin key"):
        Client("http://127.0.0.1:9", key="pf.acme.secret").list_tenants()  # refused before any request
    assert Client("http://127.0.0.1:9").admin_key == "admin-in-env"  # an admin client still reads it
    with pytest.raises(PromptFolioError, match="does not name a tenant"):
        Client("http://127.0.0.1:9", key="garbage").tenant_info()


def test_malformed_json_is_reported_against_the_body_not_a_character_offset():
    from service.errors import format_validation

    assert format_validation([{"type": "json_invalid", "loc": ("body", 16), "msg": "JSON decode error"}]) \
        == "body: JSON decode error"
    assert format_validation([{"type": "json_invalid", "loc": (), "msg": "Invalid JSON: EOF"}]) == "body: Invalid JSON: EOF"
    assert format_validation([{"type": "missing", "loc": ("body", "classes"), "msg": "Field required"}]) \
        == "body.classes: Field required"
