"""Client data: image folders, Dirichlet label partitioning, per-client styles, features.

Simulation partitions one labelled image folder over N clients (Dirichlet(β) over labels); in
the embedded world each client also gets a synthetic style (a user's own folder gets none
unless asked). Every client gets disjoint train/val/test splits plus a balanced shared test set
for generalization. A real deployment reads each SuperNode's own folder. The image tower is
frozen, so features are computed once per client and reused.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel
from torchvision.datasets.folder import make_dataset

from promptfolio.embedded import world
from promptfolio.encoder import Encoder
from promptfolio.images import IMAGE_EXTENSIONS, ImageLoadError, is_image_file, load_image

SPLITS = ("train", "val", "test", "general")
CLEAN = ("clean", 0.0)


class DataError(ValueError):
    """Client data is missing, empty or inconsistent; the message names the folder, file or client."""


@dataclass
class ImageFolder:
    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_bad=True)


def _class_folders(root: Path) -> list[str]:
    """torchvision's `find_classes` convention (every sub-folder is a class), hidden folders aside."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def check_images(paths: list[str], skip_bad: bool) -> list[str]:
    """Fully decode every image (in threads: decoding releases the GIL); returns the unreadable
    ones when `skip_bad`, else raises a DataError naming the first."""
    def problem(path: str) -> str | None:
        try:
            load_image(path)
        except ImageLoadError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        problems = [(p, e) for p, e in zip(paths, pool.map(problem, paths)) if e is not None]
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more unreadable)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0][1]}{more}; fix or remove it, or pass --skip-bad-images to leave it out")
    return [p for p, _ in problems]


def read_imagefolder(root: str | Path, classes: list[str] | None = None, check: bool = True,
                     skip_bad: bool = False) -> ImageFolder:
    """One sub-folder per class name holding images, at any depth (torchvision's `make_dataset`:
    nested files belong to their top-level class). With `classes` given (the federation's class
    list), folders must be among them and labels index into it; absent classes are fine. Class
    folders without images are refused; `check` decodes every image now, not mid-training."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    folders = _class_folders(root)
    if not folders:
        raise DataError(f"data folder {root} has no class sub-folders (expected <root>/<class name>/<images>)")
    names = list(classes) if classes is not None else folders
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DataError(f"data folder {root} has folders that are not among the {len(names)} classes: {unknown[:5]}")
    def wanted(path: str) -> bool:  # an image, not inside a hidden folder (.thumbnails, .git, ...)
        return is_image_file(path) and not any(part.startswith(".") for part in Path(path).relative_to(root).parts)

    samples = make_dataset(str(root), {f: names.index(f) for f in folders}, is_valid_file=wanted, allow_empty=True)
    skipped = check_images([p for p, _ in samples], skip_bad) if check else []
    left_out = set(skipped)
    samples = [(p, y) for p, y in samples if p not in left_out]
    if not samples:
        raise DataError(f"data folder {root} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    empty = sorted(set(folders) - {names[y] for _, y in samples})
    if empty:
        raise DataError(f"class folders without images in {root}: {', '.join(empty[:10])}"
                        f"{' …' if len(empty) > 10 else ''}; add images ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"or remove them")
    return ImageFolder(str(root), names, [p for p, _ in samples], [y for _, y in samples], skipped)


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


class Split(BaseModel):
    paths: list[str]
    labels: list[int]
    styles: list[tuple[str, float]]  # per image: the style applied when loading


class ClientPlan(BaseModel):
    partition: int
    style: tuple[str, float]
    train: Split
    val: Split
    test: Split
    general: Split
    classes: list[str] | None = None  # set by `local_plan`: the class names labels index into
    skipped: list[str] = []  # set by `local_plan`: unreadable files left out


class DataPlan(BaseModel):
    """The whole run's data: what plan.json holds, read back as the same typed object."""

    classes: list[str]
    seed: int  # styles are drawn per image from (seed, partition, split, index): see `style_seed`
    source: str  # "embedded" or the folder partitioned
    clients: list[ClientPlan]
    skipped: list[str] = []  # unreadable files left out at planning

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json())

    @classmethod
    def read(cls, path: Path) -> "DataPlan":
        return cls.model_validate_json(path.read_text())


def style_seed(seed: int, partition: int, split: str) -> int:
    """The seed of a split's style noise: training and the demo's image export must agree."""
    site = max(partition, 0)  # a real SuperNode (-1) has no partition id
    return seed * 7919 + (10_000 if split == "general" else site * 10 + SPLITS.index(split))


