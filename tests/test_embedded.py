"""The embedded default: synthetic world, shipped tiny CLIP, calibrated styles, ImageFolder export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from promptfolio import embedded
from promptfolio.embedded import evaluate, world
from promptfolio.embedded.export import export_imagefolder
from promptfolio.encoder import EncoderError, load_encoder


def test_world_is_deterministic_and_labels_match_attributes():
    a, ya = world.task_dataset(40, world.calibrated("noise"), seed=3)
    b, yb = world.task_dataset(40, world.calibrated("noise"), seed=3)
    c, _ = world.task_dataset(40, world.calibrated("noise"), seed=4)
    assert a.shape == (40, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and not np.array_equal(a, c)
    assert len(world.CLASS_NAMES) >= 20 and len(set(world.CLASS_NAMES)) == len(world.CLASS_NAMES)
    images, texts, match = world.pretraining_batch(64, seed=0)
    assert match.diagonal().all() and len(texts) == 64
    # a caption naming only a colour matches every image of that colour
    attrs = world.sample_attributes(np.random.default_rng(0), 64)
    templates = np.full(64, world.TEMPLATES.index("something {colour}."))
    m = world.caption_match(attrs, templates)
    assert np.array_equal(m[:, 0], attrs[:, 1] == attrs[0, 1])


def test_to_model_input_equals_open_clip_preprocess(embedded_encoder):
    images, _ = world.task_dataset(4, world.calibrated("clean"), seed=0)
    fast = evaluate.to_model_input(images, embedded_encoder.image_mean, embedded_encoder.image_std)
    slow = torch.stack([embedded_encoder.preprocess(Image.fromarray(im)) for im in images])
    assert torch.allclose(fast, slow, atol=1e-5)


def test_shipped_weights_reproduce_recorded_zero_shot(embedded_encoder):
    record = json.loads(embedded.RECORD_PATH.read_text())
    assert embedded.WEIGHTS_PATH.stat().st_size <= 20_000_000
    images, labels = evaluate.eval_set(world.calibrated("clean"))
    acc = evaluate.zero_shot_accuracy(embedded_encoder.model, embedded_encoder.tokenizer, images, labels,
                                      embedded_encoder.image_mean, embedded_encoder.image_std)
    assert abs(acc - record["zero_shot_clean"]) <= 0.5
    assert acc >= 90.0
    assert embedded_encoder.model.token_embedding.num_embeddings == 49408  # standard vocabulary kept


def test_calibrated_styles_are_learnable_but_shifted(embedded_encoder):
    rows = evaluate.style_table(embedded_encoder, [world.calibrated(n) for n in world.STYLE_NAMES[1:]],
                                n_eval=300, n_probe_train=600)
    for row in rows:
        assert 35.0 <= row["zero_shot"] <= 70.0, row
        assert row["linear_probe"] > row["zero_shot"], row


def test_corrupted_or_substituted_weights_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "corrupt.safetensors"
    data = bytearray(embedded.WEIGHTS_PATH.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(embedded, "WEIGHTS_PATH", bad)
    with pytest.raises(EncoderError, match="corrupted or substituted"):
        load_encoder("embedded")
    other = tmp_path / "substituted.safetensors"
    torch.manual_seed(1)
    random = load_encoder("promptfolio-tiny", None)
    save_file({k: v.half().contiguous() for k, v in random.model.state_dict().items()}, str(other))
    monkeypatch.setattr(embedded, "WEIGHTS_PATH", other)
    with pytest.raises(EncoderError, match="corrupted or substituted"):
        load_encoder("embedded")


def test_imagefolder_export_is_cached(tmp_path):
    root = export_imagefolder(world.calibrated("blur"), n_per_class=2, seed=1, cache_dir=tmp_path)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == sorted(world.CLASS_NAMES)
    pngs = list(root.glob("*/*.png"))
    assert len(pngs) == 2 * len(world.CLASS_NAMES)
    assert Image.open(pngs[0]).size == (64, 64)
    stamp = (root / "dataset.json").stat().st_mtime_ns
    assert export_imagefolder(world.calibrated("blur"), 2, 1, cache_dir=tmp_path) == root
    assert (root / "dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="n_per_class"):
        export_imagefolder(world.calibrated("blur"), 0, 1, cache_dir=tmp_path)


def test_pretraining_command_runs_and_writes_loadable_weights(tmp_path):
    from promptfolio.embedded.pretrain import PretrainConfig, pretrain

    out = tmp_path / "tiny.safetensors"
    record = pretrain(PretrainConfig(steps=6, batch_size=32, eval_every=3, warmup_steps=2), out,
                      tmp_path / "tiny.record.json")
    assert out.is_file() and len(record["history"]) == 2
    enc = load_encoder("promptfolio-tiny", str(out))
    assert enc.fingerprint.startswith("promptfolio-tiny:sha256:")
