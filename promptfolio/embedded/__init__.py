"""The embedded default: a synthetic world and a tiny CLIP pretrained on it, shipped in the repo.

`load_encoder("embedded")` loads these weights through the same path as any open_clip checkpoint.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_NAME = "promptfolio-tiny"
CONFIG_PATH = HERE / f"{MODEL_NAME}.json"
WEIGHTS_PATH = HERE / f"{MODEL_NAME}.safetensors"
RECORD_PATH = HERE / f"{MODEL_NAME}.record.json"
