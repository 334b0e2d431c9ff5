"""The real BentoML server over HTTP: tenants, classify, upload, rollback, auth, bad input, crashes."""

import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import save as st_save

from promptfolio.embedded import world
from promptfolio.prompts import init_context
from prompts_store.artifact import PromptMeta, artifact_bytes, read_artifact
from prompts_store.store import PromptStore
from service_helpers import ADMIN_KEY, Server, auth, png_bytes

ACME = ["red circle", "blue star", "green square", "yellow triangle", "purple cross", "orange circle"]
GLOBEX = ["blue circle", "red star", "green cross", "orange square"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("svc")
    srv = Server(base / "store", base / "server.log", PROMPTFOLIO_MAX_UPLOAD_BYTES="65536",
                 PROMPTFOLIO_MAX_IMAGE_PIXELS="1000000").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tenants(server):
    keys = {}
    for tenant, classes in (("acme", ACME), ("globex", GLOBEX)):
        r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": tenant, "classes": classes}, headers=auth(ADMIN_KEY))
        assert r.status_code == 201, r.text
        keys[tenant] = r.json()["api_key"]
    return keys


def images_for(classes, n=12, seed=0, style="clean"):
    labels = [world.CLASS_NAMES.index(classes[i % len(classes)]) for i in range(n)]
    images, _ = world.task_dataset(n, world.calibrated(style), seed, labels=labels)
    return [png_bytes(im) for im in images]


def classify(server, tenant, key, images, **form):
    files = [("images", (f"img{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{server.url}/v1/tenants/{tenant}/classify", files=files, data=form, headers=auth(key),
                      timeout=60)


def local_artifact(encoder, ctx, theta=1.0, **meta):
    return artifact_bytes(ctx, PromptMeta(kind="local", tenant="client-0", encoder=encoder.fingerprint,
                                          n_ctx=ctx.shape[0], width=ctx.shape[1], theta=theta, **meta))


def upload(server, tenant, key, data, name="p.safetensors"):
    return httpx.post(f"{server.url}/v1/tenants/{tenant}/prompt", headers=auth(key),
                      files={"file": (name, data, "application/octet-stream")}, timeout=60)


def tops(response):
    assert response.status_code == 200, response.text
    return [[(t["label"], t["score"]) for t in p["top"]] for p in response.json()["predictions"]]


def test_classify_upload_rollback_isolation(server, tenants, embedded_encoder):
    acme_imgs, globex_imgs = images_for(ACME), images_for(GLOBEX, seed=1)
    r = classify(server, "acme", tenants["acme"], acme_imgs, top_k=3)
    body = r.json()
    assert body["global_version"] == 0 and body["local_version"] is None and body["theta"] == 0.0
    zero_shot = tops(r)
    accuracy = sum(t[0][0] == ACME[i % len(ACME)] for i, t in enumerate(zero_shot)) / len(zero_shot)
    assert accuracy >= 0.9  # the embedded encoder on clean images
    assert all(len(t) == 3 for t in zero_shot)
    globex_before = tops(classify(server, "globex", tenants["globex"], globex_imgs))

    # v1: the hand prompt as a local prompt at θ=1 reproduces zero-shot exactly
    v1 = upload(server, "acme", tenants["acme"], local_artifact(embedded_encoder, init_context(embedded_encoder,
                                                                                               phrase="a photo of a")))
    assert v1.status_code == 201 and v1.json()["version"] == 1
    after_v1 = classify(server, "acme", tenants["acme"], acme_imgs, top_k=3)
    assert after_v1.json()["local_version"] == 1 and after_v1.json()["theta"] == 1.0
    assert [[lab for lab, _ in t] for t in tops(after_v1)] == [[lab for lab, _ in t] for t in zero_shot]

    # v2: a random context: the very next classify uses it and predictions change
    random_ctx = init_context(embedded_encoder, n_ctx=4, generator=torch.Generator().manual_seed(0)) * 50
    v2 = upload(server, "acme", tenants["acme"], local_artifact(embedded_encoder, random_ctx))
    assert v2.status_code == 201 and v2.json()["version"] == 2
    after_v2 = classify(server, "acme", tenants["acme"], acme_imgs, top_k=3)
    assert after_v2.json()["local_version"] == 2
    assert tops(after_v2) != tops(after_v1)
    # a per-request θ=0 override falls back to the global (zero-shot) prompt at no cost
    assert tops(classify(server, "acme", tenants["acme"], acme_imgs, top_k=3, theta="0")) == zero_shot
    # the other tenant is untouched
    assert tops(classify(server, "globex", tenants["globex"], globex_imgs)) == globex_before

    # rollback restores v1's behaviour
    rb = httpx.post(f"{server.url}/v1/tenants/acme/rollback", json={}, headers=auth(tenants["acme"]))
    assert rb.status_code == 200 and rb.json()["version"] == 1
    assert tops(classify(server, "acme", tenants["acme"], acme_imgs, top_k=3)) == tops(after_v1)
    info = httpx.get(f"{server.url}/v1/tenants/acme", headers=auth(tenants["acme"])).json()
    assert info["local_version"] == 1 and info["local_versions"] == [1, 2] and info["classes"] == ACME

    # θ and classes are tenant settings
    patched = httpx.patch(f"{server.url}/v1/tenants/acme", json={"theta": 0.0}, headers=auth(tenants["acme"]))
    assert patched.status_code == 200 and patched.json()["effective_theta"] == 0.0
    assert tops(classify(server, "acme", tenants["acme"], acme_imgs, top_k=3)) == zero_shot
    httpx.patch(f"{server.url}/v1/tenants/acme", json={"theta": None}, headers=auth(tenants["acme"]))


def test_keys_reach_only_their_own_tenant(server, tenants, embedded_encoder):
    img = images_for(GLOBEX, n=1)
    r = classify(server, "globex", tenants["acme"], img)
    assert r.status_code == 403 and "belongs to tenant 'acme'" in r.json()["error"]
    data = local_artifact(embedded_encoder, init_context(embedded_encoder, phrase="a photo of a"))
    r = upload(server, "globex", tenants["acme"], data)
    assert r.status_code == 403
    assert httpx.get(f"{server.url}/v1/tenants/globex", headers=auth(tenants["globex"])).json()["local_versions"] == []
    assert classify(server, "acme", "pf.acme.forged", img).status_code == 401
    assert classify(server, "acme", "garbage", img).status_code == 401
    r = httpx.post(f"{server.url}/v1/tenants/acme/classify", files=[("images", ("a.png", img[0], "image/png"))])
    assert r.status_code == 401 and "missing API key" in r.json()["error"]
    # tenant keys are not admin keys
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "evil", "classes": ["x"]}, headers=auth(tenants["acme"]))
    assert r.status_code == 403
    assert {"acme", "globex"} <= set(httpx.get(f"{server.url}/v1/tenants", headers=auth(ADMIN_KEY)).json()["tenants"])


def _hostile_artifacts(encoder):
    ctx = init_context(encoder, phrase="a photo of a")
    good = local_artifact(encoder, ctx)
    strings = read_artifact(good)[1].to_strings()
    return {
        "wrong shape": local_artifact(encoder, torch.zeros(4, encoder.text_width + 8)),
        "int dtype": st_save({"ctx": torch.zeros(4, encoder.text_width, dtype=torch.int64)}, metadata=strings),
        "nan": st_save({"ctx": torch.full_like(ctx, float("nan"))}, metadata=strings),
        "inf": st_save({"ctx": torch.full_like(ctx, float("inf"))}, metadata=strings),
        "oversized header": struct.pack("<Q", 1 << 40) + b"{}",
        "truncated": good[:-40],
        "extra tensors": st_save({"ctx": ctx, "extra": torch.zeros(2)}, metadata=strings),
        "other encoder": local_artifact(encoder, ctx).replace(encoder.fingerprint.encode()[:20], b"x" * 20),
        "not safetensors": b"hello world, not an artifact",
        "nested metadata": st_save({"ctx": ctx}, metadata=dict(strings, classes="[" * 20000 + "]" * 20000)),
        "float64": st_save({"ctx": ctx.double()}, metadata=strings),
    }


def test_bad_input_gets_clear_4xx(server, tenants, embedded_encoder):
    acme = tenants["acme"]
    png = images_for(ACME, n=1)[0]
    cases = [
        ([("images", ("e.png", b"", "image/png"))], 400, "empty file"),
        ([("images", ("c.png", png[:60], "image/png"))], 400, "c.png"),
        ([("images", ("t.png", b"just some text", "image/png"))], 400, "not a decodable image"),
        ([("images", ("t.txt", png, "text/plain"))], 415, "not an image"),
        ([("images", ("big.png", png_bytes(__import__("numpy").zeros((1000, 1100, 3), "uint8")), "image/png"))],
         413, "exceeds the limit"),
    ]
    for files, status, message in cases:
        r = httpx.post(f"{server.url}/v1/tenants/acme/classify", files=files, headers=auth(acme))
        assert r.status_code == status and message in r.json()["error"], (files[0][1][0], r.status_code, r.text)
    assert httpx.post(f"{server.url}/v1/tenants/acme/classify", headers=auth(acme)).status_code == 422
    r = classify(server, "acme", acme, [png], theta="1.5")
    assert r.status_code == 422 and "theta: Input should be less than or equal to 1" in r.json()["error"]
    assert classify(server, "acme", acme, [png], top_k="0").status_code == 422
    # the form is as strict as the JSON body (was: 200, the field ignored or the last value taken)
    r = classify(server, "acme", acme, [png], topk="2")
    assert r.status_code == 422 and "topk" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v1/tenants/acme/classify", files=[("images", ("a.png", png, "image/png"))],
                   data={"top_k": ["1", "2"]}, headers=auth(acme))
    assert r.status_code == 422 and "'top_k' given more than once" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v1/tenants/acme/classify", files=[("image", ("a.png", png, "image/png"))],
                   headers=auth(acme))  # 'image' for 'images'
    assert r.status_code == 422 and "unknown form field(s) ['image'] (known: images, theta, top_k)" in r.text, r.text
    # and everywhere: unknown or repeated query parameters and upload form fields (were ignored, or the last taken)
    r = httpx.post(f"{server.url}/v1/tenants/acme/classify?top_k=1", files=[("images", ("a.png", png, "image/png"))],
                   headers=auth(acme))
    assert r.status_code == 422 and "unknown query parameter(s) ['top_k']" in r.json()["error"], r.text
    assert httpx.get(f"{server.url}/v1/tenants/acme?foo=1", headers=auth(acme)).status_code == 422
    r = httpx.get(f"{server.url}/v1/tenants?limit=2&limit=3", headers=auth(ADMIN_KEY))
    assert r.status_code == 422 and "'limit' given more than once" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v1/tenants/acme/prompt", headers=auth(acme), data={"allow_unpined": "true"},
                   files={"file": ("p.safetensors", b"x", "application/octet-stream")})
    assert r.status_code == 422 and "['allow_unpined'] (known: allow_unpinned, file)" in r.json()["error"], r.text
    r = httpx.post(f"{server.url}/v1/tenants/acme/classify", content=png, headers=auth(acme))  # no Content-Type
    assert r.status_code == 415 and "without a Content-Type" in r.json()["error"], r.text
    r = classify(server, "nobody", ADMIN_KEY, [png])
    assert r.status_code == 404 and "unknown tenant" in r.json()["error"]
    r = classify(server, "..%2Fetc", ADMIN_KEY, [png])
    assert 400 <= r.status_code < 500

    for name, data in _hostile_artifacts(embedded_encoder).items():
        r = upload(server, "acme", acme, data)
        assert r.status_code == 400, (name, r.status_code, r.text)
        assert r.json()["error"].startswith("invalid prompt artifact"), (name, r.text)
    r = upload(server, "acme", acme, b"\0" * 70_000)
    assert r.status_code == 413, r.text
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "../x", "classes": ["a"]}, headers=auth(ADMIN_KEY))
    assert r.status_code == 422 and "tenant: String should match pattern" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "x"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 422
    r = httpx.patch(f"{server.url}/v1/tenants/acme", json={"metadata": {"a": {"b": [1, {"c": 2}]}}}, headers=auth(acme))
    assert r.status_code == 422 and "metadata" in r.json()["error"]  # a misspelt field is not a silent no-op
    # none of it changed the tenant or crashed the server
    assert httpx.get(f"{server.url}/v1/tenants/acme", headers=auth(acme)).status_code == 200
    assert "Traceback" not in server.log.read_text()


