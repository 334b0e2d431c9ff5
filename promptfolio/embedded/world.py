"""A procedural vision-language world: 64x64 images of one object, captions, a task, styles.

Everything is a pure function of a seed, so a dataset is reproducible from its parameters.
Images are uint8 arrays `[H, W, 3]`; attributes are small integer indices into the tables below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 64

SHAPES = ["circle", "square", "triangle", "star", "cross", "hexagon", "diamond", "pentagon"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"]
COLOUR_RGB = np.array(
    [
        [215, 35, 35], [40, 170, 60], [40, 75, 220], [235, 215, 40],
        [140, 50, 190], [240, 140, 20], [245, 140, 190], [50, 210, 220],
    ],
    dtype=np.float32,
)
SIZES = ["small", "medium", "large"]
SIZE_RADIUS = [9.0, 14.0, 20.0]
POSITIONS = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
TEXTURES = ["plain", "striped", "dotted"]
BACKGROUNDS = ["dark", "grey", "light"]
BACKGROUND_LEVEL = [45.0, 128.0, 210.0]

# The classification task: 6 colours x 5 shapes = 30 classes named in plain English.
TASK_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
TASK_SHAPES = ["circle", "square", "triangle", "star", "cross"]
CLASS_NAMES = [f"{c} {s}" for c in TASK_COLOURS for s in TASK_SHAPES]

# Caption words: each attribute value has synonyms; the first is the canonical name.
SYNONYMS: dict[str, list[list[str]]] = {
    "shape": [["circle", "disc"], ["square"], ["triangle"], ["star"], ["cross", "plus sign"],
              ["hexagon"], ["diamond", "rhombus"], ["pentagon"]],
    "colour": [["red"], ["green"], ["blue"], ["yellow"], ["purple", "violet"], ["orange"], ["pink"], ["cyan"]],
    "size": [["small", "tiny", "little"], ["medium", "medium-sized"], ["large", "big"]],
    "position": [[p] for p in POSITIONS[:4]] + [["center", "middle"]] + [[p] for p in POSITIONS[5:]],
    "texture": [["plain", "solid"], ["striped", "stripy"], ["dotted", "spotted"]],
    "background": [["dark", "black"], ["grey", "gray"], ["light", "white"]],
}
ATTRIBUTES = ["shape", "colour", "size", "position", "texture", "background"]

TEMPLATES = [
    "a photo of a {colour} {shape}.",
    "a photo of a {colour} {shape}.",
    "a {colour} {shape}.",
    "a photo of a {shape}.",
    "a {colour} object.",
    "a {size} {colour} {shape}.",
    "a {colour} {shape} on a {background} background.",
    "a {texture} {colour} {shape}.",
    "a {shape} in the {position}.",
    "a {colour} {shape} in the {position} of the picture.",
    "there is a {size} {shape}.",
    "an image of a {colour} {shape}.",
    "a picture showing a {texture} {shape}.",
    "a {background} background with a {colour} {shape}.",
    "something {colour}.",
    "a {size} {texture} {colour} {shape} in the {position} on a {background} background.",
    "the {shape} is {colour}.",
    "a {colour} {shape} that is {texture}.",
    "a drawing of a {size} {shape}.",
    "a {colour} thing in the {position}.",
]
TEMPLATE_FIELDS = [[a for a in ATTRIBUTES if "{" + a + "}" in t] for t in TEMPLATES]


@dataclass(frozen=True)
class StyleSpec:
    """An image-statistics shift of one kind; `strength` in [0, 1] scales it."""

    name: str
    strength: float


STYLE_NAMES = ["clean", "noise", "colour_cast", "blur", "clutter", "low_contrast"]
# Strengths calibrated on the shipped tiny CLIP so hand-prompt zero-shot lands at roughly 40-65%
# (full strength destroys the features; prompt learning can only fix what the features keep).
CALIBRATED_STRENGTH = {
    "clean": 0.0,
    "noise": 0.40,
    "colour_cast": 0.68,
    "blur": 0.72,
    "clutter": 0.32,
    "low_contrast": 0.67,
}


def calibrated(name: str) -> StyleSpec:
    if name not in CALIBRATED_STRENGTH:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLE_NAMES)}")
    return StyleSpec(name, CALIBRATED_STRENGTH[name])


def sample_attributes(rng: np.random.Generator, n: int, task_only: bool = False) -> np.ndarray:
    """`[n, 6]` int attribute indices in ATTRIBUTES order."""
    if task_only:
        shape = rng.choice([SHAPES.index(s) for s in TASK_SHAPES], n)
        colour = rng.choice([COLOURS.index(c) for c in TASK_COLOURS], n)
    else:
        shape = rng.integers(0, len(SHAPES), n)
        colour = rng.integers(0, len(COLOURS), n)
    return np.stack(
        [
            shape, colour,
            rng.integers(0, len(SIZES), n), rng.integers(0, len(POSITIONS), n),
            rng.integers(0, len(TEXTURES), n), rng.integers(0, len(BACKGROUNDS), n),
        ],
        axis=1,
    )


def _polygon(cx: float, cy: float, r: float, sides: int, rot: float, star: bool = False) -> list[tuple[float, float]]:
    points = []
    count = sides * 2 if star else sides
    for k in range(count):
        radius = r * (0.45 if star and k % 2 else 1.0)
        a = rot + 2 * math.pi * k / count - math.pi / 2
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _shape_mask(shape: str, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, rot + math.pi / 4), fill=255)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.1, 4, rot), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy + r * 0.15, r * 1.15, 3, rot), fill=255)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.15, 5, rot, star=True), fill=255)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=255)
    elif shape == "pentagon":
        draw.polygon(_polygon(cx, cy, r, 5, rot), fill=255)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=255)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=255)
    else:
        raise ValueError(shape)
    return np.asarray(img, dtype=np.float32) / 255.0


_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def render(attrs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One clean image `[64, 64, 3]` uint8 from one attribute row."""
    shape, colour, size, position, texture, background = (int(v) for v in attrs)
    # background: a level plus a tint and a linear gradient in a random direction
    level = BACKGROUND_LEVEL[background] + rng.uniform(-12, 12)
    tint = rng.uniform(-18, 18, 3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = ((_XX - 32) * math.cos(angle) + (_YY - 32) * math.sin(angle)) / 32.0 * rng.uniform(5, 25)
    img = level + tint[None, None, :] + ramp[:, :, None]
    # object
    r = SIZE_RADIUS[size] * rng.uniform(0.9, 1.1)
    row, col = divmod(position, 3)
    margin = r + 2
    cx = float(np.clip(IMAGE_SIZE * (col + 0.5) / 3 + rng.uniform(-3, 3), margin, IMAGE_SIZE - margin))
    cy = float(np.clip(IMAGE_SIZE * (row + 0.5) / 3 + rng.uniform(-3, 3), margin, IMAGE_SIZE - margin))
    mask = _shape_mask(SHAPES[shape], cx, cy, r, rng.uniform(-0.15, 0.15))
    rgb = np.clip(COLOUR_RGB[colour] + rng.uniform(-15, 15, 3), 0, 255)
    shade = np.ones_like(mask)
    if TEXTURES[texture] == "striped":
        a = rng.uniform(0, math.pi)
        shade = np.where(((_XX * math.cos(a) + _YY * math.sin(a)) // 3) % 2 == 0, 1.0, 0.55)
    elif TEXTURES[texture] == "dotted":
        shade = np.where((_XX % 5 < 2) & (_YY % 5 < 2), 0.5, 1.0)
    obj = rgb[None, None, :] * shade[:, :, None]
    img = img * (1 - mask[:, :, None]) + obj * mask[:, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def apply_style(img: np.ndarray, style: StyleSpec, rng: np.random.Generator) -> np.ndarray:
    """Shift the statistics of one uint8 image; strength 0 returns it unchanged."""
    s = float(style.strength)
    if style.name == "clean" or s <= 0:
        return img
    x = img.astype(np.float32)
    if style.name == "noise":
        x = x + rng.normal(0, 90 * s, x.shape)
    elif style.name == "colour_cast":
        # a fixed warm cast: colours slide toward one tint, hues partially merge
        gray = x.mean(axis=2, keepdims=True)
        tint = np.array([1.25, 1.0, 0.6], dtype=np.float32)
        x = (1 - s) * x + s * (0.35 * x + 0.65 * gray) * tint
    elif style.name == "blur":
        pil = Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=5.0 * s))
        x = np.asarray(pil, dtype=np.float32)
    elif style.name == "clutter":
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        for _ in range(int(round(40 * s))):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(0, IMAGE_SIZE, 2)
            x1, y1 = x0 + rng.uniform(-20, 20), y0 + rng.uniform(-20, 20)
            draw.line([x0, y0, x1, y1], fill=c, width=int(rng.integers(1, 3)))
        x = np.asarray(pil, dtype=np.float32)
    elif style.name == "low_contrast":
        mean = x.mean()
        x = mean + (x - mean) * (1 - 0.9 * s) + rng.uniform(-20, 20) * s
    else:
        raise ValueError(f"unknown style {style.name!r}; choose one of {', '.join(STYLE_NAMES)}")
    return np.clip(x, 0, 255).astype(np.uint8)


def caption(attrs: np.ndarray, rng: np.random.Generator) -> tuple[str, int]:
    """A caption naming a subset of the attributes; returns (text, template index)."""
    t = int(rng.integers(0, len(TEMPLATES)))
    words = {}
    for name in TEMPLATE_FIELDS[t]:
        choices = SYNONYMS[name][int(attrs[ATTRIBUTES.index(name)])]
        words[name] = choices[int(rng.integers(0, len(choices)))]
    text = TEMPLATES[t].format(**words)
    if text.startswith("a ") and text[2] in "aeiou":
        text = "an " + text[2:]
    return text, t


def caption_match(attrs: np.ndarray, templates: np.ndarray) -> np.ndarray:
    """`[n_images, n_captions]` bool: image i fits every attribute caption j names."""
    n = len(attrs)
    match = np.ones((n, n), dtype=bool)
    for j in range(n):
        for name in TEMPLATE_FIELDS[templates[j]]:
            k = ATTRIBUTES.index(name)
            match[:, j] &= attrs[:, k] == attrs[j, k]
    return match


def class_index(attrs: np.ndarray) -> np.ndarray:
    colour = np.array([TASK_COLOURS.index(COLOURS[c]) for c in attrs[:, 1]])
    shape = np.array([TASK_SHAPES.index(SHAPES[s]) for s in attrs[:, 0]])
    return colour * len(TASK_SHAPES) + shape


def task_dataset(n: int, style: StyleSpec, seed: int,
                 labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` labelled task images `[n, 64, 64, 3]` uint8 and labels `[n]` (classes given or uniform)."""
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, n, task_only=True)
    if labels is not None:
        labels = np.asarray(labels)
        attrs[:, 1] = [COLOURS.index(TASK_COLOURS[c]) for c in labels // len(TASK_SHAPES)]
        attrs[:, 0] = [SHAPES.index(TASK_SHAPES[s]) for s in labels % len(TASK_SHAPES)]
    images = np.stack([apply_style(render(a, rng), style, rng) for a in attrs])
    return images, class_index(attrs)


def pretraining_batch(n: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Fresh clean image-caption pairs and the multi-positive match matrix."""
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, n)
    images = np.stack([render(a, rng) for a in attrs])
    pairs = [caption(a, rng) for a in attrs]
    texts = [p[0] for p in pairs]
    templates = np.array([p[1] for p in pairs])
    return images, texts, caption_match(attrs, templates)
