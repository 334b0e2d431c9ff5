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
import psutil
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
               "--port", str(self.port), "--admin-key", ADMIN_KEY, "--init"]
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

    def _tree(self) -> list[psutil.Process]:
        """The server and every process under it (BentoML's workers may leave the process group)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the server and all its processes at once: no shutdown hook runs."""
        if self.proc is not None:
            _sigkill(self._tree())
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL whatever is left, workers included."""
        if self.proc is None:
            return
        tree = self._tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _sigkill(psutil.wait_procs(tree, timeout=20)[1])
        self.proc.wait(timeout=10)


def _sigkill(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
