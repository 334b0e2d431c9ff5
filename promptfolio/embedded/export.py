"""Write the embedded task as an ImageFolder tree (one folder per class name, PNG files).

Training reads it exactly as it reads a user's folder. Trees are generated on demand into a
cache folder named by their parameters, built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from promptfolio.embedded import world

DEFAULT_CACHE = Path(os.environ.get("PROMPTFOLIO_CACHE", Path.cwd() / ".cache")) / "embedded"


def export_imagefolder(style: world.StyleSpec, n_per_class: int, seed: int,
                       cache_dir: Path = DEFAULT_CACHE) -> Path:
    """Return the tree's root, generating it if it is not cached yet."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    name = f"{style.name}-s{style.strength:.2f}-n{n_per_class}-seed{seed}"
    root = Path(cache_dir) / name
    if (root / "dataset.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
    labels = np.repeat(np.arange(len(world.CLASS_NAMES)), n_per_class)
    images, labels = world.task_dataset(len(labels), style, seed, labels=labels)
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = tmp / world.CLASS_NAMES[y]
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.png", optimize=False, compress_level=1)
    meta = {"style": style.name, "strength": style.strength, "n_per_class": n_per_class, "seed": seed,
            "classes": world.CLASS_NAMES}
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return root
