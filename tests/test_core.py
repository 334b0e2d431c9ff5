"""The shared PromptFolio math: prompted encoding, the portfolio mix, θ selection, encoder loading."""

import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from promptfolio import portfolio
from promptfolio.encoder import EncoderError, check_text_tower, load_encoder
from promptfolio.prompts import ClassPrompts, encode_classes, init_context

CLASSES = ["red circle", "blue star", "yellow triangle", "green square", "purple cross"]


def test_hand_prompt_context_equals_encode_text(random_encoder):
    enc = random_encoder
    # the context is the hand prompt's own token embeddings, taken with plain torch ops
    tokens = enc.tokenizer(["a photo of a"])[0]
    n = int(tokens.argmax()) - 1
    ctx = enc.model.token_embedding(tokens[1 : 1 + n]).detach()
    assert ctx.shape == (4, enc.text_width)
    prompted = encode_classes(enc, ctx, CLASSES)
    with torch.no_grad():
        reference = F.normalize(enc.model.encode_text(enc.tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    assert prompted.shape == (len(CLASSES), enc.embed_dim)
    assert torch.allclose(prompted, reference, atol=1e-5), (prompted - reference).abs().max()
    # init_context from the phrase gives the same context
    assert torch.equal(init_context(enc, phrase="a photo of a"), ctx)


def test_random_context_init_and_shape_checks(random_encoder):
    g = torch.Generator().manual_seed(0)
    ctx = init_context(random_encoder, n_ctx=8, generator=g)
    assert ctx.shape == (8, random_encoder.text_width)
    assert 0.015 < ctx.std().item() < 0.025
    with pytest.raises(ValueError, match="ctx shape"):
        ClassPrompts(random_encoder, CLASSES, 4).encode(ctx)
    with pytest.raises(ValueError, match="4 tokens but n_ctx=3"):
        init_context(random_encoder, n_ctx=3, phrase="a photo of a")
    with pytest.raises(ValueError, match="too long"):
        ClassPrompts(random_encoder, ["very " * 40 + "long name"], 4)


def test_mix_formula_and_theta_bounds():
    torch.manual_seed(1)
    g, loc = torch.randn(6, 16) * 3, torch.randn(6, 16) * 0.5
    gn, ln = g / g.norm(dim=-1, keepdim=True), loc / loc.norm(dim=-1, keepdim=True)
    for theta in (0.0, 0.4, 1.0):
        expected = (1 - theta) * gn + theta * ln
        assert torch.allclose(portfolio.mix(g, loc, theta), expected, atol=1e-6)
    assert torch.allclose(portfolio.mix(g, loc, 0.0), gn)
    assert torch.allclose(portfolio.mix(g, loc, 1.0), ln)
    # not renormalised: the norm of an interior mix is below 1
    assert (portfolio.mix(g, loc, 0.4).norm(dim=-1) < 1 - 1e-4).all()
    for bad in (-0.01, 1.01, float("nan"), float("inf"), "abc", None):
        with pytest.raises(ValueError, match="θ must be"):
            portfolio.mix(g, loc, bad)


def test_logits_use_exp_scale_and_normalised_images():
    torch.manual_seed(2)
    img, text = torch.randn(3, 8) * 7, F.normalize(torch.randn(4, 8), dim=-1)
    out = portfolio.logits(img, text, torch.tensor(2.0))
    assert torch.allclose(out, torch.exp(torch.tensor(2.0)) * F.normalize(img, dim=-1) @ text.T, atol=1e-5)


def test_select_theta_breaks_accuracy_ties_by_validation_loss():
    # global features fit labels 0/1 only, local features fit all: the loss falls toward θ=1
    t_g = torch.eye(3)[[0, 1, 0]]
    t_l = torch.eye(3)
    img = torch.eye(3)
    curve = portfolio.theta_curve(img, torch.tensor([0, 1, 2]), t_g, t_l, logit_scale=2.0)
    assert curve.n == 3 and curve.grid == portfolio.THETA_GRID
    assert curve.accuracy[0] < 1.0 and curve.accuracy[-1] == 1.0
    assert list(curve.loss) == sorted(curve.loss, reverse=True)
    choice = portfolio.select_theta(curve)
    assert choice.theta == 1.0 and choice.accuracy == 1.0
    # two validation images, right at every θ (accuracy ties across the whole grid, as with
    # the 2-27 images a client holds): the loss still ranks θ, so no fall back to 0.5
    tiny = portfolio.theta_curve(img[:2], torch.tensor([0, 1]), t_g, t_l, logit_scale=2.0)
    assert set(tiny.accuracy) == {1.0}
    # (globally classes 0 and 2 share one feature, so the local branch is the more confident)
    assert portfolio.select_theta(tiny).theta == 1.0
    # identical branches: every θ ties exactly, and the tie goes to 0.5
    same = portfolio.theta_curve(img, torch.tensor([0, 1, 2]), t_l, t_l, logit_scale=2.0)
    assert portfolio.select_theta(same).theta == 0.5
    with pytest.raises(ValueError, match="at least one"):
        portfolio.theta_curve(img[:0], torch.tensor([], dtype=torch.int64), t_l, t_l, logit_scale=2.0)


def test_pooled_prior_decides_for_tiny_validation_sets_and_own_data_for_large():
    grid = (0.0, 0.5, 1.0)
    prior = portfolio.pool_curves([portfolio.ThetaCurve(grid, (0.5, 0.7, 0.9), (1.2, 0.8, 0.4), 30),
                                   portfolio.ThetaCurve(grid, (0.5, 0.6, 0.7), (1.0, 0.9, 0.8), 10)])
    assert prior.n == 40
    assert prior.loss == pytest.approx((1.15, 0.825, 0.5))  # weighted by validation size
    assert prior.accuracy == pytest.approx((0.5, 0.675, 0.85))
    assert portfolio.pool_curves([portfolio.ThetaCurve(grid, (0,) * 3, (0,) * 3, 0)]) is None
    own = portfolio.ThetaCurve(grid, (1.0, 0.9, 0.5), (0.3, 0.5, 0.7), 2)  # two images favour θ=0
    assert portfolio.select_theta(own).theta == 0.0
    assert portfolio.select_theta(own, prior, prior_weight=10).theta == 1.0  # the federation's curve wins
    many = portfolio.ThetaCurve(grid, own.accuracy, own.loss, 200)  # the same curve from 200 images
    assert portfolio.select_theta(many, prior, prior_weight=10).theta == 0.0
    choice = portfolio.select_theta(own, prior, prior_weight=10)
    assert choice.scores[2] == pytest.approx((2 * 0.5 + 10 * 0.85) / 12)  # shrunk accuracy
    assert choice.accuracy == 0.5  # own accuracy at the chosen θ
    with pytest.raises(ValueError, match="grid"):
        portfolio.select_theta(portfolio.ThetaCurve((0.0, 1.0), (1, 1), (1, 1), 2), prior, prior_weight=10)
    with pytest.raises(ValueError, match="prior_weight"):
        portfolio.select_theta(own, prior, prior_weight=-1)


def test_only_context_gets_gradients(random_encoder):
    enc = random_encoder
    before = {k: v.clone() for k, v in enc.model.state_dict().items()}
    ctx_g = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    ctx_l = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    prompts = ClassPrompts(enc, CLASSES, 4)
    images = torch.randn(5, 3, enc.image_size, enc.image_size)
    with torch.no_grad():
        feats = enc.model.encode_image(images)
    opt = torch.optim.SGD([ctx_g, ctx_l], lr=0.1, momentum=0.9)
    mixed = portfolio.mix(prompts.encode(ctx_g), prompts.encode(ctx_l), 0.4)
    loss = F.cross_entropy(portfolio.logits(feats, mixed, enc.model.logit_scale), torch.arange(5))
    loss.backward()
    assert ctx_g.grad is not None and ctx_g.grad.abs().sum() > 0
    assert ctx_l.grad is not None and ctx_l.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in enc.model.parameters())
    opt.step()
    after = enc.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_roundtrip_matches_in_memory_model(random_encoder, tmp_path, suffix):
    enc = random_encoder
    path = tmp_path / f"ckpt{suffix}"
    state = {k: v.contiguous() for k, v in enc.model.state_dict().items()}
    if suffix == ".pt":
        torch.save({"state_dict": state}, path)
    else:
        save_file(state, str(path))
    loaded = load_encoder("promptfolio-tiny", str(path))
    assert loaded.fingerprint == enc.fingerprint
    assert loaded.source == str(path)
    x = torch.randn(2, 3, enc.image_size, enc.image_size)
    tokens = enc.tokenizer(["a photo of a red circle."])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(x), enc.model.encode_image(x))
        assert torch.equal(loaded.model.encode_text(tokens), enc.model.encode_text(tokens))
    ctx = init_context(enc, n_ctx=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encode_classes(loaded, ctx, CLASSES), encode_classes(enc, ctx, CLASSES))


