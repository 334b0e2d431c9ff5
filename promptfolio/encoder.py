"""Load a frozen open_clip CLIP: (architecture, pretrained tag | local checkpoint | embedded).

The returned `Encoder` carries a fingerprint (architecture + sha256 of the weights) that every
prompt artifact records, so a prompt is never used with an encoder it was not learned for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from promptfolio import embedded

if TYPE_CHECKING:  # open_clip costs seconds to import: only the functions that build a model load it
    import open_clip

EMBEDDED = "embedded"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class EncoderError(ValueError):
    """The encoder cannot be loaded as asked; the message says why."""


@dataclass(frozen=True)
class Encoder:
    model: open_clip.CLIP  # eval mode, requires_grad off everywhere
    tokenizer: Callable[..., torch.Tensor]
    preprocess: Callable  # PIL image -> float [3, H, W]
    arch: str
    source: str  # "embedded", an open_clip tag, a checkpoint path, or "random"
    fingerprint: str  # "<arch>:sha256:<hex>" of the weights

    @property
    def text_width(self) -> int:
        return int(self.model.token_embedding.embedding_dim)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def image_mean(self) -> tuple[float, ...]:
        import open_clip

        return tuple(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)

    @property
    def image_std(self) -> tuple[float, ...]:
        import open_clip

        return tuple(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device


class _QuietRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded" whenever it builds an architecture; we always
    build first and load weights ourselves, so the warning would be wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def register_embedded_config() -> None:
    import open_clip

    if embedded.MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(str(embedded.CONFIG_PATH))


def weights_fingerprint(arch: str, model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes and fp32 values: equal weights give equal fingerprints
    whatever file format or dtype they were stored in."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return f"{arch}:sha256:{h.hexdigest()}"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch pickle (loaded with weights_only=True)."""
    if not path.is_file():
        raise EncoderError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise EncoderError(f"cannot read checkpoint {path}: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderError(f"checkpoint {path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, arch: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs {arch} {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])})")
        raise EncoderError(f"{what} does not match architecture {arch!r}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def check_text_tower(model: torch.nn.Module, arch: str) -> None:
    """Prompted encoding needs open_clip's standard text transformer with EOS-token (argmax) pooling."""
    import open_clip
    needed = ["token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "attn_mask"]
    if not isinstance(model, open_clip.CLIP) or any(getattr(model, n, None) is None for n in needed):
        raise EncoderError(
            f"architecture {arch!r} does not use open_clip's standard text transformer "
            f"(a custom or Hugging Face text tower); prompt learning needs token_embedding, "
            f"positional_embedding, transformer, ln_final, text_projection and a causal mask")
    if getattr(model, "text_pool_type", "argmax") != "argmax" or isinstance(model.text_projection, torch.nn.Linear):
        raise EncoderError(f"architecture {arch!r} pools text with {model.text_pool_type!r}; "
                           f"only EOS-token (argmax) pooling with a projection matrix is supported")


def embedded_weights_path() -> Path:
    """The shipped weights, refused when their sha256 is not the recorded one."""
    path = embedded.WEIGHTS_PATH
    if not path.is_file():
        raise EncoderError(f"embedded weights missing at {path}; run `promptfolio embedded pretrain`")
    record = json.loads(embedded.RECORD_PATH.read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != record["sha256"]:
        raise EncoderError(f"embedded weights at {path} are corrupted or substituted: "
                           f"sha256 {digest[:16]}… but {record['sha256'][:16]}… was recorded")
    return path


def parse_pretrained(text: str | None) -> str | None:
    """The `pretrained` setting as users write it (CLI, env, run config): 'none'/'random' -> None."""
    return None if text is None or str(text).strip().lower() in ("none", "random", "") else str(text)


def _hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint)
    try:
        socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _download_tagged(arch: str, tag: str):
    """open_clip's weights for a tag, from the local cache or the hub, or one clear EncoderError.

    Without a network huggingface_hub retries each file for ~50 s and logs ~100 lines before it
    fails; when the hub cannot be reached, the cache alone is tried (its offline mode), at once."""
    import open_clip
    from huggingface_hub import constants as hub

    offline_before = hub.HF_HUB_OFFLINE
    offline = offline_before or not _hub_reachable(hub.ENDPOINT)
    hub.HF_HUB_OFFLINE = offline
    quiet = _DropMessages("Failed to download")  # open_clip logs the failure we are about to raise
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, device="cpu")
    except (RuntimeError, OSError) as e:  # open_clip wraps every download failure in RuntimeError
        why = (f"are not in the local cache and {hub.ENDPOINT} cannot be reached (offline)" if offline
               else f"could not be downloaded ({str(e).splitlines()[0][:200]})")
        raise EncoderError(f"open_clip weights {arch!r}/{tag!r} {why}; download them where a network exists "
                           f"and pass the checkpoint file: --pretrained PATH") from None
    finally:
        hub.HF_HUB_OFFLINE = offline_before
        logging.getLogger().removeFilter(quiet)
    return model, preprocess


def load_encoder(arch: str = EMBEDDED, pretrained: str | os.PathLike | None = EMBEDDED,
                 device: str | torch.device = "cpu") -> Encoder:
    """Load a frozen CLIP.

    arch: an open_clip architecture name, or "embedded" (the shipped tiny CLIP).
    pretrained: an open_clip tag (downloads where a network exists), a local checkpoint path
        (.pt/.pth/.bin/.safetensors state dict), "embedded", or None for random init (speed tests).
    """
    import open_clip

    register_embedded_config()
    if arch == EMBEDDED:
        arch = embedded.MODEL_NAME
    if arch not in open_clip.list_models():
        raise EncoderError(f"unknown architecture {arch!r}; see open_clip.list_models() "
                           f"or use {EMBEDDED!r}")
    if pretrained is not None and str(pretrained) == EMBEDDED and arch != embedded.MODEL_NAME:
        raise EncoderError(f"the embedded weights belong to {embedded.MODEL_NAME!r}, not {arch!r}")

    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device="cpu")
    check_text_tower(model, arch)
    source = "random"
    if pretrained is not None:
        text = str(pretrained)
        looks_like_path = text.endswith(CHECKPOINT_SUFFIXES) or os.sep in text or Path(text).exists()
        if text == EMBEDDED:
            path = embedded_weights_path()
            load_state_dict_checked(model, read_checkpoint(path), f"embedded weights {path}", arch)
            source = EMBEDDED
        elif looks_like_path:
            path = Path(text)
            load_state_dict_checked(model, read_checkpoint(path), f"checkpoint {path}", arch)
            source = str(path)
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            if text not in tags:
                raise EncoderError(f"unknown pretrained tag {text!r} for {arch!r}; known tags: "
                                   f"{', '.join(tags) or 'none'}; or pass a checkpoint file path")
            model, preprocess = _download_tagged(arch, text)
            source = text

    model.eval().requires_grad_(False).to(device)
    return Encoder(model=model, tokenizer=open_clip.get_tokenizer(arch), preprocess=preprocess,
                   arch=arch, source=source, fingerprint=weights_fingerprint(arch, model))
