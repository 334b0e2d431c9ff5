"""A late joiner: a local prompt trained against a published global prompt, which stays frozen.

The objective is a federated client's (cross-entropy on the portfolio logits at the training θ),
with only the local prompt learning. θ is then chosen on a validation split of the folder, and
accuracy is reported on a held-out test split: global prompt alone against the mix.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from promptfolio import portfolio
from promptfolio.encoder import Encoder, load_encoder
from promptfolio.prompts import ClassPrompts, init_context, phrase_embedding
from prompts_store.artifact import ArtifactError, PromptMeta, artifact_bytes, read_artifact
from prompts_store.store import atomic_write, validate_tenant_id
from training import data as data_mod
from training.config import Method, TrainConfig
from training.task import ClientState, Features, choose_theta, local_train

LATE_JOINER = -1  # the partition id a site outside the simulation uses for its style seeds


@dataclass(frozen=True)
class PersonalizeResult:
    out: Path
    theta: float
    accuracy_global: float  # % on the held-out test split, global prompt alone
    accuracy_personalized: float  # % on the same split, the mix at θ
    n_train: int
    n_val: int
    n_test: int
    classes: list[str]
    global_sha256: str
    global_version: int | None
    skipped: list[str]


def fetch_global(url: str, key: str, timeout: float = 60.0) -> bytes:
    """The service's current global prompt artifact (any tenant key or the admin key)."""
    from promptfolio.client import Client

    with Client(url, key=key, timeout=timeout) as client:
        return client.download_global().data


def upload_local(url: str, tenant: str, key: str, data: bytes, timeout: float = 60.0) -> dict:
    from promptfolio.client import Client

    with Client(url, key=key, tenant=tenant, timeout=timeout) as client:
        return client.upload_local(data).model_dump()


def _initial_local(encoder: Encoder, cfg: TrainConfig, n_ctx: int, seed: int) -> torch.Tensor:
    """As a federated client starts: the init phrase when it has n_ctx tokens, else N(0, 0.02)."""
    if cfg.ctx_init and phrase_embedding(encoder, cfg.ctx_init).shape[0] == n_ctx:
        return init_context(encoder, phrase=cfg.ctx_init)
    return init_context(encoder, n_ctx=n_ctx, generator=torch.Generator().manual_seed(seed))


def _features(encoder: Encoder, split: data_mod.Split, seed: int, name: str) -> Features:
    images = data_mod.load_split(split, data_mod.style_seed(seed, LATE_JOINER, name))
    return Features(data_mod.encode_images(encoder, images), torch.tensor(split.labels, dtype=torch.int64))


def _accuracy(feats: Features, text: torch.Tensor) -> float:
    if len(feats.y) == 0:
        return float("nan")
    return float(((feats.x @ text.T).argmax(dim=1) == feats.y).float().mean() * 100)


def personalize(global_artifact: str | Path | bytes, data: str | Path, out: str | Path, *, tenant: str = "local",
                arch: str = "embedded", pretrained: str | None = "embedded", epochs: int = 20,
                train_theta: float = portfolio.DEFAULT_THETA, seed: int = 0, skip_bad_images: bool = False,
                config: TrainConfig | None = None, encoder: Encoder | None = None,
                progress: Callable[[str], None] | None = None) -> PersonalizeResult:
    """Train a local prompt on the image folder `data` (one sub-folder per class) against the frozen
    global prompt, choose θ on a validation split, write a local artifact to `out` that records the
    global prompt it was trained with, and report held-out accuracy before and after.

    global_artifact: a global prompt artifact (path or bytes), e.g. `global-promptfolio.safetensors`
    from `promptfolio train` or fetched from the service. config: the optimisation settings of a
    federated client (TrainConfig defaults: lr, batch, clipping, splits); `epochs` replaces its
    local epochs, as one run with one cosine schedule.
    """
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    validate_tenant_id(tenant)  # before any work: the artifact must name a valid tenant
    cfg = (config or TrainConfig()).model_copy(update={"local_epochs": epochs})
    encoder = encoder or load_encoder(arch, pretrained)
    raw = global_artifact if isinstance(global_artifact, bytes) else Path(global_artifact).read_bytes()
    g_ctx, g_meta = read_artifact(raw, encoder.fingerprint, encoder.text_width)
    if g_meta.kind != "global":
        raise ArtifactError(f"{global_artifact if not isinstance(global_artifact, bytes) else 'the artifact'} "
                            f"is a {g_meta.kind} prompt; personalize needs a global one")
    say(f"reading and checking every image of {data}")
    plan = data_mod.local_plan(str(data), None, seed, cfg.train_fraction, cfg.val_fraction, skip_bad=skip_bad_images)
    classes = plan.classes or []
    say(f"{len(classes)} classes; train {len(plan.train.paths)} / val {len(plan.val.paths)} / "
        f"test {len(plan.test.paths)} images" + (f"; {len(plan.skipped)} unreadable skipped" if plan.skipped else ""))
    train, val, test = (_features(encoder, getattr(plan, s), seed, s) for s in ("train", "val", "test"))
    prompts = ClassPrompts(encoder, classes, g_ctx.shape[0])
    method = Method("promptfolio", train_theta)
    state = ClientState(local={method.key: _initial_local(encoder, cfg, g_ctx.shape[0], seed)})
    say(f"training the local prompt for {epochs} epochs against the frozen global prompt "
        f"(sha256 {g_meta.content_sha256[:12]}…)")
    local_train(encoder, prompts, train, {method.key: g_ctx}, state, [method], cfg, seed=seed, frozen_global=True)
    local_ctx = state.local[method.key]
    with torch.no_grad():
        t_global, t_local = prompts.encode_many(torch.stack([g_ctx, local_ctx]))
    theta = choose_theta(encoder, val, t_global, t_local, cfg)[0] if len(val.y) else train_theta
    meta = PromptMeta(kind="local", tenant=tenant, encoder=encoder.fingerprint, n_ctx=local_ctx.shape[0],
                      width=local_ctx.shape[1], classes=classes, theta=theta, producer="personalize",
                      global_sha256=g_meta.content_sha256, global_version=g_meta.version or None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, artifact_bytes(local_ctx, meta))
    return PersonalizeResult(out=out, theta=theta, accuracy_global=_accuracy(test, t_global),
                             accuracy_personalized=_accuracy(test, portfolio.mix(t_global, t_local, theta)),
                             n_train=len(train.y), n_val=len(val.y), n_test=len(test.y), classes=classes,
                             global_sha256=g_meta.content_sha256, global_version=g_meta.version or None,
                             skipped=plan.skipped)