def test_fingerprint_changes_with_weights(random_encoder, tmp_path):
    state = {k: v.clone() for k, v in random_encoder.model.state_dict().items()}
    state["ln_final.weight"][0] += 1e-3
    path = tmp_path / "other.pt"
    torch.save(state, path)
    assert load_encoder("promptfolio-tiny", str(path)).fingerprint != random_encoder.fingerprint


def test_mismatched_checkpoints_are_refused(random_encoder, tmp_path):
    state = dict(random_encoder.model.state_dict())
    wrong_shape = dict(state, text_projection=torch.zeros(128, 64))
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with pytest.raises(EncoderError, match=r"does not match architecture 'promptfolio-tiny'.*text_projection"):
        load_encoder("promptfolio-tiny", str(tmp_path / "shape.pt"))
    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(EncoderError, match=r"1 missing keys \(ln_final.bias\)"):
        load_encoder("promptfolio-tiny", str(tmp_path / "missing.pt"))
    # a checkpoint of another architecture
    with pytest.raises(EncoderError, match="does not match architecture 'RN50'"):
        load_encoder("RN50", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EncoderError, match="cannot read checkpoint"):
        load_encoder("promptfolio-tiny", str(tmp_path / "junk.safetensors"))


def test_clear_errors_for_bad_arguments(tmp_path):
    with pytest.raises(EncoderError, match="unknown architecture 'ViT-Nope'"):
        load_encoder("ViT-Nope", None)
    with pytest.raises(EncoderError, match="checkpoint file not found"):
        load_encoder("promptfolio-tiny", str(tmp_path / "absent.pt"))
    with pytest.raises(EncoderError, match="unknown pretrained tag 'no-such-tag'"):
        load_encoder("promptfolio-tiny", "no-such-tag")
    custom = open_clip.create_model("promptfolio-tiny", pretrained=None, force_custom_text=True)
    with pytest.raises(EncoderError, match="standard text transformer"):
        check_text_tower(custom, "custom")


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "promptfolio.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("info", "embedded"):
        assert word in out


