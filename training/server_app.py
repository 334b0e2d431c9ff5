"""Flower ServerApp: FedAvg over the global prompts only, weighted by num-examples.

Each round it checks that replies carry nothing but global prompts, aggregates over the clients
that answered (a failed, hung or disconnected client is recorded and the round goes on without
it), records who answered (partition numbers in a simulation, site names on the deployment
engine) and per-client metrics, and checkpoints (outputs.py), so an
interrupted run resumes from the last completed round; at the end it writes one global prompt
artifact per method from the arrays the strategy returns.
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
from training.privacy import UNIFORM_WEIGHT, PrivacyLedger, dp_wrapper
from training.secure import SecureRound, save_received, secure_train_round
from training.task import THETA_PRIOR_KEY, encode_theta_priors, initial_context, pooled_theta_curves


def addressee(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for: an error the SuperLink wrote itself (e.g. "Node Unavailable"
    for a SuperNode that went away) comes from the SuperLink's own id, not the node's."""
    nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    return nodes.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


class RunStopped(RuntimeError):
    """A round kept getting fewer replies than --min-train-nodes after every retry."""


class PortfolioFedAvg(FedAvg):
    """FedAvg over the replies that arrived: audits them, records who answered and who failed,
    skips or retries a round with too few replies, and checkpoints every round. Optionally the
    round's aggregation runs through SecAgg+ (training/secure.py) or a Flower DP wrapper
    (training/privacy.py)."""

    def __init__(self, cfg: TrainConfig, fingerprint: str, offset: int, history: list[dict], n_train: int, **kw):
        super().__init__(**kw)
        self.cfg, self.fingerprint, self.offset, self.history = cfg, fingerprint, offset, history
        self.n_train = n_train
        self.allowed = allowed_keys([m.key for m in cfg.method_specs if m.trains_global])
        self.current: ArrayRecord | None = None
        self.failures: list[dict] = []
        self.pending: dict = {}
        self.featured: set[str] = set()
        self.started = time.time()
        self.dp = dp_wrapper(cfg, n_train, **kw) if cfg.dp != "off" else None
        self.ledger = PrivacyLedger(cfg) if self.dp else None
        self.attempt: tuple | None = None  # this round's configure_train arguments, to ask again
        self.sampled: list[int] = []
        self.secure: SecureRound | None = None
        self.replies: list[Message] = []
        self.evaluating = 0
        self.node_clients: dict[int, int | str] = {}  # node id -> the client it answered as (to name its failures)
        self.outgoing: list[Message] = []  # the stage's instructions (the grid gives them their message ids)
        # per-client θ: the pooled validation curves of the last evaluation, sent with the next one
        self.theta_priors = pooled_theta_curves(history[-1]["eval"], tuple(cfg.theta_grid)) if history else {}

    def _sampling(self, server_round: int) -> None:
        """Round 1 waits for every client; later rounds go on with whoever is still connected."""
        first = server_round == 1
        for strategy in (self, *([self.dp.strategy] if self.dp else [])):
            strategy.min_available_nodes = self.cfg.num_clients if first else self.cfg.min_train_nodes
            strategy.min_train_nodes = self.n_train if first else self.cfg.min_train_nodes
            strategy.min_evaluate_nodes = self.cfg.num_clients if first else self.cfg.min_train_nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._sampling(server_round)
        self.attempt = (server_round, arrays, config, grid)
        self.current = arrays
        source = self.dp if self.dp else super()
        messages = list(source.configure_train(server_round, arrays, config, grid))
        self.sampled = [m.metadata.dst_node_id for m in messages]
        self.outgoing = messages
        first = " (each first extracts its image features)" if server_round + self.offset == 1 else ""
        how = " through SecAgg+" if self.cfg.secure_aggregation else ""
        outputs.report(f"round {server_round + self.offset}/{self.cfg.rounds}: training {len(messages)} "
                       f"clients{how}{first}")
        if self.cfg.secure_aggregation:  # four message rounds of the protocol, run here with the grid
            self.secure = secure_train_round(grid, messages, self.cfg, server_round)
            return []
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.theta_priors:  # per-client θ: the federation's pooled validation curves from the last round
            config = ConfigRecord({**config, THETA_PRIOR_KEY: encode_theta_priors(self.theta_priors)})
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.evaluating = len(messages)
        self.outgoing = messages
        return messages

    def _answered(self, server_round: int, replies: Iterable[Message], stage: str) -> list[Message]:
        """The replies without an error; each failure is recorded (and reported), not fatal."""
        ok = []
        for r in replies:
            if r.has_error():
                client, cause = failure_of(r.error.reason)
                self._failed(server_round, stage, client, cause, addressee(r, self.outgoing))
            else:
                ok.append(r)
        return ok

    def _failed(self, server_round: int, stage: str, client: int | str | None, cause: str,
                node: int | None = None) -> None:
        """Record a failed client (its partition in a simulation, its site name on the deployment
        engine; None when unknown, e.g. one that never answered); the run goes on without it."""
        round_no = server_round + self.offset
        if client is None and node is not None:  # e.g. a SuperNode that went away: named by its earlier replies
            client = self.node_clients.get(node)
        self.failures.append({"round": round_no, "stage": stage, "client": client, "node": node, "error": cause})
        who = f"client {client}" if client is not None else (f"node {node}" if node is not None else "clients")
        outputs.report(f"round {round_no} ({stage}): {who} failed: {cause}; the round goes on without it")

    def _train_rows(self, server_round: int, replies: Iterable[Message]) -> list[dict]:
        """One metrics row per client whose update reaches the aggregate (its node id added)."""
        if self.secure is not None:
            for node, reason in self.secure.errors:
                self._failed(server_round, "train", *failure_of(reason), node)
            silent = self.secure.failed - len(self.secure.errors)
            if silent > 0:
                self._failed(server_round, "train", None, f"{silent} client(s) did not answer a SecAgg+ stage")
            return self.secure.rows
        replies = list(replies)
        ok = self._answered(server_round, replies, "train")
        self.replies = ok
        missing = len(self.sampled) - len(replies)
        if missing > 0:
            self._failed(server_round, "train", None, f"{missing} client(s) did not answer within "
                         f"{self.cfg.round_timeout:g} s")
        return [dict(outputs.reply_row(r), node=r.metadata.src_node_id) for r in ok]

    def _retry(self, server_round: int) -> Iterable[Message]:
        _, arrays, config, grid = self.attempt
        messages = list(self.configure_train(server_round, arrays, config, grid))
        return grid.send_and_receive(messages, timeout=self.cfg.round_timeout) if messages else []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        round_no = server_round + self.offset
        replies = list(replies)
        rows = self._train_rows(server_round, replies)
        attempts = 0
        while len(rows) < self.cfg.min_train_nodes:
            short = f"round {round_no}: {len(rows)} of {len(self.sampled)} sampled clients answered, " \
                    f"fewer than --min-train-nodes {self.cfg.min_train_nodes}"
            if self.cfg.short_round == "skip":
                outputs.report(short + "; skipped (the global prompt stays as it was)")
                self.pending = self._record(round_no, rows, skipped=True)
                return None, None
            if attempts >= self.cfg.round_retries:
                outputs.write_metrics(self.cfg, self.history, self.failures)
                raise RunStopped(short + f", after {attempts} retries")
            attempts += 1
            outputs.report(short + f"; asking again (retry {attempts} of {self.cfg.round_retries})")
            rows = self._train_rows(server_round, list(self._retry(server_round)))
        self._report_features(rows)
        arrays, metrics = self._aggregate(server_round, rows)
        if arrays is None:  # SecAgg+ halted (too few clients left to unmask) or the DP wrapper refused
            outputs.report(f"round {round_no}: no aggregate; skipped (the global prompt stays as it was)")
            self.pending = self._record(round_no, rows, skipped=True)
            return None, None
        self.current = arrays
        self.pending = self._record(round_no, rows, skipped=False, aggregate=arrays)
        return arrays, metrics

    def _aggregate(self, server_round: int, rows: list[dict]):
        """Plain weighted FedAvg, SecAgg+'s unmasked mean, or the DP wrapper's noisy uniform mean."""
        if self.secure is not None:
            arrays, received = self.secure.arrays, self.secure.received
            self.secure = None
            if arrays is not None:
                self._audit(server_round + self.offset, arrays, secure_received=received)
            return arrays, None
        for r in self.replies:
            keys = set(r.content["arrays"].keys())
            if not keys <= self.allowed:  # a local prompt must never reach the server
                raise RuntimeError(f"a client sent arrays {sorted(keys - self.allowed)} besides the global prompts")
        audit = {}
        for r in self.replies:
            row = outputs.reply_row(r)
            for k, v in r.content["arrays"].to_torch_state_dict().items():
                audit[f"{outputs.client_name(row)}/{k}"] = v.contiguous()
            audit[f"{outputs.client_name(row)}/num-examples"] = torch.tensor([float(row["num-examples"])])
        if self.dp is None:
            arrays, metrics = super().aggregate_train(server_round, self.replies)
        else:
            for r in self.replies:
                r.content["metrics"][UNIFORM_WEIGHT] = 1.0
            arrays, metrics = self.dp.aggregate_train(server_round, self.replies)
        if arrays is not None:
            self._audit(server_round + self.offset, arrays, replies=audit)
        return arrays, metrics

    def _audit(self, round_no: int, arrays: ArrayRecord, replies: dict | None = None,
               secure_received: dict | None = None) -> None:
        if not self.cfg.audit:
            return
        audit_dir = self.cfg.out_dir / "audit"
        audit_dir.mkdir(parents=True, exist_ok=True)
        if replies is not None:
            save_file(replies, str(audit_dir / f"round-{round_no:03d}-replies.safetensors"))
        if secure_received is not None:  # what the server received: masked vectors, never a prompt
            save_received(secure_received, audit_dir / f"round-{round_no:03d}-received.safetensors")
        save_file({k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
                  str(audit_dir / f"round-{round_no:03d}-aggregate.safetensors"))

    def _remember(self, rows: list[dict]) -> None:
        self.node_clients.update({int(r["node"]): outputs.client_id(r) for r in rows if "node" in r})

    def _record(self, round_no: int, rows: list[dict], skipped: bool, aggregate: ArrayRecord | None = None) -> dict:
        rows = sorted(rows, key=outputs.row_order)
        self._remember(rows)
        record = {"round": round_no, "train": rows, "sampled": len(self.sampled), "sampled_nodes": sorted(self.sampled),
                  "answered": [outputs.client_id(r) for r in rows],
                  "answered_nodes": sorted(int(r["node"]) for r in rows if "node" in r), "skipped": skipped,
                  "aggregation": "secagg+" if self.cfg.secure_aggregation else
                  (f"dp-{self.cfg.dp}" if self.dp else "fedavg")}
        if aggregate is not None:
            record["aggregate-checksum"] = checksum(unpack_globals(aggregate))
            if self.ledger is not None:
                record["privacy"] = self.ledger.release(len(rows), self.n_train)
                p = record["privacy"]
                outputs.report(f"round {round_no}: privacy spent ε = {p['epsilon']:.3f} at δ = {p['delta']:g} "
                               f"(noise multiplier {p['round_noise_multiplier']:.3f} for {len(rows)} replies)")
        return record

    def _report_features(self, rows: list[dict]) -> None:
        fresh = sorted((r for r in rows if "feature-seconds" in r and outputs.client_name(r) not in self.featured),
                       key=outputs.row_order)
        if fresh:
            self.featured |= {outputs.client_name(r) for r in fresh}
            outputs.report("image features: " + ", ".join(
                f"client {outputs.client_name(r)} {int(r['feature-images'])} images in {r['feature-seconds']:.1f} s"
                for r in fresh))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = self._answered(server_round, replies, "evaluate")
        if self.evaluating > len(replies):
            self._failed(server_round, "evaluate", None, f"{self.evaluating - len(replies)} client(s) did not "
                         f"answer within {self.cfg.round_timeout:g} s")
        rows = sorted((dict(outputs.reply_row(r), node=r.metadata.src_node_id) for r in ok), key=outputs.row_order)
        self._remember(rows)
        if rows:
            self.theta_priors = pooled_theta_curves(rows, tuple(self.cfg.theta_grid))
        record = dict(self.pending, eval=rows, seconds=round(time.time() - self.started, 2))
        self.history.append(record)
        outputs.write_metrics(self.cfg, self.history, self.failures)
        if self.current is not None:
            outputs.write_checkpoint(self.cfg, self.current, record["round"], self.fingerprint)
        if rows:
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
    strategy = PortfolioFedAvg(cfg, encoder.fingerprint, offset, history, n_train, fraction_train=cfg.fraction_train,
                               fraction_evaluate=1.0, min_train_nodes=n_train, min_evaluate_nodes=cfg.num_clients,
                               min_available_nodes=cfg.num_clients)
    # the clients read the train config from the run (deployment) or their closure (simulation)
    config = ConfigRecord({"classes": json.dumps(classes), "round-offset": offset})
    if cfg.rounds > offset:
        try:
            result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds - offset,
                                    timeout=cfg.round_timeout, train_config=config, evaluate_config=config)
        except RunStopped as stopped:
            outputs.write_metrics(cfg, strategy.history, strategy.failures, stopped=str(stopped))
            outputs.report(f"stopped: {stopped}")
            return strategy.history
        arrays = result.arrays
    if strategy.ledger is not None:
        spent = strategy.ledger.spent()
        outputs.write_metrics(cfg, strategy.history, strategy.failures, privacy=spent)
        outputs.report(f"privacy spent over the run: ε = {spent['epsilon']:.3f} at δ = {spent['delta']:g} "
                       f"({spent['releases']} noisy releases of the global prompts)")
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