def test_concurrent_uploads_all_land(server, tenants, embedded_encoder):
    key = tenants["globex"]
    before = httpx.get(f"{server.url}/v1/tenants/globex", headers=auth(key)).json()["local_versions"]
    artifacts = [local_artifact(embedded_encoder, init_context(embedded_encoder, n_ctx=4,
                                                               generator=torch.Generator().manual_seed(s)))
                 for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda d: upload(server, "globex", key, d), artifacts))
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    versions = sorted(r.json()["version"] for r in responses)
    assert len(set(versions)) == 6
    info = httpx.get(f"{server.url}/v1/tenants/globex", headers=auth(key)).json()
    assert info["local_versions"] == sorted(before + versions)
    assert info["local_version"] in versions


def test_metrics_and_probes(server, tenants):
    assert httpx.get(f"{server.url}/livez").status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    assert "promptfolio_classified_images_total" in text
    assert 'tenant="acme"' not in text  # per-tenant series only with PROMPTFOLIO_TENANT_METRICS=true
    assert "promptfolio_feature_cache_total" in text
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["arch"] == "promptfolio-tiny" and info["weights"] == "embedded"


def global_artifact(encoder, ctx):
    return artifact_bytes(ctx, PromptMeta(kind="global", encoder=encoder.fingerprint, n_ctx=ctx.shape[0],
                                          width=ctx.shape[1]))


