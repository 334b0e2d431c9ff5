"""The public Python API: `from promptfolio import Classifier, personalize`.

A facade over the layers below (core, prompts store, training), imported lazily by the package
root so the core stays importable on its own. `Classifier.predict` answers exactly what the
service answers for the same prompts, θ and images: the same image loading, encoder, class
features and `portfolio.class_probabilities`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from promptfolio import portfolio
from promptfolio.encoder import Encoder, load_encoder
from promptfolio.images import ImageSource, load_image
from promptfolio.prompts import ZERO_SHOT_PHRASE, encode_classes, init_context
from prompts_store.artifact import ArtifactError, PromptMeta, read_artifact
from training.personalize import PersonalizeResult, personalize

__all__ = ["Classifier", "PersonalizeResult", "personalize"]


@dataclass
class Classifier:
    """A tenant's classifier on this machine: encoder, class names, global (and local) class features, θ."""

    encoder: Encoder
    classes: list[str]
    t_global: torch.Tensor  # [C, D]
    t_local: torch.Tensor | None  # [C, D]
    theta: float  # 0 without a local prompt
    global_meta: PromptMeta | None = None
    local_meta: PromptMeta | None = None

    @classmethod
    def from_artifacts(cls, global_path: str | Path | None = None, local_path: str | Path | None = None,
                       theta: float | None = None, arch: str = "embedded", pretrained: str | None = "embedded",
                       classes: Sequence[str] | None = None, encoder: Encoder | None = None) -> "Classifier":
        """global_path: a global prompt artifact, or None for the hand prompt "a photo of a" (as the
        service before a global prompt is published). local_path: the tenant's local prompt, or None.
        theta: None takes the local artifact's θ, else 0.4 (the service's rule). classes: default
        the local artifact's class list, else the global one's."""
        encoder = encoder or load_encoder(arch, pretrained)
        g_ctx, g_meta = _read(global_path, "global", encoder) if global_path is not None else \
            (init_context(encoder, phrase=ZERO_SHOT_PHRASE), None)
        l_ctx, l_meta = _read(local_path, "local", encoder) if local_path is not None else (None, None)
        names = list(classes or (l_meta.classes if l_meta else []) or (g_meta.classes if g_meta else []))
        if not names:
            raise ValueError("no class names: pass classes=[...] (the artifacts carry none)")
        t_global = encode_classes(encoder, g_ctx, names).cpu()
        t_local = encode_classes(encoder, l_ctx, names).cpu() if l_ctx is not None else None
        if t_local is None:
            effective = 0.0
        else:
            effective = next(t for t in (theta, l_meta.theta, portfolio.DEFAULT_THETA) if t is not None)
        return cls(encoder, names, t_global, t_local, portfolio.check_theta(effective), g_meta, l_meta)

    @torch.no_grad()
    def probabilities(self, images: Sequence[ImageSource]) -> torch.Tensor:
        """Images (paths, bytes or PIL images) -> softmax over the classes `[N, C]`."""
        if not images:
            return torch.zeros(0, len(self.classes))
        pixels = torch.stack([self.encoder.preprocess(load_image(im, draft_size=self.encoder.image_size))
                              for im in images])
        feats = self.encoder.model.encode_image(pixels.to(self.encoder.device)).float().cpu()
        scale = self.encoder.model.logit_scale.detach().cpu()
        return portfolio.class_probabilities(feats, self.t_global, self.t_local, self.theta, scale)

    def predict(self, images: ImageSource | Sequence[ImageSource], top_k: int = 5) -> list[list[dict]]:
        """Per image, the top-k `{"label", "score"}` (softmax scores), as the service's classify."""
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "convert"):
            images = [images]
        probs = self.probabilities(list(images))
        scores, idx = probs.topk(min(top_k, len(self.classes)), dim=-1)
        return [[{"label": self.classes[i], "score": float(s)} for s, i in zip(srow, irow)]
                for srow, irow in zip(scores.tolist(), idx.tolist())]


def _read(path: str | Path, kind: str, encoder: Encoder) -> tuple[torch.Tensor, PromptMeta]:
    ctx, meta = read_artifact(Path(path).read_bytes(), encoder.fingerprint, encoder.text_width)
    if meta.kind != kind:
        raise ArtifactError(f"{path} is a {meta.kind} prompt, not a {kind} one")
    return ctx, meta
