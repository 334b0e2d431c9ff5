"""The embedded default: a synthetic world and a tiny CLIP pretrained on it, shipped in the repo.

`load_encoder("embedded")` loads these weights through the same path as any open_clip checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_NAME = "promptfolio-tiny"
CONFIG_PATH = HERE / f"{MODEL_NAME}.json"
RECORD_PATH = HERE / f"{MODEL_NAME}.record.json"


def _locate_weights() -> Path:
    """The weights beside this file; else PROMPTFOLIO_EMBEDDED_WEIGHTS; else another copy of this
    package on the import path. Flower's app bundle (what `flwr run` ships to the SuperLink and
    SuperNodes) carries code and text files only, so there the installed copy holds the weights."""
    own = HERE / f"{MODEL_NAME}.safetensors"
    if own.is_file():
        return own
    if os.environ.get("PROMPTFOLIO_EMBEDDED_WEIGHTS"):
        return Path(os.environ["PROMPTFOLIO_EMBEDDED_WEIGHTS"])
    roots = [Path(p) / "promptfolio" for p in sys.path if p]
    for finder in sys.meta_path:  # editable installs map the package through a finder, not sys.path
        try:
            spec = finder.find_spec("promptfolio", None)
        except (AttributeError, ImportError, ValueError):
            continue
        roots += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        candidate = root / "embedded" / own.name
        if candidate.is_file():
            return candidate
    return own


WEIGHTS_PATH = _locate_weights()
