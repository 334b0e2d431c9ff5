"""The serving engine: one frozen encoder, the prompts store, cached class features, batching.

Because the encoder is frozen, `T(p, classes)` is a constant per (prompt version, class list):
it is computed when a version or class list changes (an upload computes it before returning)
and kept in an LRU cache shared by tenants, so tenants with the same classes share the global
features. A request then costs one image encoding plus a `[B, D] x [D, C]` product, and a
per-request θ costs nothing since the mix happens on features.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from prompts_store.store import PromptStore, atomic_write
from promptfolio import portfolio
from promptfolio.encoder import Encoder, load_encoder
from promptfolio.prompts import encode_classes, init_context
from service import images as image_io
from service import metrics
from service.backends import make_backend
from service.batcher import AdmissionGate, FairPool, MicroBatcher
from service.config import ServiceConfig
from service.guard import APIError

ZERO_SHOT_PHRASE = "a photo of a"
log = logging.getLogger("promptfolio.service")  # the global prompt until one is published (version 0)


def classes_digest(classes: list[str]) -> str:
    return hashlib.sha256("\x1f".join(classes).encode()).hexdigest()[:16]


class FeatureCache:
    """LRU of class-feature matrices keyed by (scope, version, classes digest), bounded in bytes."""

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

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class TenantView:
    """What one classification of a tenant uses: class list, both feature branches, versions, θ."""

    tenant: str
    classes: list[str]
    t_global: torch.Tensor  # [C, D]
    t_local: torch.Tensor | None  # [C, D]
    global_version: int  # 0: the built-in zero-shot prompt
    local_version: int | None
    theta: float  # effective θ (0 when the tenant has no local prompt yet)
    cache_hit: bool


class Engine:
    def __init__(self, cfg: ServiceConfig, encoder: Encoder | None = None):
        self.cfg = cfg
        start = time.perf_counter()
        self.encoder = encoder or load_encoder(cfg.arch, cfg.pretrained, cfg.resolved_device())
        self.load_seconds = time.perf_counter() - start
        self.store = PromptStore(cfg.store, self.encoder.fingerprint, self.encoder.text_width)
        self.recovered_tmp_files = self.store.recover()
        self.cache = FeatureCache(int(cfg.cache_mb * (1 << 20)))
        self._artifact_theta: dict[tuple[str, int], float | None] = {}  # θ a local artifact carries
        self.zero_shot_ctx = init_context(self.encoder, phrase=ZERO_SHOT_PHRASE)
        self.backend = make_backend(cfg.backend, self.encoder, cfg.onnx_cache, cfg.onnx_providers)
        self.batcher = MicroBatcher(self.backend, cfg.max_batch, cfg.max_wait_ms, cfg.max_pending_images,
                                    cfg.admission_deadline_s)
        self.decode_pool = FairPool(cfg.decode_threads)
        self.admission = AdmissionGate(cfg.admission_deadline_s)
        self.image_limits = image_io.ImageLimits(
            cfg.max_image_pixels, cfg.max_decoded_pixels, cfg.max_image_side, cfg.max_image_aspect,
            cfg.max_resized_pixels, self.encoder.image_size)

    # ---- text side ----------------------------------------------------------------------
    def _features(self, scope: str, version: int, ctx_loader, classes: list[str]) -> tuple[torch.Tensor, bool]:
        key = (scope, version, classes_digest(classes))
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        feats = self._persisted(key, len(classes))
        if feats is None:
            feats = encode_classes(self.encoder, ctx_loader(), classes).cpu()
            self._persist(key, feats)
        self.cache.put(key, feats)
        return feats, False

    # Features are persisted beside the store, so a cold tenant (after a restart or an eviction)
    # loads a [C, D] matrix instead of running the text encoder (seconds for 100 ViT-B-32 classes).
    def _feature_file(self, key: tuple) -> Path:
        name = hashlib.sha256(repr((self.encoder.fingerprint, *key)).encode()).hexdigest()[:32]
        return self.store.root / "features" / f"{name}.safetensors"

    def _persisted(self, key: tuple, n_classes: int) -> torch.Tensor | None:
        path = self._feature_file(key)
        try:
            feats = load_file(str(path))["features"]
        except (FileNotFoundError, KeyError, SafetensorError, OSError):
            return None
        if feats.shape != (n_classes, self.encoder.embed_dim) or not torch.isfinite(feats).all():
            return None  # stale or damaged: recompute
        return feats

    def _persist(self, key: tuple, feats: torch.Tensor) -> None:
        path = self._feature_file(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save({"features": feats.contiguous()}))
        except OSError as e:  # a read-only store still serves, it just recomputes after restarts
            log.warning("could not persist class features to %s: %s", path, e)

    def view(self, tenant: str, theta: float | None = None) -> TenantView:
        """The tenant's current features; computes (and caches) whatever is missing."""
        record = self.store.tenant(tenant)
        g_version = self.store.current_version(None) or 0
        l_version = self.store.current_version(tenant)
        local_meta_theta = None

        def global_ctx() -> torch.Tensor:
            stored = self.store.load(None, g_version) if g_version else None
            return stored.ctx if stored else self.zero_shot_ctx

        t_global, hit_g = self._features("global", g_version, global_ctx, record.classes)
        t_local, hit_l = None, True
        if l_version is not None:
            key = (tenant, l_version)

            def local_ctx() -> torch.Tensor:
                stored = self.store.load(tenant, l_version)
                self._artifact_theta[key] = stored.meta.theta
                return stored.ctx

            t_local, hit_l = self._features(f"tenant:{tenant}", l_version, local_ctx, record.classes)
            if key not in self._artifact_theta:
                self._artifact_theta[key] = self.store.load(tenant, l_version).meta.theta
            local_meta_theta = self._artifact_theta[key]
        override = None if theta is None else portfolio.check_theta(theta)  # a bad θ is a 400 either way
        if t_local is None:
            effective = 0.0  # nothing to mix yet: the global prompt alone
        else:  # request override, then the tenant's setting, then the θ its artifact carries
            effective = next(t for t in (override, record.theta, local_meta_theta, portfolio.DEFAULT_THETA)
                             if t is not None)
        return TenantView(tenant, record.classes, t_global, t_local, g_version, l_version, effective,
                          hit_g and hit_l)

    def warm(self, tenant: str) -> TenantView:
        """Compute a tenant's features now (after an upload, a rollback or a class change)."""
        return self.view(tenant)

    # ---- classification -----------------------------------------------------------------
    async def classify(self, tenant: str, images: list[tuple[bytes, str]], top_k: int,
                       theta: float | None = None) -> dict:
        """Decode (fairly, bounded per image) -> encode (batched fairly between tenants) -> rank."""
        view = await asyncio.to_thread(self.view, tenant, theta)  # a bad θ is a 400 before any decode
        metrics.count_cache(view.cache_hit)
        pool, limits = self.decode_pool, self.image_limits
        probed = await asyncio.gather(*[pool.run(tenant, functools.partial(image_io.probe, data, name, limits))
                                        for data, name in images])  # every header checked before decoding
        tensors = await asyncio.gather(*[
            pool.run(tenant, functools.partial(image_io.decode_probed, p, self.encoder.preprocess,
                                               limits.target_size), heavy=not p.light) for p in probed])
        feats = await self.batcher.encode(torch.stack(tensors), key=tenant)
        ranked = self.rank(view, feats, top_k)
        return {"tenant": tenant, "global_version": view.global_version, "local_version": view.local_version,
                "theta": view.theta,
                "predictions": [{"file": name, "top": top} for (_, name), top in zip(images, ranked)]}

    def rank(self, view: TenantView, image_features: torch.Tensor, top_k: int) -> list[list[dict]]:
        """`[B, D]` -> per image the top-k (label, score) with softmax scores over the tenant's classes."""
        text = view.t_global if view.t_local is None else portfolio.mix(view.t_global, view.t_local, view.theta)
        probs = portfolio.logits(image_features, text, self.encoder.model.logit_scale.detach().cpu()).softmax(dim=-1)
        if not torch.isfinite(probs).all():  # never a null score: a prompt whose features overflow
            log.error("non-finite scores for tenant %s (global v%s, local v%s)", view.tenant, view.global_version,
                      view.local_version)
            raise APIError(409, f"tenant {view.tenant!r}: the current prompts (global v{view.global_version}, "
                                f"local v{view.local_version}) give non-finite scores; upload a new local prompt "
                                "or roll back")
        k = min(top_k, len(view.classes))
        scores, idx = probs.topk(k, dim=-1)
        return [[{"label": view.classes[i], "score": round(float(s), 6)} for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), idx.tolist())]
