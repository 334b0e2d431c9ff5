"""The REST contract over HTTP against the real server: typed schema, error shape, the tenant
lifecycle (register, rotate key, delete, page), JSON classify, and a bounded schemathesis fuzz."""

import base64
import sys

import httpx
import numpy as np
import pytest
import torch

from conftest import REPO
from promptfolio.prompts import init_context
from prompts_store.artifact import PromptMeta, artifact_bytes
from service_helpers import ADMIN_KEY, Server, auth, png_bytes
from test_service import ACME, GLOBEX, images_for

sys.path.insert(0, str(REPO / "bench"))
import fuzz  # noqa: E402  (bench/fuzz.py: the long run's harness, run bounded here)

MAX_IMAGES = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("api")
    srv = Server(base / "store", base / "server.log", PROMPTFOLIO_MAX_IMAGES_PER_REQUEST=str(MAX_IMAGES)).start()
    yield srv
    srv.stop()


def register(server, tenant, classes=ACME, **body):
    return httpx.post(f"{server.url}/v1/tenants", json={"tenant": tenant, "classes": classes, **body},
                      headers=auth(ADMIN_KEY))


def local_artifact(encoder, seed):
    ctx = init_context(encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
    return artifact_bytes(ctx, PromptMeta(kind="local", tenant="x", encoder=encoder.fingerprint, n_ctx=4,
                                          width=ctx.shape[1], theta=0.5))


def upload(server, tenant, key, data):
    return httpx.post(f"{server.url}/v1/tenants/{tenant}/prompt", headers=auth(key),
                      files={"file": ("p.safetensors", data, "application/octet-stream")}, timeout=60)


def test_schema_is_typed_documented_and_secured(server):
    schema = httpx.get(f"{server.url}/v1/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["HTTPBearer"][
            "description"]}
    for path, item in schema["paths"].items():
        for method, op in item.items():
            ok = next(code for code in op["responses"] if code.startswith("2"))
            content = op["responses"][ok].get("content", {})
            if ok != "204":  # every success answer names its model (or is the binary artifact)
                assert any("$ref" in c["schema"] or c["schema"].get("format") == "binary" for c in content.values()), \
                    (method, path)
            errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
            if path != "/info":
                assert "401" in errors and op["security"] == [{"HTTPBearer": []}], (method, path)
            for r in errors.values():
                assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    new_tenant = schema["components"]["schemas"]["NewTenant"]["properties"]
    assert new_tenant["tenant"]["pattern"] and new_tenant["classes"]["minItems"] == 1
    assert new_tenant["classes"]["items"]["minLength"] == 1
    classify = schema["paths"]["/tenants/{tenant}/classify"]["post"]["requestBody"]["content"]
    assert set(classify) == {"multipart/form-data", "application/json"}
    assert httpx.get(f"{server.url}/docs.json").json()["info"]["version"] not in ("None", None)


def test_errors_are_json_with_the_right_status(server):
    r = httpx.get(f"{server.url}/v1/no/such/route")
    assert r.status_code == 404 and r.json()["error"].startswith("no route GET")
    r = httpx.get(f"{server.url}/v1/tenants/a%0Ab/x", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and "error" in r.json()
    assert register(server, "dup").status_code == 201
    r = httpx.put(f"{server.url}/v1/tenants/dup", headers=auth(ADMIN_KEY))
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PATCH" and "not allowed" in r.json()["error"]
    r = register(server, "dup")
    assert r.status_code == 409 and "already exists" in r.json()["error"]
    for bad in ({"tenant": "Bad!", "classes": ["a"]}, {"tenant": "x", "classes": []}, {"tenant": "x", "classes": [""]},
                {"tenant": "x", "classes": ["a", "a"]}, {"tenant": "x", "classes": [" a"]},
                {"tenant": "x", "classes": ["a"], "theta": 1.5}):
        r = httpx.post(f"{server.url}/v1/tenants", json=bad, headers=auth(ADMIN_KEY))
        assert r.status_code in (400, 422) and r.json()["error"], (bad, r.text)
    r = httpx.get(f"{server.url}/v1/tenants?limit=10&limt=3", headers=auth(ADMIN_KEY))
    assert r.status_code == 422 and "limt" in r.json()["error"]
    deep = "[" * 5000 + "]" * 5000  # was: 400 "There was an error parsing the body"; malformed JSON is a 422
    r = httpx.post(f"{server.url}/v1/tenants", content=deep,
                   headers={**auth(ADMIN_KEY), "Content-Type": "application/json"})
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"], r.text
    # the schema says uniqueItems: a 422 like its other constraints (was: the store's 400)
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "x", "classes": ["a", "b", "a"]},
                   headers=auth(ADMIN_KEY))
    assert r.status_code == 422 and "given more than once: ['a']" in r.json()["error"], r.text


