"""The portfolio: mixing the global and local class features, logits, and choosing θ.

    T_mix  = (1 - θ) · norm(T_G) + θ · norm(T_L)         [C, D], not renormalised
    logits = exp(logit_scale) · norm(f_img) · T_mixᵀ     [B, C]

θ = 0 is PromptFL (global prompt only), θ = 1 is a purely local prompt (CoOp trained locally).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_THETA = 0.4  # the official code's default
THETA_GRID = tuple(round(0.1 * i, 1) for i in range(11))
# A per-client θ (promptfolio-auto) trains the mix at both ends and the middle, so that whichever
# θ validation picks afterwards is one the prompts were trained for: θ=0 then matches PromptFL
# and θ=1 a local-only prompt. Trained at the chosen θ alone, the local prompt becomes a residual
# of the global one and θ=1 falls far below local-only (README, per-client θ).
AUTO_TRAIN_THETAS = (0.0, 0.5, 1.0)


def check_theta(theta: float) -> float:
    """θ as a float in [0, 1]; anything else is a ValueError naming it."""
    try:
        value = float(theta)
    except (TypeError, ValueError):
        raise ValueError(f"θ must be a number in [0, 1], got {theta!r}") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"θ must be in [0, 1], got {theta!r}")
    return value


def mix(t_global: torch.Tensor, t_local: torch.Tensor, theta: float) -> torch.Tensor:
    """`[C, D]` x2 -> `[C, D]`: each branch L2-normalised, then the convex mix."""
    theta = check_theta(theta)
    if t_global.shape != t_local.shape:
        raise ValueError(f"global {tuple(t_global.shape)} and local {tuple(t_local.shape)} features differ in shape")
    return (1.0 - theta) * F.normalize(t_global, dim=-1) + theta * F.normalize(t_local, dim=-1)


def logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """image `[B, D]` (any norm), text `[C, D]` (already mixed) -> `[B, C]`."""
    scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device).exp()
    return scale * F.normalize(image_features, dim=-1) @ text_features.T


def class_probabilities(image_features: torch.Tensor, t_global: torch.Tensor, t_local: torch.Tensor | None,
                        theta: float, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """image `[B, D]` -> softmax over the classes `[B, C]`: the global branch alone when there is no
    local prompt, else the portfolio mix at θ (what serving and `Classifier.predict` answer)."""
    text = t_global if t_local is None else mix(t_global, t_local, theta)
    return logits(image_features, text, logit_scale).softmax(dim=-1)


@dataclass(frozen=True)
class ThetaCurve:
    """One client's validation metrics per θ of the grid (what it may share: no data, no prompts)."""

    grid: tuple[float, ...]
    accuracy: tuple[float, ...]  # fraction correct, in [0, 1]
    loss: tuple[float, ...]  # mean cross-entropy of the scaled portfolio logits
    n: int  # validation examples behind the curve

    def __post_init__(self):
        if not (len(self.grid) == len(self.accuracy) == len(self.loss)) or not self.grid:
            raise ValueError("a θ curve needs one accuracy and one loss per θ of a non-empty grid")
        if self.n < 0:
            raise ValueError(f"a θ curve needs n >= 0, got {self.n}")


@dataclass(frozen=True)
class ThetaChoice:
    theta: float
    accuracy: float  # own validation accuracy at the chosen θ, in [0, 1]
    grid: tuple[float, ...]
    accuracies: tuple[float, ...]  # own validation accuracy per θ
    scores: tuple[float, ...]  # what was maximised per θ: the (shrunk) validation accuracy


@torch.no_grad()
def theta_curve(image_features: torch.Tensor, labels: torch.Tensor, t_global: torch.Tensor, t_local: torch.Tensor,
                logit_scale: torch.Tensor | float, grid: tuple[float, ...] = THETA_GRID) -> ThetaCurve:
    """Validation accuracy and cross-entropy of the mix at every θ of the grid."""
    labels = torch.as_tensor(labels, device=image_features.device)
    if len(labels) == 0:
        raise ValueError("a θ curve needs at least one labelled validation example")
    grid = tuple(check_theta(t) for t in grid)
    acc, loss = [], []
    for t in grid:
        out = logits(image_features.float(), mix(t_global.float(), t_local.float(), t), logit_scale)
        acc.append(float((out.argmax(dim=1) == labels).float().mean()))
        loss.append(float(F.cross_entropy(out, labels)))
    return ThetaCurve(grid, tuple(acc), tuple(loss), len(labels))


def pool_curves(curves: list[ThetaCurve]) -> ThetaCurve | None:
    """The federation's curve: every client's curve weighted by its validation size (None if no data)."""
    curves = [c for c in curves if c.n > 0]
    if not curves:
        return None
    grid = curves[0].grid
    if any(c.grid != grid for c in curves):
        raise ValueError("θ curves to pool must share one grid")
    total = sum(c.n for c in curves)

    def mean(field: str) -> tuple[float, ...]:
        return tuple(sum(c.n * getattr(c, field)[i] for c in curves) / total for i in range(len(grid)))

    return ThetaCurve(grid, mean("accuracy"), mean("loss"), total)


def select_theta(curve: ThetaCurve, prior: ThetaCurve | None = None, prior_weight: float = 0.0) -> ThetaChoice:
    """θ with the best validation accuracy, the client's own curve shrunk toward a prior curve.

    acc(θ) = (n · own_acc(θ) + w · prior_acc(θ)) / (n + w), and the same for the loss: with a
    handful of validation images the own curve is mostly noise and ties across most of the grid,
    and the federation's pooled curve (the prior) decides; with many, the client's own data does.
    Ties go to the lower shrunk cross-entropy, then to the θ closest to 0.5. Cross-entropy alone
    as the criterion was measured and dropped: it favours the calibrated mid-θ mixes while
    accuracy peaks at higher θ (README, per-client θ).
    """
    if prior is not None and prior.grid != curve.grid:
        raise ValueError("the prior curve must use the client's θ grid")
    if prior_weight < 0:
        raise ValueError(f"prior_weight must be >= 0, got {prior_weight}")
    w = prior_weight if prior is not None and prior.n > 0 else 0.0
    if curve.n + w == 0:
        raise ValueError("select_theta needs validation examples or a prior curve")

    def shrunk(own: tuple[float, ...], pooled: tuple[float, ...] | None) -> tuple[float, ...]:
        return tuple((curve.n * o + (w * pooled[i] if w else 0.0)) / (curve.n + w) for i, o in enumerate(own))

    accuracy = shrunk(curve.accuracy, prior.accuracy if w else None)
    loss = shrunk(curve.loss, prior.loss if w else None)
    theta = min(curve.grid, key=lambda t: (-round(accuracy[curve.grid.index(t)], 12),
                                           round(loss[curve.grid.index(t)], 12), abs(t - 0.5), t))
    i = curve.grid.index(theta)
    return ThetaChoice(theta=theta, accuracy=curve.accuracy[i], grid=curve.grid, accuracies=curve.accuracy,
                       scores=accuracy)
