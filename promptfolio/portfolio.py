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
class ThetaChoice:
    theta: float
    accuracy: float  # at the chosen θ, in [0, 1]
    grid: tuple[float, ...]
    accuracies: tuple[float, ...]


def select_theta(image_features: torch.Tensor, labels: torch.Tensor, t_global: torch.Tensor, t_local: torch.Tensor,
                 grid: tuple[float, ...] = THETA_GRID) -> ThetaChoice:
    """Pick θ on a labelled validation set: best accuracy on the grid, ties broken toward 0.5.

    The logit scale does not change an argmax, so it is left out.
    """
    if len(labels) == 0:
        raise ValueError("select_theta needs at least one labelled validation example")
    grid = tuple(check_theta(t) for t in grid)
    img = F.normalize(image_features.float(), dim=-1)
    g, loc = F.normalize(t_global.float(), dim=-1), F.normalize(t_local.float(), dim=-1)
    labels = torch.as_tensor(labels, device=img.device)
    correct = [int(((img @ mix(g, loc, t).T).argmax(dim=1) == labels).sum()) for t in grid]
    best = max(correct)
    theta = min((t for t, c in zip(grid, correct) if c == best), key=lambda t: (abs(t - 0.5), t))
    n = len(labels)
    return ThetaChoice(theta=theta, accuracy=best / n, grid=grid, accuracies=tuple(c / n for c in correct))