def test_register_rotate_rollback_without_body(server, embedded_encoder):
    r = httpx.post(f"{server.url}/v1/tenants", json={"id": "legacy", "classes": GLOBEX}, headers=auth(ADMIN_KEY))
    assert r.status_code == 201 and r.json()["tenant"] == "legacy" and "id" not in r.json()  # `id`: deprecated alias
    key = r.json()["api_key"]
    r = httpx.post(f"{server.url}/v1/tenants/legacy/rollback", headers=auth(key))
    assert r.status_code == 409 and "no earlier version" in r.json()["error"]
    assert [upload(server, "legacy", key, local_artifact(embedded_encoder, s)).json()["version"] for s in (1, 2)] == [1, 2]
    r = httpx.post(f"{server.url}/v1/tenants/legacy/rollback", headers=auth(key))  # no body: the previous version
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["tenant"] == "legacy"
    r = httpx.post(f"{server.url}/v1/tenants/legacy/rollback", json={"version": 7}, headers=auth(key))
    assert r.status_code == 404 and "does not exist" in r.json()["error"]

    new = httpx.post(f"{server.url}/v1/tenants/legacy/key", headers=auth(key))  # the tenant rotates its own key
    assert new.status_code == 200 and new.json()["tenant"] == "legacy" and new.json()["api_key"] != key
    assert httpx.get(f"{server.url}/v1/tenants/legacy", headers=auth(key)).status_code == 401
    newer = httpx.post(f"{server.url}/v1/tenants/legacy/key", headers=auth(ADMIN_KEY)).json()["api_key"]  # or the admin
    assert httpx.get(f"{server.url}/v1/tenants/legacy", headers=auth(new.json()["api_key"])).status_code == 401
    assert httpx.get(f"{server.url}/v1/tenants/legacy", headers=auth(newer)).json()["local_version"] == 1


def test_json_classify_matches_multipart(server):
    key = register(server, "jsonc").json()["api_key"]
    images = images_for(ACME, n=MAX_IMAGES, seed=3)
    url = f"{server.url}/v1/tenants/jsonc/classify"
    multipart = httpx.post(url, headers=auth(key), data={"top_k": "2"}, timeout=60,
                           files=[("images", (f"f{i}.png", d, "image/png")) for i, d in enumerate(images)])
    as_json = httpx.post(url, headers=auth(key), timeout=60,
                         json={"images": [base64.b64encode(d).decode() for d in images], "top_k": 2})
    assert multipart.status_code == as_json.status_code == 200, as_json.text
    assert [p["file"] for p in as_json.json()["predictions"]] == [f"image {i}" for i in range(MAX_IMAGES)]
    assert [p["top"] for p in as_json.json()["predictions"]] == [p["top"] for p in multipart.json()["predictions"]]
    for body, status, message in (({"images": ["not base64!"]}, 400, "image 0: not valid base64"),
                                  ({"images": [base64.b64encode(b"text").decode()]}, 400, "not a decodable image"),
                                  ({"images": [base64.b64encode(images[0]).decode()] * (MAX_IMAGES + 1)}, 413, "limit"),
                                  ({"images": []}, 422, "images"), ({"images": ["AAAA"], "top_k": True}, 422, "top_k")):
        r = httpx.post(url, headers=auth(key), json=body, timeout=60)
        assert r.status_code == status and message in r.json()["error"], (body, r.text)
    r = httpx.post(url, headers={**auth(key), "Content-Type": "text/plain"}, content=b"x")
    assert r.status_code == 415


