"""A late joiner end to end over the real service: fetch the published global prompt, personalize
on an own folder of one style, upload; the Python Classifier answers exactly as the service."""

import io
import os
import re
import subprocess
import sys

import httpx
import pytest
from PIL import Image

from conftest import REPO
from promptfolio.embedded import world
from promptfolio.embedded.export import export_imagefolder
from promptfolio.prompts import ZERO_SHOT_PHRASE, init_context
from prompts_store.artifact import read_artifact
from service_helpers import ADMIN_KEY, Server, auth
from training.export import prompt_artifact


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("late")
    srv = Server(base / "store", base / "server.log", PROMPTFOLIO_BACKEND="torch").start()
    yield srv
    srv.stop()


def test_late_joiner_personalizes_uploads_and_the_classifier_equals_the_service(server, tmp_path, embedded_encoder):
    from promptfolio import Classifier

    folder = export_imagefolder(world.calibrated("blur"), 8, seed=11, cache_dir=tmp_path / "cache")
    classes = sorted(world.CLASS_NAMES)
    url = server.url
    assert httpx.get(f"{url}/v1/global/prompt").status_code == 401
    assert httpx.get(f"{url}/v1/global/prompt", headers=auth(ADMIN_KEY)).status_code == 404
    # the federation published a global prompt (here the hand prompt's context, as version 1)
    published = prompt_artifact(init_context(embedded_encoder, phrase=ZERO_SHOT_PHRASE), "global", embedded_encoder,
                                classes, producer="test")
    r = httpx.post(f"{url}/v1/global/prompt", headers=auth(ADMIN_KEY), files={"file": ("g.safetensors", published)})
    assert r.status_code == 201 and r.json()["version"] == 1
    r = httpx.post(f"{url}/v1/tenants", headers=auth(ADMIN_KEY), json={"tenant": "late", "classes": classes})
    key = r.json()["api_key"]
    assert httpx.get(f"{url}/v1/global/prompt", headers=auth("pf.late.wrong")).status_code == 401
    fetched = httpx.get(f"{url}/v1/global/prompt", headers=auth(key))
    assert fetched.status_code == 200 and fetched.headers["x-prompt-version"] == "1"
    (tmp_path / "global.safetensors").write_bytes(fetched.content)

    out = tmp_path / "local.safetensors"
    r = subprocess.run([sys.executable, "-m", "promptfolio.cli", "personalize", "--global", url, "--data", str(folder),
                        "--out", str(out), "--epochs", "20", "--tenant", "late", "--upload", url], cwd=REPO,
                       env=dict(os.environ, PROMPTFOLIO_KEY=key), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before, theta, after = re.search(r"global prompt alone ([\d.]+)% -> personalized \(θ=([\d.]+)\) ([\d.]+)%",
                                     r.stdout).groups()
    assert "held-out test (96 images)" in r.stdout and float(after) >= float(before) + 10, r.stdout
    assert "local prompt version 1" in r.stdout
    ctx, meta = read_artifact(out.read_bytes(), embedded_encoder.fingerprint)
    g_ctx, g_meta = read_artifact(fetched.content)
    assert (meta.kind, meta.tenant, meta.producer, meta.theta) == ("local", "late", "personalize", float(theta))
    assert (meta.global_sha256, meta.global_version) == (g_meta.content_sha256, 1) and meta.classes == classes

    # the Python API against the service: same labels, scores within 1e-5 (PNG and JPEG inputs)
    paths = [p for c in classes[:4] for p in sorted((folder / c).iterdir())[:2]]
    jpeg = io.BytesIO()
    Image.open(paths[0]).convert("RGB").resize((96, 96)).save(jpeg, "JPEG", quality=90)
    inputs = [p.read_bytes() for p in paths] + [jpeg.getvalue()]
    clf = Classifier.from_artifacts(tmp_path / "global.safetensors", out, encoder=embedded_encoder)
    assert clf.theta == float(theta)
    ours = clf.predict(inputs, top_k=3)
    r = httpx.post(f"{url}/v1/tenants/late/classify", headers=auth(key), data={"top_k": "3"},
                   files=[("images", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(inputs)])
    assert r.status_code == 200 and r.json()["local_version"] == 1 and r.json()["theta"] == clf.theta
    theirs = [p["top"] for p in r.json()["predictions"]]
    for mine, served in zip(ours, theirs, strict=True):
        assert [m["label"] for m in mine] == [s["label"] for s in served]
        assert max(abs(m["score"] - s["score"]) for m, s in zip(mine, served)) <= 1e-5
