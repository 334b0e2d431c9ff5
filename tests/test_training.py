"""Federated training: real Flower rounds (simulation runtime, private network namespace)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO
from promptfolio.prompts import ClassPrompts
from prompts_store.artifact import read_artifact
from training.config import TrainConfig, parse_method
from training.data import DataError, dirichlet_partition, read_imagefolder
from training.export import checksum
from promptfolio import portfolio
from training.task import (ClientState, Features, clip_groups, decode_theta_priors, encode_theta_priors, ensure_local,
                           initial_context, local_train, method_loss, pooled_theta_curves)

N_CLIENTS = 3


def train_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "promptfolio.cli", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed") / "run"
    r = train_cli("--clients", str(N_CLIENTS), "--rounds", "2", "--methods", "promptfolio-0.4,local,promptfl",
                  "--images-per-class", "6", "--local-epochs", "2", "--audit", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_fedavg_is_the_num_examples_weighted_mean_and_everyone_gets_it(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        n = record["round"]
        replies = load_file(str(run_dir / "audit" / f"round-{n:03d}-replies.safetensors"))
        aggregate = load_file(str(run_dir / "audit" / f"round-{n:03d}-aggregate.safetensors"))
        # only global prompts ever reached the server
        assert {k.split("/", 1)[1] for k in replies if not k.endswith("num-examples")} == \
            {"global/promptfolio-0.4", "global/promptfl"}
        weights = {p: float(replies[f"{p}/num-examples"]) for p in range(N_CLIENTS)}
        assert sorted(weights.values()) == sorted(r["num-examples"] for r in record["train"])
        for key, agg in aggregate.items():
            returned = [replies[f"{p}/{key}"] for p in range(N_CLIENTS)]
            assert not torch.equal(returned[0], returned[1])  # clients really trained differently
            expected = sum(w * t.double() for w, t in zip(weights.values(), returned)) / sum(weights.values())
            assert torch.allclose(agg.double(), expected, atol=1e-6)
        # after aggregation every client evaluated with exactly the aggregate
        expected_checksum = checksum({k.removeprefix("global/"): v for k, v in aggregate.items()})
        assert len(record["eval"]) == N_CLIENTS
        for row in record["eval"]:
            assert row["global-checksum"] == pytest.approx(expected_checksum, rel=1e-9, abs=1e-9)
        assert record["aggregate-checksum"] == pytest.approx(expected_checksum, rel=1e-9, abs=1e-9)
        for row in record["train"]:
            assert row["bytes-sent"] > 2 * 4 * 128 * 4 and row["bytes-received"] > 2 * 4 * 128 * 4


def test_local_prompts_stay_private_differ_and_artifacts_validate(run_dir, embedded_encoder):
    locals_ = {}
    for p in range(N_CLIENTS):
        for key in ("promptfolio-0.4", "local"):
            data = (run_dir / "clients" / f"client-{p}" / f"local-{key}.safetensors").read_bytes()
            ctx, meta = read_artifact(data, embedded_encoder.fingerprint, embedded_encoder.text_width)
            assert meta.kind == "local" and meta.tenant == f"client-{p}" and len(meta.classes) == 30
            assert meta.theta == (0.4 if key != "local" else 1.0)
            locals_[(p, key)] = ctx
        # the local prompt is not the global one
        g, g_meta = read_artifact((run_dir / "global-promptfolio-0.4.safetensors").read_bytes(),
                                  embedded_encoder.fingerprint)
        assert not torch.allclose(locals_[(p, "promptfolio-0.4")], g)
        # each local prompt records the final global it was trained with, so the service can pin the pair
        _, l_meta = read_artifact((run_dir / "clients" / f"client-{p}" / "local-promptfolio-0.4.safetensors").read_bytes())
        assert l_meta.global_sha256 == g_meta.content_sha256
    assert not torch.equal(locals_[(0, "local")], locals_[(1, "local")])
    assert not torch.equal(locals_[(0, "promptfolio-0.4")], locals_[(2, "promptfolio-0.4")])
    replies = load_file(str(run_dir / "audit" / "round-002-replies.safetensors"))
    for ctx in locals_.values():  # no local prompt appears among what the server received
        assert not any(v.shape == ctx.shape and torch.allclose(v, ctx) for v in replies.values())
    for name in ("global-promptfolio-0.4", "global-promptfl"):
        _, meta = read_artifact((run_dir / f"{name}.safetensors").read_bytes(), embedded_encoder.fingerprint)
        assert meta.kind == "global" and meta.producer.startswith("train:")
    assert (run_dir / "accuracy_per_round.png").stat().st_size > 1000
    assert (run_dir / "accuracy_vs_theta.png").stat().st_size > 1000


def test_resume_continues_from_the_last_completed_round(run_dir):
    before = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    r = train_cli("--clients", str(N_CLIENTS), "--rounds", "3", "--methods", "promptfolio-0.4,local,promptfl",
                  "--images-per-class", "6", "--local-epochs", "2", "--out", str(run_dir), "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming after round 2" in r.stderr
    after = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [x["round"] for x in after] == [1, 2, 3]
    assert after[:2] == before


def test_methods_trained_side_by_side_equal_methods_trained_alone(embedded_encoder):
    cfg = TrainConfig(methods=["promptfolio-0.4", "local"], local_epochs=2)
    prompts = ClassPrompts(embedded_encoder, ["red circle", "blue star", "green cross"], cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    data = Features(torch.nn.functional.normalize(torch.randn(20, embedded_encoder.embed_dim, generator=gen), dim=-1),
                    torch.randint(0, 3, (20,), generator=gen))
    results = []
    for methods in (["promptfolio-0.4"], ["promptfolio-0.4", "local"]):
        specs = [parse_method(m) for m in methods]
        state = ClientState()
        ensure_local(state, specs, embedded_encoder, cfg, seed=0)
        g = {"promptfolio-0.4": initial_context(embedded_encoder, cfg, seed=0)}
        updated, _ = local_train(embedded_encoder, prompts, data, g, state, specs, cfg, seed=1)
        results.append((updated["promptfolio-0.4"], state.local["promptfolio-0.4"]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert not torch.allclose(results[0][0], initial_context(embedded_encoder, cfg, seed=0))


def test_auto_trains_both_ends_of_the_mix(embedded_encoder):
    """promptfolio-auto's loss sums over AUTO_TRAIN_THETAS and each of its prompts is clipped alone."""
    gen = torch.Generator().manual_seed(0)
    t_g, t_l = (torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1) for _ in range(2))
    x, y, scale = torch.randn(5, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1]), torch.tensor(2.0)
    expected = sum(torch.nn.functional.cross_entropy(portfolio.logits(x, portfolio.mix(t_g, t_l, t), scale), y)
                   for t in (0.0, 0.5, 1.0))
    auto = method_loss(parse_method("promptfolio-auto"), t_g, t_l, ClientState(), x, y, scale)
    assert torch.allclose(auto, expected)
    fixed = method_loss(parse_method("promptfolio-0.5"), t_g, t_l, ClientState(theta={"promptfolio-0.5": 0.9}), x, y, scale)
    assert not torch.allclose(fixed, auto)
    methods = [parse_method(m) for m in ("promptfolio-0.4", "promptfolio-auto", "local")]
    params = {(m.key, part): torch.zeros(1) for m in methods for part in ("global", "local")
              if (part == "global" and m.trains_global) or (part == "local" and m.trains_local)}
    sizes = [len(g) for g in clip_groups(methods, list(params), params)]
    assert sizes == [2, 1, 1, 1]  # fixed θ: one clip for both prompts; auto: one per prompt; local: its own


