"""The serving engine: one frozen encoder, the prompts store, cached class features, batching.

Because the encoder is frozen, `T(p, classes)` is a constant per (prompt content, class list): it
is computed when a write changes what a tenant serves, before the store's pointer moves (see
service/writes.py), and kept in an LRU cache and on disk. A classify asks the store one question
("what does this tenant serve?"), finds both feature matrices in the cache, and costs one image
encoding plus a `[B, D] x [D, C]` product; a per-request θ costs nothing since the mix happens
on features.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from prompts_store.artifact import content_sha256
from prompts_store.errors import StoreError, Unservable
from prompts_store.pointers import Serving
from prompts_store.store import PromptStore
from promptfolio import portfolio
from promptfolio.encoder import Encoder, load_encoder
from promptfolio.prompts import encode_classes, init_context
from service import images as image_io
from service import metrics
from service.backends import make_backend
from service.admission import AdmissionGate
from service.batcher import REQUEST_CLOCK, FairPool, MicroBatcher, RequestClock, background_thread
from service.config import ServiceConfig
from service.features import FeatureCache, classes_digest, load_persisted, persist
from service.gpu_decode import make_decoder
from service.guard import APIError
from service.schemas import Classification, Prediction

ZERO_SHOT_PHRASE = "a photo of a"  # the global prompt until one is published (version 0)
log = logging.getLogger("promptfolio.service")


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
    serving: Serving

    def summary(self) -> dict:
        """The served pair as the API reports it."""
        s = self.serving
        return {"global_version": self.global_version, "local_version": self.local_version, "theta": self.theta,
                "pinned": s.pinned, "trained_together": s.trained_together}


class Engine:
    def __init__(self, cfg: ServiceConfig, encoder: Encoder | None = None):
        self.cfg = cfg
        start = time.perf_counter()
        self.encoder = encoder or load_encoder(cfg.arch, cfg.pretrained, cfg.resolved_device())
        self.load_seconds = time.perf_counter() - start
        self.zero_shot_ctx = init_context(self.encoder, phrase=ZERO_SHOT_PHRASE)
        self.zero_shot_sha256 = content_sha256(self.zero_shot_ctx)
        # the service creates its store when the folder holds none (a container's first start on an empty
        # volume); `promptfolio serve` refuses a missing store unless --init, where a typo is likelier
        self.store = PromptStore(cfg.store, self.encoder.fingerprint, self.encoder.text_width, create=True,
                                 builtin_global_sha256=self.zero_shot_sha256)
        if self.store.migrated:
            log.warning("moved %d tenant folders of the old flat layout to tenants/_abc/<id>", self.store.migrated)
        self.recovered_tmp_files = self.store.recover()
        self.cache = FeatureCache(int(cfg.cache_mb * (1 << 20)))
        self.contexts = FeatureCache(16 << 20)  # prompt contexts by content hash (a few KiB each)
        self.encoder_tag = hashlib.sha256(self.encoder.fingerprint.encode()).hexdigest()[:12]
        # one writer at a time inside the service: a write's check and its commit see the same state
        self.write_lock = threading.RLock()
        self.backend = make_backend(cfg.backend, self.encoder, cfg.onnx_cache, cfg.onnx_providers, cfg.precision,
                                    probe_batch=cfg.max_batch, threads=cfg.encoder_threads or None)
        # With the encoder in ONNX Runtime, torch only does small per-request ops (batched normalise, the
        # [B, D] x [D, C] ranking): on more threads its OpenMP workers spin at each one (10-40x the CPU
        # when the cores are busy). The text encoder, off the request path, gets the cores back while it runs.
        self.text_threads = torch.get_num_threads()
        self.text_worker = ThreadPoolExecutor(1, thread_name_prefix="pf-text", initializer=background_thread,
                                              initargs=("pf-text",))
        if self.backend.name != "torch":
            torch.set_num_threads(1)
        self.batcher = MicroBatcher(self.backend, cfg.max_batch, cfg.max_wait_ms, cfg.max_pending_images,
                                    cfg.admission_deadline_s)
        self.decode_pool = FairPool(cfg.decode_threads, deadline_s=cfg.admission_deadline_s)
        self.gpu_decoder = make_decoder(cfg.gpu_decode, self.encoder, cfg.max_decoded_pixels)
        self.admission = AdmissionGate(cfg.admission_deadline_s)
        self.preprocess = image_io.SplitPreprocess.of(self.encoder.preprocess)  # batched ToTensor + Normalize
        self.image_limits = image_io.ImageLimits(
            cfg.max_image_pixels, cfg.max_decoded_pixels, cfg.max_image_side, cfg.max_image_aspect,
            cfg.max_resized_pixels, self.encoder.image_size)

    # ---- text side ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _text_threads(self):
        previous = torch.get_num_threads()
        torch.set_num_threads(self.text_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def _encode_text(self, ctx: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """On the text thread, at a lower OS priority (as large decodes run): an upload's or a cold
        tenant's text encoding yields the cores to classify requests already admitted."""
        with self._text_threads():
            return encode_classes(self.encoder, ctx, classes).cpu()

    def features(self, tenant: str | None, sha256: str, classes: list[str],
                 load_ctx: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """`T(p, classes)` `[C, D]` of the prompt with content `sha256` in `tenant`'s scope (None:
        global): from memory, else from disk, else encoded and persisted. Unservable if it cannot be."""
        digest = classes_digest(classes)
        key = ("global" if tenant is None else tenant, sha256, digest)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        path = self.store.feature_path(tenant, sha256, digest, self.encoder_tag)
        feats = load_persisted(path, (len(classes), self.encoder.embed_dim))
        if feats is None:
            ctx = load_ctx()
            try:
                feats = self.text_worker.submit(self._encode_text, ctx, classes).result()
            except ValueError as e:  # e.g. class names too long for the context length with this n_ctx
                raise Unservable(str(e)) from None
            if not torch.isfinite(feats).all():
                raise Unservable(f"its class features are not finite (the context's values, up to "
                                 f"{float(ctx.abs().max()):.3g} in magnitude, overflow the text encoder)")
            persist(path, feats, self.store.tmp_dir)
        self.cache.put(key, feats)
        return feats, False

    def _context(self, tenant: str | None, version: int, sha256: str | None, what: str) -> torch.Tensor:
        """A stored prompt's context, read and validated once per content (kept by content hash: a global
        prompt that many class lists need is loaded once, not once per list)."""
        cached = None if sha256 is None else self.contexts.get(("ctx", sha256))
        if cached is not None:
            return cached
        stored = self.store.load(tenant, version)
        if sha256 is not None and stored.meta.content_sha256 != sha256:
            raise StoreError(f"{what} no longer holds the content it was stored with")
        self.contexts.put(("ctx", stored.meta.content_sha256), stored.ctx)
        return stored.ctx

    def _global_loader(self, serving: Serving) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if serving.global_version == 0:
                return self.zero_shot_ctx
            return self._context(None, serving.global_version, serving.global_sha256,
                                 f"global version {serving.global_version}")
        return load

    def _local_loader(self, serving: Serving) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            return self._context(serving.tenant, serving.local_version, serving.local_sha256,
                                 f"local version {serving.local_version} of {serving.tenant!r}")
        return load

    def view(self, tenant: str, theta: float | None = None, serving: Serving | None = None,
             global_ctx: torch.Tensor | None = None, local_ctx: torch.Tensor | None = None) -> TenantView:
        """The features of what `tenant` serves (or of `serving`, a preview a write checks before it
        commits, with the new prompts' contexts given directly)."""
        override = None if theta is None else portfolio.check_theta(theta)  # a bad θ is a 400 either way
        s = serving or self.store.serving(tenant)
        g_sha = s.global_sha256 or self.zero_shot_sha256
        try:
            t_global, hit_g = self.features(None, g_sha, s.classes, (lambda: global_ctx) if global_ctx is not None
                                            else self._global_loader(s))
            t_local, hit_l = None, True
            if s.local_sha256 is not None:
                t_local, hit_l = self.features(tenant, s.local_sha256, s.classes, (lambda: local_ctx)
                                               if local_ctx is not None else self._local_loader(s))
        except Unservable as e:
            local = ("no local prompt" if s.local_sha256 is None else f"local version {s.local_version}"
                     if s.local_version is not None else "the uploaded local prompt")
            raise Unservable(f"cannot serve tenant {tenant!r} with global version {s.global_version} and {local}: "
                             f"{e}") from None
        if t_local is None:
            effective = 0.0  # nothing to mix yet: the global prompt alone
        else:  # request override, then the tenant's setting, then the θ its artifact carries
            effective = next(t for t in (override, s.theta_setting, s.local_theta, portfolio.DEFAULT_THETA)
                             if t is not None)
        return TenantView(tenant, s.classes, t_global, t_local, s.global_version, s.local_version, effective,
                          hit_g and hit_l, s)

    # ---- classification -----------------------------------------------------------------
    async def classify(self, tenant: str, images: list[tuple[bytes, str]], top_k: int,
                       theta: float | None = None, clock: RequestClock | None = None) -> Classification:
        """Image files `(bytes, name)` -> decode (fairly, bounded per image) -> encode (batched fairly
        between tenants) -> rank against the tenant's classes. `clock`: the request's wait so far,
        for shedding late work (default: it arrived now)."""
        clock = clock or RequestClock(time.monotonic())
        REQUEST_CLOCK.set(clock)  # this request's task: decode workers add their time to it
        view = await asyncio.to_thread(self.view, tenant, theta)  # a bad θ is a 400 before any decode
        metrics.count_cache(view.cache_hit)
        if self.gpu_decoder is not None:  # service/gpu_decode.py: JPEGs on the GPU, the rest on the CPU
            limits = self.image_limits
            probed = [image_io.probe(data, name, limits) for data, name in images]  # headers first
            pixels = await self.gpu_decoder.decode(self.decode_pool, tenant, images, probed,
                                                   self.encoder.preprocess, limits.target_size)
        else:  # every header checked before decoding; decoded in groups on the fair pool
            pixels = await image_io.decode_request(self.decode_pool, tenant, images, self.image_limits,
                                                   self.preprocess)
        feats = await self.batcher.encode(pixels, key=tenant, clock=clock)
        ranked = self.rank(view, feats, top_k)
        return Classification(tenant=tenant, **view.summary(),
                              predictions=[Prediction(file=name, top=top) for (_, name), top in zip(images, ranked)])

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