def publish(server, data):
    return httpx.post(f"{server.url}/v1/global/prompt", headers=auth(ADMIN_KEY),
                      files={"file": ("g.safetensors", data, "application/octet-stream")}, timeout=60)


def test_pinned_pairs_and_writes_that_cannot_be_served(server, tenants, embedded_encoder):
    enc = embedded_encoder
    g1 = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(11))
    r = publish(server, global_artifact(enc, g1))
    assert r.status_code == 201, r.text
    g1_version = r.json()["version"]
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "pinned", "classes": ACME}, headers=auth(ADMIN_KEY))
    key = r.json()["api_key"]
    r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "follower", "classes": ACME}, headers=auth(ADMIN_KEY))
    follower_key = r.json()["api_key"]
    local = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(12))
    r = upload(server, "pinned", key, local_artifact(enc, local, theta=0.6, global_sha256=read_artifact(
        global_artifact(enc, g1))[1].content_sha256))
    assert r.status_code == 201 and r.json()["pinned"] is True and r.json()["global_version"] == g1_version, r.text
    imgs = images_for(ACME, n=6, seed=3)
    before = classify(server, "pinned", key, imgs, top_k=6)
    assert (before.json()["pinned"], before.json()["trained_together"], before.json()["theta"]) == (True, True, 0.6)

    # a new global, then a rollback of it: the pinned tenant's answers stay byte-identical
    follower_before = classify(server, "follower", follower_key, imgs, top_k=6).content
    g2 = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(13))
    assert publish(server, global_artifact(enc, g2)).status_code == 201
    assert classify(server, "pinned", key, imgs, top_k=6).content == before.content
    assert classify(server, "follower", follower_key, imgs, top_k=6).content != follower_before  # it moves
    rb = httpx.post(f"{server.url}/v1/global/rollback", json={"version": g1_version}, headers=auth(ADMIN_KEY))
    assert rb.status_code == 200
    assert classify(server, "pinned", key, imgs, top_k=6).content == before.content
    info = httpx.get(f"{server.url}/v1/tenants/pinned", headers=auth(key)).json()
    assert (info["pinned"], info["global_version"], info["local_version"], info["trained_with_global_version"]) == \
        (True, g1_version, 1, g1_version)

    # an unknown global is refused (409) unless the upload allows an unpinned prompt
    stranger = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(14))
    data = local_artifact(enc, local, global_sha256=read_artifact(global_artifact(enc, stranger))[1].content_sha256)
    r = upload(server, "pinned", key, data)
    assert r.status_code == 409 and "does not hold" in r.json()["error"]
    r = httpx.post(f"{server.url}/v1/tenants/pinned/prompt", headers=auth(key), data={"allow_unpinned": "true"},
                   files={"file": ("p.safetensors", data, "application/octet-stream")})
    assert r.status_code == 201 and r.json()["pinned"] is False and r.json()["notes"], r.text
    # re-pin: the answer says the pair was not trained together
    r = httpx.post(f"{server.url}/v1/tenants/pinned/pin", json={"global_version": g1_version}, headers=auth(key))
    assert r.status_code == 200 and r.json()["pinned"] and "not trained together" in r.json()["notes"][0]
    r = httpx.post(f"{server.url}/v1/tenants/pinned/pin", json={"global_version": 999}, headers=auth(key))
    assert r.status_code == 404 and "0 is the built-in hand prompt" in r.json()["error"], r.text

    # writes that validate but cannot be served: 409 naming the problem, nothing changes
    long_name = "a," * 49 + "a"
    for _ in range(2):
        r = httpx.post(f"{server.url}/v1/tenants", json={"tenant": "toolong", "classes": ["x", long_name]},
                       headers=auth(ADMIN_KEY))
        assert r.status_code == 409 and "too long" in r.json()["error"], r.text
    info_before = httpx.get(f"{server.url}/v1/tenants/pinned", headers=auth(key)).json()
    served_before = classify(server, "pinned", key, imgs, top_k=6).content
    for data in (local_artifact(enc, init_context(enc, n_ctx=27, generator=torch.Generator().manual_seed(1))),
                 local_artifact(enc, torch.full((4, enc.text_width), 1e20))):
        r = upload(server, "pinned", key, data)
        assert r.status_code == 409 and "cannot serve tenant 'pinned'" in r.json()["error"], r.text
    r = httpx.patch(f"{server.url}/v1/tenants/pinned", json={"classes": ACME + [long_name]}, headers=auth(key))
    assert r.status_code == 409 and "too long" in r.json()["error"]
    r = publish(server, global_artifact(enc, init_context(enc, n_ctx=27, generator=torch.Generator().manual_seed(2))))
    assert r.status_code == 409 and "would break" in r.json()["error"] and "follower" in r.json()["error"]
    assert httpx.get(f"{server.url}/v1/tenants/pinned", headers=auth(key)).json() == info_before
    assert classify(server, "pinned", key, imgs, top_k=6).content == served_before
    assert "Traceback" not in server.log.read_text()


