"""Flower ServerApp: FedAvg over the global prompts only, weighted by num-examples.

Each round it checks that replies carry nothing but global prompts and that no client failed,
records per-client metrics and checkpoints (outputs.py), so an interrupted run resumes from the
last completed round; at the end it writes one global prompt artifact per method from the
arrays the strategy returns.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from pydantic import ValidationError
from safetensors.torch import save_file

from promptfolio.encoder import load_encoder
from training import outputs
from training.config import TrainConfig, invalid_config_message
from training.data import DataPlan
from training.exchange import allowed_keys, failure_of, pack_globals, unpack_globals
from training.export import checksum
from training.task import THETA_PRIOR_KEY, encode_theta_priors, initial_context, pooled_theta_curves


class ClientsFailed(RuntimeError):
    """A client failed or did not answer; the run stops rather than average without it."""


class PortfolioFedAvg(FedAvg):
    """FedAvg that audits replies, stops on a client failure, keeps per-client metrics and
    checkpoints every round."""

    def __init__(self, cfg: TrainConfig, fingerprint: str, offset: int, history: list[dict], **kw):
        super().__init__(**kw)
        self.cfg, self.fingerprint, self.offset, self.history = cfg, fingerprint, offset, history
        self.allowed = allowed_keys([m.key for m in cfg.method_specs if m.trains_global])
        self.current: ArrayRecord | None = None
        self.failures: list[dict] = []
        self.expected = 0
        self.pending: dict = {}
        self.featured: set[str] = set()
        self.started = time.time()
        # per-client θ: the pooled validation curves of the last evaluation, sent with the next one
        self.theta_priors = pooled_theta_curves(history[-1]["eval"], tuple(cfg.theta_grid)) if history else {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.expected = len(messages)
        first = " (each first extracts its image features)" if server_round + self.offset == 1 else ""
        outputs.report(f"round {server_round + self.offset}/{self.cfg.rounds}: training {len(messages)} "
                       f"clients{first}")
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.theta_priors:  # per-client θ: the federation's pooled validation curves from the last round
            config = ConfigRecord({**config, THETA_PRIOR_KEY: encode_theta_priors(self.theta_priors)})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.expected = len(messages)
        return messages

    def _successful(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        """The replies, or ClientsFailed naming every client that failed or never answered."""
        replies = list(replies)
        round_no = server_round + self.offset
        for r in replies:
            if r.has_error():
                partition, cause = failure_of(r.error.reason)
                self.failures.append({"round": round_no, "stage": stage, "client": partition, "error": cause})
        missing = self.expected - len(replies)
        if missing > 0:
            self.failures.append({"round": round_no, "stage": stage, "client": None,
                                  "error": f"{missing} client(s) did not answer"})
        if self.failures:
            outputs.write_metrics(self.cfg, self.history, self.failures)
            named = "; ".join(f"client {f['client'] if f['client'] is not None else '?'}: {f['error']}"
                              for f in self.failures)
            raise ClientsFailed(f"round {round_no} ({stage}): {named}")
        return replies

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = self._successful(server_round, replies, "train")
        audit, rows = {}, []
        for r in ok:
            keys = set(r.content["arrays"].keys())
            if not keys <= self.allowed:  # a local prompt must never reach the server
                raise RuntimeError(f"a client sent arrays {sorted(keys - self.allowed)} besides the global prompts")
            row = outputs.reply_row(r)
            rows.append(row)
            for k, v in r.content["arrays"].to_torch_state_dict().items():
                audit[f"{outputs.client_name(row)}/{k}"] = v.contiguous()
            audit[f"{outputs.client_name(row)}/num-examples"] = torch.tensor([float(row["num-examples"])])
        self._report_features(rows)
        arrays, metrics = super().aggregate_train(server_round, ok)
        self.current = arrays
        round_no = server_round + self.offset
        if self.cfg.audit:
            audit_dir = self.cfg.out_dir / "audit"
            audit_dir.mkdir(parents=True, exist_ok=True)
            save_file(audit, str(audit_dir / f"round-{round_no:03d}-replies.safetensors"))
            save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                      str(audit_dir / f"round-{round_no:03d}-aggregate.safetensors"))
        self.pending = {"round": round_no, "train": sorted(rows, key=outputs.row_order),
                        "aggregate-checksum": checksum(unpack_globals(arrays))}
        return arrays, metrics

    def _report_features(self, rows: list[dict]) -> None:
        fresh = sorted((r for r in rows if "feature-seconds" in r and outputs.client_name(r) not in self.featured),
                       key=outputs.row_order)
        if fresh:
            self.featured |= {outputs.client_name(r) for r in fresh}
            outputs.report("image features: " + ", ".join(
                f"client {outputs.client_name(r)} {int(r['feature-images'])} images in {r['feature-seconds']:.1f} s"
                for r in fresh))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        ok = self._successful(server_round, replies, "evaluate")
        rows = sorted((outputs.reply_row(r) for r in ok), key=outputs.row_order)
        self.theta_priors = pooled_theta_curves(rows, tuple(self.cfg.theta_grid))
        record = dict(self.pending, eval=rows, seconds=round(time.time() - self.started, 2))
        self.history.append(record)
        outputs.write_metrics(self.cfg, self.history, self.failures)
        if self.current is not None:
            outputs.write_checkpoint(self.cfg, self.current, record["round"], self.fingerprint)
        outputs.report(outputs.progress_line(record, self.cfg))
        return super().aggregate_evaluate(server_round, ok)


def run_server(grid: Grid, cfg: TrainConfig) -> list[dict]:
    encoder = load_encoder(cfg.arch, cfg.pretrained)
    classes = cfg.classes or DataPlan.read(cfg.out_dir / "plan.json").classes
    global_keys = sorted(m.key for m in cfg.method_specs if m.trains_global)
    offset, arrays, history = outputs.load_checkpoint(cfg, encoder.fingerprint)
    if arrays is None:
        init = initial_context(encoder, cfg, seed=cfg.seed)
        arrays = pack_globals({k: init.clone() for k in global_keys})
    elif offset:
        outputs.report(f"resuming after round {offset} from {cfg.out_dir / outputs.CHECKPOINT}")
    n_train = max(1, int(round(cfg.num_clients * cfg.fraction_train)))
    strategy = PortfolioFedAvg(cfg, encoder.fingerprint, offset, history, fraction_train=cfg.fraction_train,
                               fraction_evaluate=1.0, min_train_nodes=n_train, min_evaluate_nodes=cfg.num_clients,
                               min_available_nodes=cfg.num_clients)
    # the clients read the train config from the run (deployment) or their closure (simulation)
    config = ConfigRecord({"classes": json.dumps(classes), "round-offset": offset})
    if cfg.rounds > offset:
        try:
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds - offset,
                                    train_config=config, evaluate_config=config)
        except ClientsFailed as failed:
            outputs.report(f"stopped: {failed}")
            return strategy.history
        arrays = result.arrays
    paths = outputs.write_global_artifacts(cfg, unpack_globals(arrays), encoder, classes)
    outputs.publish(cfg, paths, encoder)
    return strategy.history


def make_server_app(cfg: TrainConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        outputs.quiet_duplicate_log()
        try:
            run_cfg = cfg or TrainConfig.from_run_config(context.run_config)
        except ValidationError as e:  # a bad --run-config: one line in the run's log, not a traceback
            outputs.report(f"run stopped: {invalid_config_message(e)}")
            return
        if cfg is None:  # the deployment engine: its log is the user's only record of the settings
            outputs.report(f"train config: {json.dumps(run_cfg.model_dump(mode='json'), separators=(',', ':'))}")
        run_server(grid, run_cfg)

    return app


app = make_server_app()  # for `flwr run` on the deployment engine
