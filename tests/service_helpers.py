"""Start the real service (`promptfolio serve` -> `bentoml serve`) on a free 127.0.0.1 port."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from conftest import REPO, free_port

ADMIN_KEY = "test-admin-key"


class Server:
    def __init__(self, store: Path, log: Path, **env: str):
        self.store, self.log, self.env = store, log, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "Server":
        env = dict(os.environ, BENTOML_HOME=str(self.store.parent / "bentoml_home"), BENTOML_DO_NOT_TRACK="true",
                   PROMPTFOLIO_ONNX_CACHE=str(self.store.parent / "onnx"),
                   HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **self.env)
        cmd = [sys.executable, "-m", "promptfolio.cli", "serve", "--store", str(self.store), "--host", "127.0.0.1",
               "--port", str(self.port), "--admin-key", ADMIN_KEY]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hook runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
