"""Prompt artifacts written by training, through the prompts_store format."""

from __future__ import annotations

import torch

from promptfolio.encoder import Encoder
from prompts_store.artifact import PromptMeta, artifact_bytes, content_sha256


def prompt_artifact(ctx: torch.Tensor, kind: str, encoder: Encoder, classes: list[str], theta: float | None = None,
                    tenant: str | None = None, producer: str = "train",
                    trained_with: torch.Tensor | None = None) -> bytes:
    """`trained_with`: for a local prompt, the global prompt it was trained with (recorded by hash)."""
    meta = PromptMeta(kind=kind, tenant=tenant if kind == "local" else None, encoder=encoder.fingerprint,
                      n_ctx=ctx.shape[0], width=ctx.shape[1], classes=classes, theta=theta, producer=producer,
                      global_sha256=None if trained_with is None else content_sha256(trained_with))
    return artifact_bytes(ctx, meta)


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    """An order-independent fingerprint of a set of prompts, small enough for a MetricRecord:
    clients report it so the server can check everyone received the same aggregate."""
    total = 0.0
    for key in sorted(tensors):
        t = tensors[key].detach().double().flatten()
        weights = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64)
        total += float((t * weights).sum()) * (1 + len(key))
    return total
