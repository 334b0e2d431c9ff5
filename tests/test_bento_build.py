"""`bentoml build` of the GPU container, offline, and what the built bento contains."""

import os
import re
import subprocess
import sys

import yaml

from conftest import REPO


def test_bentoml_build_makes_a_gpu_bento_with_onnxruntime_gpu_only(tmp_path):
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    run = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tag = re.search(r"__tag__:(\S+)", run.stdout).group(1)
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    assert meta["service"] == "service.service:PromptFolio"
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    # Debian's Python as the base (CUDA comes from the torch wheels), none of BentoML's compilers/git
    assert re.search(r"^FROM promptfolio-base:bookworm-py311\b", dockerfile, re.M)
    assert "build-essential" not in dockerfile and "apt-get" not in dockerfile and " git" not in dockerfile
    assert "uv pip install" not in dockerfile  # pip reads the PIP_* build args (local wheelhouse)
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", dockerfile, re.M)
    assert re.findall(r"^USER (\S+)", dockerfile, re.M)[-1] == "bentoml"
    assert re.search(r"install -d -o bentoml -g bentoml .*/data", dockerfile)
    assert "pip show onnxruntime" in dockerfile  # the build fails if the CPU onnxruntime came along
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    names = [re.split(r"[<>=!~\[ ;]", line.strip())[0].lower() for line in requirements if line.strip()
             and not line.startswith("#")]
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert "fastapi" in names  # service/api.py; bentoml does not depend on it
    assert "torch" in names and "flwr" not in names  # the service image carries no training stack
    src = bento / "src"
    assert (src / "promptfolio" / "embedded" / "promptfolio-tiny.safetensors").stat().st_size > 10_000_000
    assert (src / "service" / "service.py").is_file() and not (src / "tests").exists()
    envs = {e["name"]: e["value"] for e in meta.get("envs", [])}
    assert envs["PROMPTFOLIO_STORE"] == "/data/store" and envs["PROMPTFOLIO_ONNX_CACHE"].startswith("/data/")
    assert all(envs[name].startswith("/data/") for name in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME"))
