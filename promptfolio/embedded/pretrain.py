"""Contrastive pretraining of the embedded tiny CLIP on fresh clean pairs of the synthetic world.

`promptfolio embedded pretrain` reproduces the shipped weights (about 10-15 minutes on 2 CPU cores).
A caption such as "a red object" fits many images in a batch, so every image that matches all
attributes a caption names counts as a positive (soft targets), not only its own pair.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptfolio.embedded import CONFIG_PATH, MODEL_NAME, RECORD_PATH, WEIGHTS_PATH, evaluate, world


@dataclass
class PretrainConfig:
    steps: int = 1000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    seed: int = 0
    eval_every: int = 100
    threads: int = 2


class _PairStream(torch.utils.data.IterableDataset):
    """Generates batches in a worker process, so rendering overlaps the training step."""

    def __init__(self, batch_size: int, seed: int, steps: int, context_length: int):
        self.batch_size, self.seed, self.steps, self.context_length = batch_size, seed, steps, context_length

    def __iter__(self):
        torch.set_num_threads(1)
        tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        for step in range(self.steps):
            images, texts, match = world.pretraining_batch(self.batch_size, seed=self.seed * 1_000_003 + step)
            yield torch.from_numpy(images), tokenizer(texts), torch.from_numpy(match)


def build_model() -> tuple[open_clip.CLIP, object]:
    open_clip.add_model_config(str(CONFIG_PATH))
    model = open_clip.create_model(MODEL_NAME, pretrained=None)
    return model, open_clip.get_tokenizer(MODEL_NAME)


def soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """img, txt `[B, D]` normalised; match `[B_img, B_txt]` bool positives."""
    logits = scale * img @ txt.T  # [B, B]
    target = match.float()
    loss_i = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t = -(target.T / target.sum(0, keepdim=True).T * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def state_dict_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(cfg: PretrainConfig, out_weights: Path = WEIGHTS_PATH, out_record: Path = RECORD_PATH) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model()
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    eval_images, eval_labels = evaluate.eval_set(world.StyleSpec("clean", 0.0), 600, seed=777)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    stream = _PairStream(cfg.batch_size, cfg.seed, cfg.steps, model.context_length)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
    start = time.time()
    history = []
    for step, (images, tokens, match) in enumerate(loader):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = evaluate.to_model_input(images.numpy(), mean, std)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        loss = soft_clip_loss(img, txt, model.logit_scale.exp(), match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        done = step + 1
        if done % 10 == 0 or done == cfg.steps:
            eta = (time.time() - start) / done * (cfg.steps - done)
            print(f"\rstep {done}/{cfg.steps}  loss {loss.item():.3f}  eta {eta / 60:.1f} min ", end="", flush=True)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            model.eval()
            acc = evaluate.zero_shot_accuracy(model, tokenizer, eval_images, eval_labels, mean, std)
            history.append({"step": done, "loss": round(loss.item(), 4), "zero_shot_clean": acc})
            print(f"\n  zero-shot (clean, 600 images) at step {done}: {acc:.1f}%", flush=True)

    model.eval()
    # fp16 on disk halves the size; the loader casts back to fp32 (same accuracy, checked below)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    out_weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_weights), metadata={"format": "pt", "model": MODEL_NAME})
    model.load_state_dict({k: v.float() for k, v in state.items()})
    full_images, full_labels = evaluate.eval_set(world.StyleSpec("clean", 0.0))
    record = {
        "model": MODEL_NAME,
        "sha256": state_dict_sha256(out_weights),
        "zero_shot_clean": evaluate.zero_shot_accuracy(model, tokenizer, full_images, full_labels, mean, std),
        "eval_set": {"seed": evaluate.EVAL_SEED, "size": evaluate.EVAL_SIZE, "template": evaluate.HAND_TEMPLATE},
        "config": asdict(cfg),
        "history": history,
        "minutes": round((time.time() - start) / 60, 1),
    }
    out_record.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out_weights} ({out_weights.stat().st_size / 1e6:.1f} MB); "
          f"zero-shot clean {record['zero_shot_clean']:.1f}% in {record['minutes']} min", file=sys.stderr)
    return record
