"""Flower ServerApp: FedAvg over the global prompts only, weighted by num-examples.

Each round it checks that replies carry nothing but global prompts, records per-client metrics,
writes `metrics.json` and a checkpoint (so an interrupted run resumes from the last completed
round), and at the end writes one global prompt artifact per method.
"""

from __future__ import annotations

import json
import sys
import time
from logging import INFO
from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file, save, save_file

from promptfolio.encoder import load_encoder
from prompts_store.store import PromptStore, atomic_write
from training.client_app import GLOBAL_PREFIX, PLACEHOLDER_KEY
from training.config import TrainConfig
from training.export import checksum, prompt_artifact
from training.task import THETA_PRIOR_KEY, encode_theta_priors, initial_context, pooled_theta_curves

CHECKPOINT = "server/checkpoint.safetensors"


class PortfolioFedAvg(FedAvg):
    """FedAvg that audits replies, keeps per-client metrics and checkpoints every round."""

    def __init__(self, cfg: TrainConfig, fingerprint: str, allowed_keys: set[str], offset: int, history: list[dict],
                 **kw):
        super().__init__(**kw)
        self.cfg, self.allowed_keys, self.offset, self.history = cfg, allowed_keys, offset, history
        self.fingerprint = fingerprint
        self.current: ArrayRecord | None = None
        self.pending: dict = {}
        self.started = time.time()
        # per-client θ: the pooled validation curves of the last evaluation, sent with the next one
        self.theta_priors = pooled_theta_curves(history[-1]["eval"], tuple(cfg.theta_grid)) if history else {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        if len(ok) < len(replies):
            errors = [r.error.reason for r in replies if r.has_error()]
            report(f"round {server_round + self.offset}: {len(errors)} client(s) failed: {errors[:2]}")
        if not ok:
            raise RuntimeError("no client returned a training result this round; see the errors above")
        audit = {}
        train_rows = []
        for r in ok:
            keys = set(r.content["arrays"].keys())
            if not keys <= self.allowed_keys:  # a local prompt must never reach the server
                raise RuntimeError(f"a client sent arrays {sorted(keys - self.allowed_keys)} besides the global prompts")
            row = dict(r.content["metrics"])
            train_rows.append(row)
            for k, v in r.content["arrays"].to_torch_state_dict().items():
                audit[f"{int(row['partition'])}/{k}"] = v.contiguous()
            audit[f"{int(row['partition'])}/num-examples"] = torch.tensor([float(row["num-examples"])])
        arrays, metrics = super().aggregate_train(server_round, ok)
        self.current = arrays
        round_no = server_round + self.offset
        if self.cfg.audit:
            audit_dir = self.cfg.out_dir / "audit"
            audit_dir.mkdir(parents=True, exist_ok=True)
            save_file(audit, str(audit_dir / f"round-{round_no:03d}-replies.safetensors"))
            save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                      str(audit_dir / f"round-{round_no:03d}-aggregate.safetensors"))
        self.pending = {"round": round_no, "train": sorted(train_rows, key=lambda r: r["partition"]),
                        "aggregate-checksum": checksum(globals_of(arrays))}
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.theta_priors:
            config = ConfigRecord({**config, THETA_PRIOR_KEY: encode_theta_priors(self.theta_priors)})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = [r for r in replies if not r.has_error()]
        rows = sorted((dict(r.content["metrics"]) for r in replies), key=lambda r: r["partition"])
        self.theta_priors = pooled_theta_curves(rows, tuple(self.cfg.theta_grid))
        record = dict(self.pending, eval=rows, seconds=round(time.time() - self.started, 2))
        self.history.append(record)
        write_outputs(self.cfg, self.history, self.current, self.fingerprint)
        report(progress_line(record, self.cfg))
        return super().aggregate_evaluate(server_round, replies)


def report(line: str) -> None:
    """To the terminal in a simulation, and to Flower's log (what `flwr run --stream` shows)."""
    print(line, file=sys.stderr, flush=True)
    log(INFO, line)


def globals_of(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k.removeprefix(GLOBAL_PREFIX): v for k, v in arrays.to_torch_state_dict().items()
            if k.startswith(GLOBAL_PREFIX)}


def method_means(rows: list[dict], metric: str) -> dict[str, float]:
    keys = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(metric + "/")})
    return {k: float(np.mean([r[f"{metric}/{k}"] for r in rows if f"{metric}/{k}" in r])) for k in keys}


