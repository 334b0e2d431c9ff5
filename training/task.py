"""Local training and evaluation of a client, for every method of the run at once.

Per step, all contexts of all methods (each method's copy of the global prompt and its local
prompt) go through the text encoder in one `encode_many` call; each method's loss is plain
cross-entropy on its portfolio logits (for promptfolio-auto, summed over θ = 0, ½, 1: its
reported loss is that sum). Parameters of different methods are disjoint and SGD is
per-parameter, so summing the losses trains each method exactly as if it ran alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from promptfolio import portfolio
from promptfolio.encoder import Encoder
from promptfolio.prompts import ZERO_SHOT_PHRASE, ClassPrompts, encode_classes, init_context
from training.config import Method, TrainConfig

THETA_PRIOR_KEY = "theta-prior"  # evaluate config: the pooled per-θ validation curves (JSON), per auto method


@dataclass
class Features:
    x: torch.Tensor  # [N, D] normalised image features
    y: torch.Tensor  # [N] int64 labels


@dataclass
class ClientState:
    """What a client keeps to itself across rounds."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # method key -> ctx [n_ctx, width]
    theta: dict[str, float] = field(default_factory=dict)  # method key -> θ in use (auto methods)


def theta_of(method: Method, state: ClientState) -> float:
    if method.theta is not None:
        return method.theta
    return state.theta.get(method.key, portfolio.DEFAULT_THETA)


def initial_context(encoder: Encoder, cfg: TrainConfig, seed: int) -> torch.Tensor:
    if cfg.ctx_init:
        ctx = init_context(encoder, phrase=cfg.ctx_init)
        if ctx.shape[0] != cfg.n_ctx:
            raise ValueError(f"ctx_init {cfg.ctx_init!r} has {ctx.shape[0]} tokens but n_ctx={cfg.n_ctx}")
        return ctx
    return init_context(encoder, n_ctx=cfg.n_ctx, generator=torch.Generator().manual_seed(seed))


def ensure_local(state: ClientState, methods: list[Method], encoder: Encoder, cfg: TrainConfig, seed: int) -> None:
    for m in methods:
        if m.trains_local and m.key not in state.local:
            state.local[m.key] = initial_context(encoder, cfg, seed)


def _mixed(method: Method, t_global: torch.Tensor | None, t_local: torch.Tensor | None, theta: float) -> torch.Tensor:
    if method.name == "promptfl":
        return t_global
    if method.name == "local":
        return t_local
    return portfolio.mix(t_global, t_local, theta)