def test_federated_auto_theta_uses_the_pooled_curve_of_the_previous_round(tmp_path):
    out = tmp_path / "auto"
    r = train_cli("--clients", str(N_CLIENTS), "--rounds", "2", "--methods", "promptfolio-auto", "--images-per-class",
                  "6", "--local-epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = TrainConfig.model_validate(metrics["config"])
    grid, key = tuple(cfg.theta_grid), "promptfolio-auto"
    assert cfg.theta_prior_weight > 0
    prior: dict = {}
    for record in metrics["rounds"]:
        rows = record["eval"]
        for row in rows:  # each client's θ: its own curve, shrunk toward the last round's pooled curve
            own = portfolio.ThetaCurve(grid, tuple(row[f"val-accuracy/{key}"]), tuple(row[f"val-loss/{key}"]),
                                       int(row[f"val-n/{key}"]))
            assert own.n > 0
            assert row[f"theta/{key}"] == portfolio.select_theta(own, prior.get(key), cfg.theta_prior_weight).theta
        pooled = pooled_theta_curves(rows, grid)
        assert pooled[key].n == sum(int(r[f"val-n/{key}"]) for r in rows)
        assert decode_theta_priors(encode_theta_priors(pooled), grid) == pooled  # the wire round-trips
        prior = pooled


def test_data_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        read_imagefolder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        read_imagefolder(tmp_path / "empty")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="contains no images"):
        read_imagefolder(tmp_path / "noimg")
    Image.new("RGB", (8, 8)).save(tmp_path / "noimg" / "cat" / "a.png")
    with pytest.raises(DataError, match="not among the 2 classes"):
        read_imagefolder(tmp_path / "noimg", classes=["dog", "bird"])
    # classes absent at a client are fine: labels index into the federation's list
    folder = read_imagefolder(tmp_path / "noimg", classes=["dog", "cat"])
    assert folder.labels == [1]
    with pytest.raises(DataError, match="cannot give 10 clients"):
        dirichlet_partition(np.zeros(20, int), 10, 0.5, 0, min_size=3)
    parts = dirichlet_partition(np.repeat(np.arange(5), 40), 4, 0.1, seed=0, min_size=5)
    assert sorted(np.concatenate(parts).tolist()) == list(range(200)) and min(map(len, parts)) >= 5
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet_partition(np.repeat(np.arange(5), 40), 4, 0.1,
                                                                                   seed=0, min_size=5)]