def progress_line(record: dict, cfg: TrainConfig) -> str:
    personal = method_means(record["eval"], "personal")
    general = method_means(record["eval"], "general")
    parts = [f"{k} {personal[k]:.1f}/{general.get(k, float('nan')):.1f}" for k in personal]
    return f"round {record['round']}/{cfg.rounds}  personal/general acc %: " + "  ".join(parts)


def write_outputs(cfg: TrainConfig, history: list[dict], arrays: ArrayRecord | None, fingerprint: str) -> None:
    """metrics.json and the checkpoint, both replaced atomically."""
    summary = {"config": json.loads(cfg.to_json()), "rounds": history}
    if history:
        last = history[-1]["eval"]
        summary["final"] = {
            key: {"personal_mean": float(np.mean([r[f"personal/{key}"] for r in last])),
                  "general_mean": float(np.mean([r[f"general/{key}"] for r in last if f"general/{key}" in r])),
                  "per_client_personal": [r[f"personal/{key}"] for r in last],
                  "per_client_theta": [r[f"theta/{key}"] for r in last]}
            for key in method_means(last, "personal")}
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg.out_dir / "metrics.json", json.dumps(summary, indent=1).encode())
    if arrays is not None and history:
        path = cfg.out_dir / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        atomic_write(path, save(tensors, metadata={"round": str(history[-1]["round"]), "encoder": fingerprint}))


def load_checkpoint(cfg: TrainConfig, fingerprint: str) -> tuple[int, ArrayRecord | None, list[dict]]:
    path = cfg.out_dir / CHECKPOINT
    if not (cfg.resume and path.is_file()):
        return 0, None, []
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("encoder") != fingerprint:
        raise ValueError(f"cannot resume: the checkpoint in {path} was made for encoder "
                         f"{str(meta.get('encoder'))[:60]}…, not {fingerprint[:60]}…")
    round_no = int(meta["round"])
    history = json.loads((cfg.out_dir / "metrics.json").read_text())["rounds"]
    history = [h for h in history if h["round"] <= round_no]
    return round_no, ArrayRecord(load_file(str(path))), history


def run_server(grid: Grid, cfg: TrainConfig) -> list[dict]:
    encoder = load_encoder(cfg.arch, cfg.pretrained)
    classes = cfg.classes or json.loads((cfg.out_dir / "plan.json").read_text())["classes"]
    methods = cfg.method_specs
    keys = {GLOBAL_PREFIX + m.key for m in methods if m.trains_global}
    offset, arrays, history = load_checkpoint(cfg, encoder.fingerprint)
    if arrays is None:
        init = initial_context(encoder, cfg, seed=cfg.seed)
        arrays = ArrayRecord({k: init.clone() for k in sorted(keys)} or {PLACEHOLDER_KEY: torch.zeros(1)})
    elif offset:
        report(f"resuming after round {offset} from {cfg.out_dir / CHECKPOINT}")
    n_train = max(1, int(round(cfg.num_clients * cfg.fraction_train)))
    strategy = PortfolioFedAvg(cfg, encoder.fingerprint, keys | {PLACEHOLDER_KEY}, offset, history, fraction_train=cfg.fraction_train,
                               fraction_evaluate=1.0, min_train_nodes=n_train, min_evaluate_nodes=cfg.num_clients,
                               min_available_nodes=cfg.num_clients)
    strategy.current = arrays
    config = ConfigRecord({"train-config": cfg.to_json(), "classes": json.dumps(classes), "round-offset": offset})
    if cfg.rounds > offset:
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds - offset, train_config=config,
                       evaluate_config=config)
    final = strategy.current
    for key, ctx in globals_of(final).items():
        atomic_write(cfg.out_dir / f"global-{key}.safetensors",
                     prompt_artifact(ctx, "global", encoder, classes, producer=f"train:{key}"))
    if cfg.publish_store is not None:
        publish = cfg.publish_method or next((m.key for m in methods if m.trains_global), None)
        if publish is not None:
            from prompts_store.artifact import read_artifact

            ctx, meta = read_artifact((cfg.out_dir / f"global-{publish}.safetensors").read_bytes())
            stored = PromptStore(cfg.publish_store, encoder.fingerprint, encoder.text_width).put(ctx, meta)
            report(f"published the {publish} global prompt to {cfg.publish_store} as version {stored.version}")
    return strategy.history


def make_server_app(cfg: TrainConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg or TrainConfig.model_validate({k.replace("-", "_"): v for k, v in context.run_config.items()})
        run_server(grid, run_cfg)

    return app


app = make_server_app()  # for `flwr run` on the deployment engine
