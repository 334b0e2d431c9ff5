"""Class features `T(p, classes)`: an LRU in memory, persisted beside the store by prompt content.

A feature matrix depends only on (encoder, prompt content, class list), so it is keyed by the
prompt's content hash rather than its version number: a write can compute and persist it before
the store assigns a version (validate before commit), and a rollback finds it already there.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from prompts_store.files import atomic_write
from prompts_store.tenant_index import classes_digest  # noqa: F401 - the store records class lists by it

log = logging.getLogger("promptfolio.service")


class FeatureCache:
    """LRU of class-feature matrices keyed by (scope, content hash, classes digest), bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.numel() * evicted.element_size()

    def drop_scope(self, scope: str) -> None:
        """Forget every entry of one scope (a deleted tenant's features)."""
        with self._lock:
            for key in [k for k in self._items if k[0] == scope]:
                value = self._items.pop(key)
                self.bytes -= value.numel() * value.element_size()

    def __len__(self) -> int:
        return len(self._items)


def load_persisted(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """Persisted features, or None when missing, stale or damaged (the caller recomputes)."""
    try:
        feats = load_file(str(path))["features"]
    except (FileNotFoundError, KeyError, SafetensorError, OSError):
        return None
    if tuple(feats.shape) != shape or not torch.isfinite(feats).all():
        return None
    return feats


def persist(path: Path, feats: torch.Tensor, tmp_dir: Path | None = None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save({"features": feats.contiguous()}), tmp_dir)
    except OSError as e:  # a read-only store still serves, it just recomputes after restarts
        log.warning("could not persist class features to %s: %s", path, e)
