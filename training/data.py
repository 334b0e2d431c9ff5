"""Client data: ImageFolder reading, Dirichlet label partitioning, per-client styles, features.

Simulation partitions one labelled ImageFolder over N clients (Dirichlet(β) over labels) and
gives each client a style; every client gets disjoint train/val/test splits plus a balanced
shared test set for generalization. A real deployment reads each SuperNode's own folder.
The image tower is frozen, so features are computed once per client and reused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from promptfolio.embedded import world
from promptfolio.encoder import Encoder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class DataError(ValueError):
    """Client data is missing, empty or inconsistent; the message names the folder or client."""


@dataclass
class ImageFolder:
    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]


def read_imagefolder(root: str | Path, classes: list[str] | None = None) -> ImageFolder:
    """One sub-folder per class name holding image files. With `classes` given (the federation's
    class list), folders must be among them and labels index into it; absent classes are fine."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data folder {root} has no class sub-folders (expected <root>/<class name>/<images>)")
    names = classes if classes is not None else [p.name for p in folders]
    unknown = [p.name for p in folders if p.name not in names]
    if unknown:
        raise DataError(f"data folder {root} has folders that are not among the {len(names)} classes: {unknown[:5]}")
    paths, labels = [], []
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(str(path))
                labels.append(names.index(folder.name))
    if not paths:
        raise DataError(f"data folder {root} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageFolder(str(root), list(names), paths, labels)


def dirichlet_partition(labels: np.ndarray, n_clients: int, beta: float, seed: int, min_size: int,
                        max_tries: int = 200) -> list[np.ndarray]:
    """Split indices over clients with per-class proportions ~ Dir(β); retried (deterministically)
    until every client has at least `min_size` samples."""
    if len(labels) < n_clients * min_size:
        raise DataError(f"{len(labels)} images cannot give {n_clients} clients {min_size} each; "
                        f"use more images or fewer clients")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([beta] * n_clients)) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.array(sorted(p)) for p in parts]
    raise DataError(f"no Dirichlet(β={beta}) split gave every one of {n_clients} clients {min_size} images "
                    f"in {max_tries} tries; raise β or lower min_images_per_client")


def split_three(idx: np.ndarray, train: float, val: float, rng: np.random.Generator):
    """Disjoint train/val/test (each at least one sample when there are 3 or more)."""
    idx = rng.permutation(idx)
    n = len(idx)
    n_train = max(1, int(round(n * train)))
    n_val = max(1, int(round(n * val)))
    n_train = min(n_train, n - n_val - 1)
    return idx[:n_train], idx[n_train : n_train + n_val], idx[n_train + n_val :]


@dataclass
class Split:
    paths: list[str]
    labels: list[int]
    styles: list[tuple[str, float]]  # per image: the style applied when loading


@dataclass
class ClientPlan:
    partition: int
    style: tuple[str, float]
    train: Split
    val: Split
    test: Split
    general: Split


def style_for(partition: int, cfg) -> tuple[str, float]:
    if cfg.shift == "none":
        return ("clean", 0.0)
    name = cfg.shared_style if cfg.shift == "shared" else cfg.styles[partition % len(cfg.styles)]
    spec = world.calibrated(name)
    return (spec.name, spec.strength)


def build_plan(cfg) -> dict:
    """The whole simulation's data plan (paths, labels, styles per client), JSON-serialisable."""
    from promptfolio.embedded.export import export_imagefolder

    if cfg.data == "embedded":
        clean = world.StyleSpec("clean", 0.0)
        source = read_imagefolder(export_imagefolder(clean, cfg.images_per_class, seed=cfg.seed))
        general_source = read_imagefolder(export_imagefolder(clean, cfg.general_per_class, seed=cfg.seed + 10_000))
    else:
        source = read_imagefolder(cfg.data)
        general_source = None
    labels = np.array(source.labels)
    parts = dirichlet_partition(labels, cfg.num_clients, cfg.beta, cfg.seed, cfg.min_images_per_client)
    rng = np.random.default_rng(cfg.seed + 1)
    if general_source is None:  # hold out a balanced slice of the user's folder as the shared set
        general_idx = np.concatenate([np.flatnonzero(labels == c)[: cfg.general_per_class] for c in np.unique(labels)])
        parts = [np.setdiff1d(p, general_idx) for p in parts]
        general_paths = [source.paths[i] for i in general_idx]
        general_labels = [source.labels[i] for i in general_idx]
    else:
        general_paths, general_labels = general_source.paths, general_source.labels
    general_styles = [style_for(j % cfg.num_clients, cfg) for j in range(len(general_paths))]
    general = Split(general_paths, general_labels, general_styles)
    clients = []
    for pid, idx in enumerate(parts):
        style = style_for(pid, cfg)
        splits = [Split([source.paths[i] for i in s], [source.labels[i] for i in s], [style] * len(s))
                  for s in split_three(idx, cfg.train_fraction, cfg.val_fraction, rng)]
        clients.append(ClientPlan(pid, style, *splits, general=general))
    return {"classes": source.classes, "clients": [asdict(c) for c in clients]}


def write_plan(plan: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))


def local_plan(data_path: str, classes: list[str], seed: int, train: float, val: float) -> ClientPlan:
    """A real SuperNode: its own ImageFolder, split deterministically; no style, no shared set."""
    folder = read_imagefolder(data_path, classes)
    if len(folder.paths) < 3:
        raise DataError(f"data folder {data_path} has {len(folder.paths)} images; a client needs at least 3")
    rng = np.random.default_rng(seed)
    splits = split_three(np.arange(len(folder.paths)), train, val, rng)
    clean = ("clean", 0.0)
    made = [Split([folder.paths[i] for i in s], [folder.labels[i] for i in s], [clean] * len(s)) for s in splits]
    return ClientPlan(-1, clean, *made, general=made[2])


def load_split(split: Split | dict, seed: int) -> list[np.ndarray]:
    """uint8 images `[H, W, 3]` with each image's style applied (deterministic per image)."""
    split = Split(**split) if isinstance(split, dict) else split
    images = []
    for i, (path, (name, strength)) in enumerate(zip(split.paths, split.styles)):
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
        rng = np.random.default_rng([seed, i])
        images.append(world.apply_style(arr, world.StyleSpec(name, strength), rng))
    return images


@torch.no_grad()
def encode_images(encoder: Encoder, images: list[np.ndarray], batch_size: int = 128) -> torch.Tensor:
    """Normalised image features `[N, D]` through the encoder's own preprocess."""
    if not images:
        return torch.zeros(0, encoder.embed_dim)
    feats = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([encoder.preprocess(Image.fromarray(im)) for im in images[i : i + batch_size]])
        feats.append(F.normalize(encoder.model.encode_image(x.to(encoder.device)).float(), dim=-1).cpu())
    return torch.cat(feats)