def test_cli_refuses_bad_runs_without_traceback(tmp_path):
    r = train_cli("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "data folder not found" in r.stderr and "Traceback" not in r.stderr
    r = train_cli("--methods", "promptfolio-7", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "unknown method" in r.stderr
    r = train_cli("--clients", "50", "--images-per-class", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot give 50 clients" in r.stderr


def test_resume_refuses_a_checkpoint_of_another_encoder(run_dir):
    from training.outputs import load_checkpoint

    cfg = TrainConfig(out_dir=run_dir, resume=True)
    with pytest.raises(ValueError, match="cannot resume: the checkpoint .* was made for encoder"):
        load_checkpoint(cfg, "ViT-B-32:sha256:" + "0" * 64)


def test_a_client_without_training_samples_fails_clearly(embedded_encoder):
    cfg = TrainConfig(methods=["promptfolio"])
    specs = cfg.method_specs
    state = ClientState()
    ensure_local(state, specs, embedded_encoder, cfg, seed=0)
    empty = Features(torch.zeros(0, embedded_encoder.embed_dim), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="no training samples"):
        local_train(embedded_encoder, ClassPrompts(embedded_encoder, ["a", "b"], 4), empty,
                    {"promptfolio-0.4": initial_context(embedded_encoder, cfg, 0)}, state, specs, cfg, seed=0)


def test_a_frozen_global_prompt_stays_fixed_while_the_local_prompt_learns(embedded_encoder):
    cfg = TrainConfig(methods=["promptfolio"], local_epochs=2)
    specs = cfg.method_specs
    prompts = ClassPrompts(embedded_encoder, ["red circle", "blue star", "green cross"], cfg.n_ctx)
    gen = torch.Generator().manual_seed(0)
    data = Features(torch.nn.functional.normalize(torch.randn(20, embedded_encoder.embed_dim, generator=gen), dim=-1),
                    torch.randint(0, 3, (20,), generator=gen))
    state = ClientState()
    ensure_local(state, specs, embedded_encoder, cfg, seed=0)
    start = state.local["promptfolio-0.4"].clone()
    g = {"promptfolio-0.4": initial_context(embedded_encoder, cfg, seed=0) + 0.01}
    g_before = g["promptfolio-0.4"].clone()
    updated, losses = local_train(embedded_encoder, prompts, data, g, state, specs, cfg, seed=1, frozen_global=True)
    assert updated == {} and torch.equal(g["promptfolio-0.4"], g_before) and losses["promptfolio-0.4"] > 0
    assert not torch.allclose(state.local["promptfolio-0.4"], start)


def test_a_killed_runs_ray_folder_is_removed_by_the_next_run_and_a_live_ones_is_not(tmp_path, monkeypatch):
    """Ray's temporary folder of a run that was killed (its owner lock free) goes at the next run's
    start; a running one's (lock held) and a folder without a lock file stay."""
    import tempfile

    from training.simulation import OWNER_LOCK, RAY_PREFIX, hold_owner_lock, remove_orphaned_ray_folders

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    live, killed, unknown = (tmp_path / f"{RAY_PREFIX}{name}" for name in ("live", "killed", "unknown"))
    for folder in (live, killed, unknown):
        (folder / "session").mkdir(parents=True)
    (killed / OWNER_LOCK).touch()  # its owner ended: nobody holds the lock
    owner = hold_owner_lock(live)
    try:
        remove_orphaned_ray_folders()
        assert live.exists() and unknown.exists() and not killed.exists()
    finally:
        owner.close()
    remove_orphaned_ray_folders()  # the live run ended (lock released): now it goes too
    assert not live.exists() and unknown.exists()