def style_for(partition: int, cfg) -> tuple[str, float]:
    if cfg.style_shift == "none":
        return CLEAN
    name = cfg.shared_style if cfg.style_shift == "shared" else cfg.styles[partition % len(cfg.styles)]
    spec = world.calibrated(name)
    return (spec.name, spec.strength)


def build_plan(cfg) -> DataPlan:
    """The simulation's data plan: every image checked, partitioned, split and styled."""
    from promptfolio.embedded.export import export_imagefolder

    if cfg.data == "embedded":
        clean = world.StyleSpec(*CLEAN)
        source = read_imagefolder(export_imagefolder(clean, cfg.images_per_class, seed=cfg.seed))
        general_source = read_imagefolder(export_imagefolder(clean, cfg.general_per_class, seed=cfg.seed + 10_000))
    else:
        source = read_imagefolder(cfg.data, skip_bad=cfg.skip_bad_images)
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
    general = Split(paths=general_paths, labels=general_labels, styles=general_styles)
    clients = []
    for pid, idx in enumerate(parts):
        style = style_for(pid, cfg)
        splits = [Split(paths=[source.paths[i] for i in s], labels=[source.labels[i] for i in s],
                        styles=[style] * len(s)) for s in split_three(idx, cfg.train_fraction, cfg.val_fraction, rng)]
        if len(splits[0].paths) == 0:
            raise DataError(f"client {pid} got no training images; use more images or fewer clients")
        clients.append(ClientPlan(partition=pid, style=style, train=splits[0], val=splits[1], test=splits[2],
                                  general=general))
    return DataPlan(classes=source.classes, seed=cfg.seed, source=str(cfg.data), clients=clients,
                    skipped=source.skipped)


def local_plan(data_path: str, classes: list[str] | None, seed: int, train: float, val: float,
               skip_bad: bool = False) -> ClientPlan:
    """A real SuperNode or a late joiner: its own image folder, split deterministically; no style,
    no shared set. classes: the federation's list, or None for the folder's own class folders."""
    folder = read_imagefolder(data_path, classes, skip_bad=skip_bad)
    if len(folder.paths) < 3:
        raise DataError(f"data folder {data_path} has {len(folder.paths)} images; a client needs at least 3")
    rng = np.random.default_rng(seed)
    made = [Split(paths=[folder.paths[i] for i in s], labels=[folder.labels[i] for i in s], styles=[CLEAN] * len(s))
            for s in split_three(np.arange(len(folder.paths)), train, val, rng)]
    return ClientPlan(partition=-1, style=CLEAN, train=made[0], val=made[1], test=made[2], general=made[2],
                      classes=folder.classes, skipped=folder.skipped)


def load_split(split: Split, seed: int) -> list[np.ndarray]:
    """uint8 images `[H, W, 3]`, upright, with each image's style applied (deterministic per image)."""
    images = []
    for i, (path, (name, strength)) in enumerate(zip(split.paths, split.styles)):
        arr = np.asarray(load_image(path))
        if strength > 0:
            arr = world.apply_style(arr, world.StyleSpec(name, strength), np.random.default_rng([seed, i]))
        images.append(arr)
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


def summary_lines(plan: DataPlan) -> list[str]:
    """What the user should see before training starts: classes, images per class, per client
    the split sizes (and style where one applies), and what was skipped."""
    counts: dict[int, int] = {}
    for client in plan.clients:
        for split in (client.train, client.val, client.test):
            for y in split.labels:
                counts[y] = counts.get(y, 0) + 1
    general = plan.clients[0].general if plan.clients else None
    own_general = general is not None and plan.source != "embedded"
    if own_general:
        for y in general.labels:
            counts[y] = counts.get(y, 0) + 1
    total = sum(counts.values())
    lines = [f"data: {plan.source}: {len(plan.classes)} classes, {total} images"
             + (f" ({len(plan.skipped)} unreadable skipped: {', '.join(Path(p).name for p in plan.skipped[:3])}"
                f"{' …' if len(plan.skipped) > 3 else ''})" if plan.skipped else "")]
    per_class = [f"{name} {counts.get(i, 0)}" for i, name in enumerate(plan.classes)]
    for i in range(0, len(per_class), 6):
        head = "  images per class: " if i == 0 else " " * 20
        lines.append(head + ", ".join(per_class[i : i + 6]))
    if general is not None:
        lines.append(f"  shared test set (generalization): {len(general.paths)} images"
                     + (" held out of the folder" if own_general else ""))
    for client in plan.clients:
        style = "" if client.style[1] == 0 else f"  style {client.style[0]} {client.style[1]:.2f}"
        lines.append(f"  client {client.partition}: train {len(client.train.paths)} / val {len(client.val.paths)} / "
                     f"test {len(client.test.paths)}{style}")
    return lines
