"""Federation for real sites: dropout, SecAgg+ and differential privacy, on real Flower rounds.

Each test runs `promptfolio train` (Flower's simulation engine, small embedded world) with the
test-only failure switch where clients must drop out; the failures are seeded, so the rounds in
which each client fails are known (see `failing`).
"""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_training import train_cli
from training.config import TrainConfig
from training.task import initial_context

N = 4
BASE = ("--clients", str(N), "--methods", "promptfolio-0.4,promptfl", "--images-per-class", "6", "--local-epochs",
        "1", "--audit")
KEYS = ("global/promptfolio-0.4", "global/promptfl")


def failing(seed: int, round_no: int, prob: float = 0.3) -> set[int]:
    """The clients the test-only switch fails in a round (training/client_app.fail_for_tests)."""
    return {p for p in range(N) if random.Random(f"{seed}/{round_no}/{p}").random() < prob}


def sent(out, partition: int, round_no: int) -> dict[str, torch.Tensor]:
    """What a client contributed in a round, from its own disk."""
    return load_file(str(out / "clients" / f"client-{partition}" / "audit" / f"round-{round_no:03d}-sent.safetensors"))


def weighted_mean(contributions: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    weights = [float(c["num-examples"]) for c in contributions]
    return sum(w * c[key].double() for w, c in zip(weights, contributions)) / sum(weights)


def test_dropouts_aggregate_over_exactly_the_replies_and_short_rounds_are_skipped(tmp_path):
    # seed 6: round 1 client 3 fails (3 answers: aggregated); round 2 clients 0 and 3 fail (2 answers,
    # fewer than --min-train-nodes 3: skipped); round 3 everyone answers, client 3 included
    assert [failing(6, r) for r in (1, 2, 3)] == [{3}, {0, 3}, set()]
    out = tmp_path / "drop"
    r = train_cli(*BASE, "--rounds", "3", "--min-train-nodes", "3", "--test-fail-prob", "0.3", "--test-fail-seed", "6",
                  "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "client 3 failed: TestOnlyFailure" in r.stderr and "round 2: 2 of 4 sampled clients answered" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stopped"] is None and [x["round"] for x in metrics["rounds"]] == [1, 2, 3]
    failed = {(f["round"], f["client"]) for f in metrics["failed_clients"]}
    assert all(f["node"] is not None for f in metrics["failed_clients"])
    assert failed == {(1, 3), (2, 0), (2, 3)}
    previous = None
    for record in metrics["rounds"]:
        n = record["round"]
        assert record["answered"] == sorted(set(range(N)) - failing(6, n)) and record["sampled"] == N
        assert len(record["answered_nodes"]) == len(record["answered"])
        assert len(record["eval"]) == N  # a client that failed training still evaluates: it is still in
        checksums = {row["global-checksum"] for row in record["eval"]}
        assert len(checksums) == 1
        if record["skipped"]:
            assert n == 2 and "aggregate-checksum" not in record
            assert checksums == previous  # the global prompt stayed as it was
            assert not (out / "audit" / f"round-{n:03d}-aggregate.safetensors").exists()
        else:
            replies = load_file(str(out / "audit" / f"round-{n:03d}-replies.safetensors"))
            aggregate = load_file(str(out / "audit" / f"round-{n:03d}-aggregate.safetensors"))
            assert {int(k.split("/")[0]) for k in replies} == set(record["answered"])
            contributions = [sent(out, p, n) for p in record["answered"]]
            for p, c in zip(record["answered"], contributions):  # the server got exactly what the client sent
                assert all(torch.equal(replies[f"{p}/{k}"], c[k]) for k in KEYS)
            for key in KEYS:
                assert torch.allclose(aggregate[key].double(), weighted_mean(contributions, key), atol=1e-6)
        previous = checksums
    # client 3 failed twice, then trained again from its own local prompt
    assert (out / "clients" / "client-3" / "audit" / "round-003-sent.safetensors").is_file()
    assert not (out / "clients" / "client-3" / "audit" / "round-001-sent.safetensors").exists()
    assert (out / "clients" / "client-3" / "local-promptfolio-0.4.safetensors").is_file()


def test_secure_aggregation_equals_fedavg_within_the_quantisation_error_and_hides_each_prompt(tmp_path):
    assert [failing(0, r) for r in (1, 2)] == [{0}, {0}]  # client 0 drops out of both secure rounds
    out = tmp_path / "secure"
    r = train_cli(*BASE, "--rounds", "2", "--secure-aggregation", "--test-fail-prob", "0.3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "through SecAgg+" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = TrainConfig.model_validate(metrics["config"])
    errors, bounds = [], []
    for record in metrics["rounds"]:
        n = record["round"]
        assert record["aggregation"] == "secagg+" and not record["skipped"] and record["answered"] == [1, 2, 3]
        # the reply's `site` record reaches the server through the SecAgg+ bridge (FitRes metrics)
        assert [row["site"] for row in record["train"]] == ["client-1", "client-2", "client-3"]
        aggregate = load_file(str(out / "audit" / f"round-{n:03d}-aggregate.safetensors"))
        contributions = {p: sent(out, p, n) for p in record["answered"]}
        for key in KEYS:
            errors.append(float((aggregate[key].double() - weighted_mean(list(contributions.values()), key)).abs().max()))
        # each client's stochastic rounding errs by < one step 2·clip/Q on n/max_weight·p, and the sum is divided
        # by Σ n/max_weight; rounding n/max_weight itself to a multiple of 1/Q perturbs the weights by a
        # relative 0.5/(Q·n/max_weight), i.e. < 2·max|p| times that
        ratios = [float(c["num-examples"]) / cfg.secagg_max_weight for c in contributions.values()]
        step = 2 * cfg.secagg_clip_range / cfg.secagg_quant_range
        spread = 2 * max(float(c[k].abs().max()) for c in contributions.values() for k in KEYS)
        bounds.append(len(ratios) * step / sum(ratios) + spread * 0.5 / (cfg.secagg_quant_range * min(ratios)))
        received = load_file(str(out / "audit" / f"round-{n:03d}-received.safetensors"))
        assert not (out / "audit" / f"round-{n:03d}-replies.safetensors").exists()
        masked = [v for k, v in received.items() if "/masked/" in k]
        assert masked and not any(v.is_floating_point() for v in received.values() if v.numel() > 1)
        for p, c in contributions.items():
            prompt = c[KEYS[0]].double().flatten()
            ratio = float(c["num-examples"]) / cfg.secagg_max_weight
            # undo the client's own encoding ((ratio·p + clip)·Q/2clip): without its mask this gives p back
            def decode(q: torch.Tensor) -> torch.Tensor:
                return (q.double() * 2 * cfg.secagg_clip_range / cfg.secagg_quant_range - cfg.secagg_clip_range) / ratio
            plain = torch.round((ratio * prompt + cfg.secagg_clip_range) * cfg.secagg_quant_range
                                / (2 * cfg.secagg_clip_range))
            assert torch.allclose(decode(plain), prompt, atol=1e-4)
            for v in masked:
                if v.numel() == prompt.numel():
                    assert (decode(v.flatten()) - prompt).abs().max() > 1.0  # masked: nothing of p is left
            assert not any(v.numel() == 1 and int(v) == round(ratio * cfg.secagg_quant_range) for v in masked)
    # the measured error of SecAgg+ against plain weighted FedAvg (quantisation of n/max_weight·prompt)
    print(f"SecAgg+ vs weighted FedAvg, max abs error per coordinate: {max(errors):.2e} (bound {min(bounds):.2e})")
    assert 0 < max(errors) <= min(bounds)


def test_central_dp_reports_privacy_spent_and_clips_each_update(tmp_path, embedded_encoder):
    out = tmp_path / "dp"
    r = train_cli(*BASE, "--rounds", "2", "--dp", "client", "--dp-clip-norm", "0.05", "--dp-noise", "1.5",
                  "--test-fail-prob", "0.3", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = TrainConfig.model_validate(metrics["config"])
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()  # an independent account of the same releases
    previous = {k: initial_context(embedded_encoder, cfg, seed=cfg.seed).double() for k in KEYS}
    for record in metrics["rounds"]:
        n, k = record["round"], len(record["answered"])
        assert k == N - len(failing(0, n)) and record["aggregation"] == "dp-client"
        assert all(row["site"] == f"client-{row['partition']}" for row in record["train"])  # fixedclipping_mod kept it
        accountant.compose(dp_event.GaussianDpEvent(1.5 * k / N))
        assert record["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
        assert record["privacy"]["delta"] == 1e-5 and record["privacy"]["releases"] == n
        assert f"round {n}: privacy spent ε = {record['privacy']['epsilon']:.3f}" in r.stderr
        replies = load_file(str(out / "audit" / f"round-{n:03d}-replies.safetensors"))
        aggregate = load_file(str(out / "audit" / f"round-{n:03d}-aggregate.safetensors"))
        updates = []
        for p in record["answered"]:  # each client clipped its update to the global prompts (fixedclipping_mod)
            delta = torch.cat([(replies[f"{p}/{key}"].double() - previous[key]).flatten() for key in KEYS])
            assert float(delta.norm()) <= 0.05 + 1e-5
            updates.append(delta)
        noise = torch.cat([(aggregate[key].double() - previous[key]).flatten() for key in KEYS]) \
            - torch.stack(updates).mean(0)  # uniform mean of the clipped updates, plus Gaussian noise
        assert float(noise.std()) == pytest.approx(1.5 * 0.05 / N, rel=0.15)
        previous = {key: aggregate[key].double() for key in KEYS}
    assert metrics["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)
    assert "privacy spent over the run: ε =" in r.stderr


def test_a_round_that_stays_short_after_its_retries_stops_the_run_clearly(tmp_path):
    assert failing(0, 1) == {0}  # the switch is seeded per round and client: client 0 fails every attempt
    out = tmp_path / "retry"
    r = train_cli(*BASE, "--rounds", "1", "--min-train-nodes", "4", "--short-round", "retry", "--round-retries", "1",
                  "--test-fail-prob", "0.3", "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "asking again (retry 1 of 1)" in r.stderr
    assert "the run stopped: round 1: 3 of 4 sampled clients answered, fewer than --min-train-nodes 4, after 1 " \
           "retries" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rounds"] == [] and metrics["stopped"].startswith("round 1: 3 of 4")
    assert [(f["round"], f["client"]) for f in metrics["failed_clients"]] == [(1, 0), (1, 0)]  # first try and retry


def test_privacy_options_are_checked():
    with pytest.raises(ValueError, match="not supported"):
        TrainConfig(dp="server", secure_aggregation=True)
    with pytest.raises(ValueError, match="--dp client needs a method with a global prompt"):
        TrainConfig(methods=["local"], dp="client")
    with pytest.raises(ValueError):
        TrainConfig(short_round="wait")
    assert np.isclose(TrainConfig().secagg_clip_range, 1.0)