def test_cli_reports_bad_architecture_without_traceback():
    run = subprocess.run([sys.executable, "-m", "promptfolio.cli", "info", "--arch", "ViT-Nope"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown architecture 'ViT-Nope'" in run.stderr and "Traceback" not in run.stderr


def test_encode_many_equals_separate_encodes(random_encoder):
    prompts = ClassPrompts(random_encoder, CLASSES, 4)
    ctxs = torch.stack([init_context(random_encoder, n_ctx=4, generator=torch.Generator().manual_seed(s))
                        for s in range(3)])
    with torch.no_grad():
        many = prompts.encode_many(ctxs)
        assert many.shape == (3, len(CLASSES), random_encoder.embed_dim)
        for k in range(3):
            assert torch.allclose(many[k], prompts.encode(ctxs[k]), atol=1e-6)


def test_pretrained_none_means_random_weights_everywhere():
    from promptfolio.encoder import parse_pretrained
    from service.config import ServiceConfig
    from training.config import TrainConfig

    assert [parse_pretrained(v) for v in ("none", "Random", "", None, "embedded")] == [None] * 4 + ["embedded"]
    assert ServiceConfig.from_env({"PROMPTFOLIO_PRETRAINED": "none"}).pretrained is None
    assert ServiceConfig.from_env({}).pretrained == "embedded"
    assert TrainConfig(pretrained="random").pretrained is None
