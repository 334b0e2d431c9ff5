import os
import socket
from pathlib import Path

# offline and private by default, before any library reads its settings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MPLCONFIGDIR", str(Path(__file__).resolve().parent.parent / ".cache" / "matplotlib"))

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def random_encoder():
    """The tiny architecture with fixed random weights: fast, and independent of the shipped ones."""
    from promptfolio.encoder import load_encoder

    torch.manual_seed(0)
    return load_encoder("promptfolio-tiny", pretrained=None)


@pytest.fixture(scope="session")
def embedded_encoder():
    from promptfolio.encoder import load_encoder

    return load_encoder("embedded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