def method_loss(method: Method, t_global: torch.Tensor | None, t_local: torch.Tensor | None, state: ClientState,
                x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one method's portfolio logits; an auto method sums it over AUTO_TRAIN_THETAS
    (a sum, not a mean: with each prompt clipped on its own, both ends then learn about as fast as
    the `promptfl` and `local` methods do; a mean trained θ=1 ~2 points below `local` in 10 rounds)."""
    if method.theta is None:
        return sum(F.cross_entropy(portfolio.logits(x, portfolio.mix(t_global, t_local, t), scale), y)
                   for t in portfolio.AUTO_TRAIN_THETAS)
    return F.cross_entropy(portfolio.logits(x, _mixed(method, t_global, t_local, theta_of(method, state)), scale), y)


def clip_groups(trained: list[Method], order: list[tuple[str, str]], params: dict[tuple[str, str], torch.Tensor]
                ) -> list[list[torch.Tensor]]:
    """What one gradient-norm clip covers: a method's prompts together, but an auto method's global
    and local prompt each alone, so that neither end of its mix trains slower than its extreme."""
    groups = []
    for m in trained:
        keys = [k for k in order if k[0] == m.key]
        groups.extend([[params[k]] for k in keys] if m.theta is None else [[params[k] for k in keys]])
    return groups


def local_train(encoder: Encoder, prompts: ClassPrompts, data: Features, globals_: dict[str, torch.Tensor],
                state: ClientState, methods: list[Method], cfg: TrainConfig, seed: int, frozen_global: bool = False
                ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train every method's (global copy, local) on this client's data; returns the updated global
    copies (to send) and the mean training loss per method. Local prompts update in `state`.

    frozen_global: the global prompts stay fixed and only the local prompts learn, with the same
    mixed-logit objective (a late joiner personalizing against a published global prompt).
    """
    trained = [m for m in methods if m.trains_local or (m.trains_global and not frozen_global)]
    if not trained:
        return {}, {}
    if len(data.y) == 0:
        raise ValueError("this client has no training samples")
    params: dict[tuple[str, str], torch.Tensor] = {}
    for m in trained:
        if m.trains_global and not frozen_global:
            params[(m.key, "global")] = globals_[m.key].detach().clone().requires_grad_(True)
        if m.trains_local:
            params[(m.key, "local")] = state.local[m.key].detach().clone().requires_grad_(True)
    fixed: dict[tuple[str, str], torch.Tensor] = {}  # features of frozen global prompts, computed once
    frozen = [m.key for m in trained if m.trains_global and frozen_global]
    if frozen:
        with torch.no_grad():
            feats = prompts.encode_many(torch.stack([globals_[k] for k in frozen]))  # [K, C, D]
            fixed = {(k, "global"): f for k, f in zip(frozen, feats)}
    order = list(params)
    opt = torch.optim.SGD(list(params.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n = len(data.y)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = steps_per_epoch * cfg.local_epochs
    scale = encoder.model.logit_scale.detach().cpu()
    gen = torch.Generator().manual_seed(seed)
    losses = {m.key: 0.0 for m in trained}
    step = 0
    for _ in range(cfg.local_epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            batch = perm[start : start + cfg.batch_size]
            for group in opt.param_groups:  # cosine schedule over this round's local steps
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            feats = prompts.encode_many(torch.stack([params[k] for k in order]))  # [K, C, D]
            by_key = {**fixed, **dict(zip(order, feats))}
            loss_sum = 0.0
            for m in trained:
                loss = method_loss(m, by_key.get((m.key, "global")), by_key.get((m.key, "local")), state,
                                   data.x[batch], data.y[batch], scale)
                losses[m.key] += loss.item() / total
                loss_sum = loss_sum + loss
            opt.zero_grad(set_to_none=True)
            loss_sum.backward()
            if cfg.clip_norm is not None:  # per client and per method: prompts diverge without it
                for group in clip_groups(trained, order, params):
                    torch.nn.utils.clip_grad_norm_(group, cfg.clip_norm)
            opt.step()
            step += 1
    for m in trained:
        if m.trains_local:
            state.local[m.key] = params[(m.key, "local")].detach().clone()
    updated = {key: params[(key, part)].detach().clone() for key, part in order if part == "global"}
    return updated, losses


def choose_theta(encoder: Encoder, val: Features, t_global: torch.Tensor, t_local: torch.Tensor, cfg: TrainConfig,
                 prior: portfolio.ThetaCurve | None = None) -> tuple[float, portfolio.ThetaCurve]:
    """This client's θ from its validation curve, shrunk toward the federation's pooled curve
    (`prior`, from the previous evaluation round) by `cfg.theta_prior_weight`; and the curve."""
    curve = portfolio.theta_curve(val.x, val.y, t_global, t_local, encoder.model.logit_scale.detach().cpu(),
                                  tuple(cfg.theta_grid))
    return portfolio.select_theta(curve, prior, cfg.theta_prior_weight).theta, curve


def pooled_theta_curves(eval_rows: list[dict], grid: tuple[float, ...]) -> dict[str, portfolio.ThetaCurve]:
    """The server's side: per auto method, every client's reported validation curve pooled."""
    keys = sorted({k.removeprefix("val-loss/") for row in eval_rows for k in row if k.startswith("val-loss/")})
    pooled = {}
    for key in keys:
        curves = [portfolio.ThetaCurve(grid, tuple(r[f"val-accuracy/{key}"]), tuple(r[f"val-loss/{key}"]),
                                       int(r[f"val-n/{key}"])) for r in eval_rows if f"val-loss/{key}" in r]
        if (curve := portfolio.pool_curves(curves)) is not None:
            pooled[key] = curve
    return pooled


def encode_theta_priors(priors: dict[str, portfolio.ThetaCurve]) -> str:
    return json.dumps({k: {"accuracy": list(c.accuracy), "loss": list(c.loss), "n": c.n} for k, c in priors.items()})


def decode_theta_priors(text: str | None, grid: tuple[float, ...]) -> dict[str, portfolio.ThetaCurve]:
    raw = json.loads(text) if text else {}
    return {k: portfolio.ThetaCurve(grid, tuple(v["accuracy"]), tuple(v["loss"]), int(v["n"])) for k, v in raw.items()}


@torch.no_grad()
def evaluate(encoder: Encoder, prompts: ClassPrompts, splits: dict[str, Features], val: Features,
             globals_: dict[str, torch.Tensor], state: ClientState, methods: list[Method], cfg: TrainConfig,
             priors: dict[str, portfolio.ThetaCurve] | None = None) -> dict[str, dict[str, float | list[float]]]:
    """Accuracy (%) per method on each split; auto methods first choose θ on the validation split
    (shrunk toward `priors[method]`, the federation's pooled curve) and report their curve."""
    keys = [k for k in globals_] + [k for k in state.local]
    stacked = prompts.encode_many(torch.stack([globals_[k] for k in globals_] + [state.local[k] for k in state.local])) \
        if keys else None
    t_global = {k: stacked[i] for i, k in enumerate(globals_)} if keys else {}
    t_local = {k: stacked[len(globals_) + i] for i, k in enumerate(state.local)} if keys else {}
    zero_shot = None
    out: dict[str, dict[str, float | list[float]]] = {}
    for m in methods:
        curve = None
        if m.name == "zero-shot":
            if zero_shot is None:
                zero_shot = encode_classes(encoder, init_context(encoder, phrase=ZERO_SHOT_PHRASE), prompts.class_names)
            text, theta = zero_shot, 0.0
        else:
            if m.theta is None and len(val.y) > 0:
                state.theta[m.key], curve = choose_theta(encoder, val, t_global[m.key], t_local[m.key], cfg,
                                                         (priors or {}).get(m.key))
            theta = theta_of(m, state)
            text = _mixed(m, t_global.get(m.key), t_local.get(m.key), theta)
        row: dict[str, float | list[float]] = {"theta": theta}
        if curve is not None:  # what the server pools into the next round's prior
            row.update({"val-accuracy": list(curve.accuracy), "val-loss": list(curve.loss), "val-n": curve.n})
        for name, split in splits.items():
            if len(split.y):
                pred = (split.x @ text.T).argmax(dim=1)
                row[name] = float((pred == split.y).float().mean() * 100)
        out[m.key] = row
    return out
