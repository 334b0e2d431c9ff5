"""Prompted text encoding in the CoOp / PromptFolio layout.

    tokens:  [SOS] X_1 .. X_n <classname> . [EOS] [pad ...]
    embeds:  [SOS] ctx_1 .. ctx_n <classname embeds> . [EOS]

One learned context `ctx [n_ctx, width]` is shared by all classes. The class features are the
text transformer's output at the EOS position, projected and L2-normalised: `[C, D]`.
Only `ctx` carries gradients; the encoder stays frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptfolio.encoder import Encoder

PLACEHOLDER = "X"
CTX_INIT_STD = 0.02
ZERO_SHOT_PHRASE = "a photo of a"  # the hand prompt "a photo of a {class}." and the default context init


class ClassPrompts:
    """The frozen parts of the prompts for one class list, computed once.

    The text transformer is causal, so nothing after the last EOS can reach an EOS output: the
    sequence is cut to `max(eos) + 1` tokens, which makes encoding several times cheaper than
    running the full context length, with identical results.
    """

    def __init__(self, encoder: Encoder, class_names: list[str], n_ctx: int):
        if not class_names:
            raise ValueError("class_names is empty")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        model = encoder.model
        self.encoder = encoder
        self.class_names = list(class_names)
        self.n_ctx = n_ctx
        prefix = " ".join([PLACEHOLDER] * n_ctx)
        tokens = encoder.tokenizer([f"{prefix} {name}." for name in class_names]).to(encoder.device)  # [C, L]
        eos = tokens.argmax(dim=-1)  # EOS has the highest token id
        if int(eos.max()) >= encoder.context_length - 1:  # the tokenizer truncated a prompt
            too_long = [n for n, e in zip(class_names, eos) if int(e) >= encoder.context_length - 1]
            raise ValueError(f"class names too long for context length {encoder.context_length} "
                             f"with {n_ctx} context tokens: {too_long[:3]}")
        length = int(eos.max()) + 1
        self.tokens = tokens[:, :length]  # [C, L']
        self.eos = eos  # [C]
        with torch.no_grad():
            embeds = model.token_embedding(self.tokens)  # [C, L', width]
        self.prefix = embeds[:, :1]  # [C, 1, width]  SOS
        self.suffix = embeds[:, 1 + n_ctx :]  # [C, L' - 1 - n_ctx, width]  class name, '.', EOS, pad

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """ctx `[n_ctx, width]` -> normalised class features `[C, D]` (differentiable in ctx)."""
        return self.encode_many(ctx.unsqueeze(0))[0]

    def encode_many(self, ctxs: torch.Tensor) -> torch.Tensor:
        """K contexts `[K, n_ctx, width]` -> `[K, C, D]` in one transformer call (e.g. the global and
        local prompts of several methods at once: far fewer, larger kernels than K calls)."""
        model = self.encoder.model
        if ctxs.ndim != 3 or ctxs.shape[1:] != (self.n_ctx, self.encoder.text_width):
            raise ValueError(f"ctx shape {tuple(ctxs.shape[-2:])} != ({self.n_ctx}, {self.encoder.text_width})")
        k = ctxs.shape[0]
        n_classes, length = self.tokens.shape
        cast = model.transformer.get_cast_dtype()
        ctx = ctxs.to(cast).unsqueeze(1).expand(k, n_classes, -1, -1)  # [K, C, n_ctx, width]
        x = torch.cat([self.prefix.expand(k, -1, -1, -1), ctx, self.suffix.expand(k, -1, -1, -1)], dim=2)
        x = x.reshape(k * n_classes, length, -1) + model.positional_embedding[:length].to(cast)  # [K*C, L', width]
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = x[torch.arange(k * n_classes, device=x.device), self.eos.repeat(k)]  # [K*C, width]
        x = x @ model.text_projection  # [K*C, D]
        return F.normalize(x.float(), dim=-1).reshape(k, n_classes, -1)


def encode_classes(encoder: Encoder, ctx: torch.Tensor, class_names: list[str]) -> torch.Tensor:
    """Class text features `[C, D]` for one context; no gradients (serving path)."""
    with torch.no_grad():
        return ClassPrompts(encoder, class_names, ctx.shape[0]).encode(ctx.to(encoder.device))


def phrase_embedding(encoder: Encoder, phrase: str) -> torch.Tensor:
    """Token embeddings `[n_tokens, width]` of a phrase, without SOS/EOS."""
    tokens = encoder.tokenizer([phrase])[0].to(encoder.device)
    n = int(tokens.argmax()) - 1
    if n < 1:
        raise ValueError(f"phrase {phrase!r} has no tokens")
    with torch.no_grad():
        return encoder.model.token_embedding(tokens[1 : 1 + n]).float().clone()


def init_context(encoder: Encoder, n_ctx: int | None = None, phrase: str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh context `[n_ctx, width]`: from a phrase such as "a photo of a" (its token count sets
    n_ctx), or N(0, 0.02) as in CoOp."""
    if phrase:
        ctx = phrase_embedding(encoder, phrase)
        if n_ctx is not None and ctx.shape[0] != n_ctx:
            raise ValueError(f"phrase {phrase!r} has {ctx.shape[0]} tokens but n_ctx={n_ctx}")
        return ctx.cpu()
    if n_ctx is None or n_ctx < 1:
        raise ValueError("n_ctx must be a positive integer when no phrase is given")
    return torch.randn(n_ctx, encoder.text_width, generator=generator) * CTX_INIT_STD
