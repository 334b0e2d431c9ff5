"""Zero-shot and linear-probe evaluation of an encoder on the embedded task, per style."""

from __future__ import annotations

import numpy as np
import torch

from promptfolio.embedded import world
from promptfolio.prompts import ZERO_SHOT_PHRASE

# Fixed evaluation set behind the recorded zero-shot accuracy of the shipped weights.
EVAL_SEED = 12345
EVAL_SIZE = 900
HAND_TEMPLATE = ZERO_SHOT_PHRASE + " {}."


def to_model_input(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` at the model's image size -> normalised float `[N, 3, H, W]`.

    Equal to open_clip's preprocess for images already at the model's size, without PIL round trips.
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def image_features(model, images: np.ndarray, mean, std, batch_size: int = 256) -> torch.Tensor:
    """Normalised image features `[N, D]`."""
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(images[i : i + batch_size], mean, std)
        out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def hand_prompt_features(model, tokenizer, class_names: list[str], template: str = HAND_TEMPLATE) -> torch.Tensor:
    tokens = tokenizer([template.format(c) for c in class_names])
    return torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)


def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: np.ndarray, mean, std) -> float:
    feats = image_features(model, images, mean, std)
    text = hand_prompt_features(model, tokenizer, world.CLASS_NAMES)
    pred = (feats @ text.T).argmax(dim=1).numpy()
    return float((pred == labels).mean() * 100)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray,
                          steps: int = 300, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS)."""
    torch.manual_seed(seed)
    n_classes = len(world.CLASS_NAMES)
    linear = torch.nn.Linear(train_x.shape[1], n_classes)
    y = torch.from_numpy(train_y).long()
    opt = torch.optim.LBFGS(linear.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x * 10), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = linear(test_x * 10).argmax(dim=1).numpy()
    return float((pred == test_y).mean() * 100)


def eval_set(style: world.StyleSpec, n: int = EVAL_SIZE, seed: int = EVAL_SEED):
    labels = np.arange(n) % len(world.CLASS_NAMES)
    return world.task_dataset(n, style, seed, labels=labels)


def style_table(encoder, styles: list[world.StyleSpec], n_eval: int = EVAL_SIZE, n_probe_train: int = 1500) -> list[dict]:
    """Per style: hand-prompt zero-shot and linear-probe accuracy (probe trained on the same style)."""
    model, tok = encoder.model, encoder.tokenizer
    mean, std = encoder.image_mean, encoder.image_std
    text = hand_prompt_features(model, tok, world.CLASS_NAMES)
    rows = []
    for style in styles:
        images, labels = eval_set(style, n_eval)
        feats = image_features(model, images, mean, std)
        zs = float(((feats @ text.T).argmax(1).numpy() == labels).mean() * 100)
        tr_images, tr_labels = world.task_dataset(n_probe_train, style, seed=EVAL_SEED + 1)
        probe = linear_probe_accuracy(image_features(model, tr_images, mean, std), tr_labels, feats, labels)
        rows.append({"style": style.name, "strength": style.strength, "zero_shot": zs, "linear_probe": probe})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'style':<14}{'strength':>9}{'zero-shot %':>13}{'linear probe %':>16}"]
    for r in rows:
        lines.append(f"{r['style']:<14}{r['strength']:>9.2f}{r['zero_shot']:>13.1f}{r['linear_probe']:>16.1f}")
    return "\n".join(lines)