def test_delete_removes_one_tenant_only(server, embedded_encoder):
    keys = {t: register(server, t, classes).json()["api_key"] for t, classes in (("gone", ACME), ("kept", GLOBEX))}
    for t in keys:
        assert upload(server, t, keys[t], local_artifact(embedded_encoder, 5)).status_code == 201
    probe = png_bytes(np.full((48, 48, 3), (200, 30, 30), dtype=np.uint8))
    kept_before = httpx.post(f"{server.url}/v1/tenants/kept/classify", headers=auth(keys["kept"]),
                             files=[("images", ("p.png", probe, "image/png"))]).json()
    assert httpx.delete(f"{server.url}/v1/tenants/gone", headers=auth(keys["gone"])).status_code == 403
    r = httpx.delete(f"{server.url}/v1/tenants/gone", headers=auth(ADMIN_KEY))
    assert r.status_code == 204 and r.content == b""
    assert httpx.get(f"{server.url}/v1/tenants/gone", headers=auth(keys["gone"])).status_code == 401
    assert httpx.get(f"{server.url}/v1/tenants/gone", headers=auth(ADMIN_KEY)).status_code == 404
    assert httpx.delete(f"{server.url}/v1/tenants/gone", headers=auth(ADMIN_KEY)).status_code == 404
    assert not any((server.store / "tenants").glob("*/gone")) and not (server.store / "tenants" / "gone").exists()
    assert not any((server.store / "tmp").iterdir())  # the moved-away folder is removed at once
    kept_after = httpx.post(f"{server.url}/v1/tenants/kept/classify", headers=auth(keys["kept"]),
                            files=[("images", ("p.png", probe, "image/png"))]).json()
    assert kept_after == kept_before
    again = register(server, "gone", GLOBEX)  # the id is free again, and starts from nothing
    assert again.status_code == 201 and again.json()["local_version"] is None
    assert httpx.get(f"{server.url}/v1/tenants/gone", headers=auth(again.json()["api_key"])).json()["local_versions"] == []


def test_tenant_pages(server):
    for t in ("page-a", "page-b", "page-c", "page-d", "page-e"):
        assert register(server, t).status_code == 201
    everyone = sorted(httpx.get(f"{server.url}/v1/tenants?limit=1000", headers=auth(ADMIN_KEY)).json()["tenants"])
    seen, after = [], None
    while True:
        r = httpx.get(f"{server.url}/v1/tenants", params={"limit": 2, **({"after": after} if after else {})},
                      headers=auth(ADMIN_KEY)).json()
        assert len(r["tenants"]) <= 2 and r["tenants"] == sorted(r["tenants"])
        seen += r["tenants"]
        if r["next"] is None:
            break
        after = r["next"]
    assert seen == everyone and {"page-a", "page-e"} <= set(seen)
    for params in ({"limit": 0}, {"limit": 1001}, {"after": "Not An Id"}):
        assert httpx.get(f"{server.url}/v1/tenants", params=params, headers=auth(ADMIN_KEY)).status_code == 422


def test_fuzzed_against_its_own_schema(server):
    report = fuzz.fuzz(server.url, ADMIN_KEY, examples=10, run_seed=0)
    print("\n".join(report.lines()))
    assert report.requests >= 400
    assert report.server_errors == 0 and not report.failures, "\n".join(report.lines())
    assert "Traceback" not in server.log.read_text()