def test_commands_refuse_a_missing_store(tmp_path, capsys):
    from promptfolio.cli import main

    missing = tmp_path / "no-store"
    assert main(["tenant", "list", "--store", str(missing)]) == 2
    assert main(["serve", "--store", str(missing)]) == 2
    assert "no prompts store" in capsys.readouterr().err and not missing.exists()
    assert main(["tenant", "add", "t1", "--classes", "a,b", "--store", str(missing)]) == 0  # creates it
    capsys.readouterr()
    assert main(["tenant", "list", "--store", str(missing)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("t1\t") and "global_version=0" in line and "local_version=None" in line


def test_sigkill_during_uploads_leaves_a_clean_store(tmp_path, embedded_encoder):
    srv = Server(tmp_path / "store", tmp_path / "server.log").start()
    try:
        key = httpx.post(f"{srv.url}/v1/tenants", json={"tenant": "crash", "classes": ACME},
                         headers=auth(ADMIN_KEY)).json()["api_key"]
        acknowledged, stop = [], threading.Event()

        def uploader():
            seed = 0
            while not stop.is_set():
                ctx = init_context(embedded_encoder, n_ctx=4, generator=torch.Generator().manual_seed(seed))
                seed += 1
                try:
                    r = upload(srv, "crash", key, local_artifact(embedded_encoder, ctx))
                except httpx.HTTPError:
                    return
                if r.status_code == 201:
                    acknowledged.append(r.json()["version"])

        threads = [threading.Thread(target=uploader) for _ in range(3)]
        [t.start() for t in threads]
        time.sleep(2.0)
        srv.kill()  # SIGKILL while uploads are in flight
        stop.set()
        [t.join(timeout=30) for t in threads]
        assert acknowledged, "no upload completed before the kill"
    finally:
        srv.kill()

    restarted = Server(tmp_path / "store", tmp_path / "server2.log").start()
    try:
        info = httpx.get(f"{restarted.url}/v1/tenants/crash", headers=auth(key)).json()
        # every acknowledged upload survived, and the current version is a complete, valid one
        assert set(acknowledged) <= set(info["local_versions"])
        assert info["local_version"] in info["local_versions"]
        assert info["local_version"] >= max(acknowledged)
        folder = PromptStore(tmp_path / "store").tenant_dir("crash")
        for path in folder.glob("v*.safetensors"):
            read_artifact(path.read_bytes(), embedded_encoder.fingerprint, embedded_encoder.text_width)
        assert not list(folder.glob(".tmp-*"))
        assert classify(restarted, "crash", key, images_for(ACME, n=2)).status_code == 200
    finally:
        restarted.stop()


def test_serve_command_keeps_the_service_environment(monkeypatch):
    from promptfolio.cli import build_parser
    from service.commands import serve_env
    from service.config import ServiceConfig

    environ = {"PROMPTFOLIO_ARCH": "ViT-B-32", "PROMPTFOLIO_PRETRAINED": "none", "PROMPTFOLIO_STORE": "/tmp/s"}
    env = serve_env(build_parser().parse_args(["serve"]), environ)  # no flag: the service's own settings
    assert (env["PROMPTFOLIO_ARCH"], env["PROMPTFOLIO_PRETRAINED"], env["PROMPTFOLIO_STORE"]) == ("ViT-B-32", "none",
                                                                                                  "/tmp/s")
    env = serve_env(build_parser().parse_args(["serve", "--arch", "RN50", "--store", "/tmp/t"]), environ)
    assert (env["PROMPTFOLIO_ARCH"], env["PROMPTFOLIO_STORE"]) == ("RN50", "/tmp/t")
    cfg = ServiceConfig.from_env(serve_env(build_parser().parse_args(["serve"]), {}))  # defaults: ServiceConfig's
    assert (cfg.arch, cfg.pretrained, cfg.admin_key) == ("embedded", "embedded", None)
