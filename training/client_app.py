"""Flower ClientApp: trains each method's global copy and its private local prompt.

Replies carry only the global prompts (training/exchange.py) and num-examples, plus the site's
name (training/site.py); the local prompts stay in `context.state` (and in the site's own folder,
so a restarted site resumes) and never leave.
Any failure is re-raised as one line naming this client (its partition, or its site name), which
the server records; the run goes on without the client, which takes part again in later rounds.
"""

from __future__ import annotations

import functools
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save

from promptfolio.encoder import Encoder, load_encoder
from promptfolio.prompts import ClassPrompts
from prompts_store.store import atomic_write
from training import data as data_mod
from training.config import TrainConfig
from training.exchange import client_failure, pack_globals, unpack_globals
from training.privacy import clipping_when_asked
from training.secure import legacy_bridge, secure_when_asked
from training.export import checksum, prompt_artifact
from training.outputs import quiet_duplicate_log
from training.site import SiteDisk, site_name, write_local_artifact
from training.task import (THETA_PRIOR_KEY, ClientState, Features, decode_theta_priors, ensure_local, evaluate,
                           local_train)


@functools.lru_cache(maxsize=2)
def cached_encoder(arch: str, pretrained: str | None) -> Encoder:
    torch.set_num_threads(1)  # one simulated client per core
    return load_encoder(arch, pretrained)


@functools.lru_cache(maxsize=4)
def cached_prompts(arch: str, pretrained: str | None, classes: tuple[str, ...], n_ctx: int) -> ClassPrompts:
    return ClassPrompts(cached_encoder(arch, pretrained), list(classes), n_ctx)


class ClientRun:
    """Everything one message needs: config, encoder, data features and private state."""

    def __init__(self, msg: Message, context: Context, cfg: TrainConfig | None):
        config = msg.content["config"]
        quiet_duplicate_log()
        if cfg is None:  # deployment engine: the run's config, as the ServerApp reads it
            cfg = (TrainConfig.model_validate_json(str(config["train-config"])) if "train-config" in config
                   else TrainConfig.from_run_config(context.run_config))
        self.cfg = cfg
        self.round = int(config["server-round"]) + int(config.get("round-offset", 0))
        self.is_last = self.round >= self.cfg.rounds
        self.context = context
        node = context.node_config
        self.partition = int(node.get("partition-id", -1))
        self.site = site_name(node, context.node_id)
        self.out_dir = Path(str(node.get("out-dir", self.cfg.out_dir / "clients" / self.site)))
        self.encoder = cached_encoder(self.cfg.arch, self.cfg.pretrained)
        self.methods = self.cfg.method_specs
        self.classes = json.loads(str(config["classes"]))
        self.prompts = cached_prompts(self.cfg.arch, self.cfg.pretrained, tuple(self.classes), self.cfg.n_ctx)
        self.feature_timing: dict[str, float] = {}  # reported once, when the features are computed
        self.features = self._features()
        self.disk = SiteDisk(self.out_dir, self.site, self.cfg, self.classes)
        self.trained_rounds = 0  # rounds of local training the state holds (0: an untrained local prompt)
        self.state = self._state()

    # ---- data -----------------------------------------------------------------------------
    def _plan(self) -> data_mod.ClientPlan:
        node = self.context.node_config
        if "data-path" in node:  # a real SuperNode: its own image folder
            return data_mod.local_plan(str(node["data-path"]), self.classes, self.cfg.seed,
                                       self.cfg.train_fraction, self.cfg.val_fraction)
        return data_mod.DataPlan.read(self.cfg.out_dir / "plan.json").clients[self.partition]

    def _features(self) -> dict[str, Features]:
        if "features" not in self.context.state:
            start = time.perf_counter()
            plan = self._plan()
            arrays = {}
            # a SuperNode's own folder has no shared general set (its "general" is its test split): none
            splits = [s for s in data_mod.SPLITS if s != "general" or plan.general.paths != plan.test.paths]
            for split in splits:
                part = getattr(plan, split)
                images = data_mod.load_split(part, data_mod.style_seed(self.cfg.seed, self.partition, split))
                arrays[f"{split}/x"] = data_mod.encode_images(self.encoder, images)
                arrays[f"{split}/y"] = torch.tensor(part.labels, dtype=torch.int64)
            if len(arrays["train/y"]) == 0:
                raise data_mod.DataError(f"client {self.partition} has no training samples")
            self.context.state["features"] = ArrayRecord(arrays)
            self.feature_timing = {"feature-seconds": time.perf_counter() - start,
                                   "feature-images": sum(len(getattr(plan, s).paths) for s in ("train", "val", "test"))}
        t = self.context.state["features"].to_torch_state_dict()
        return {s: Features(t[f"{s}/x"], t[f"{s}/y"]) for s in data_mod.SPLITS if f"{s}/x" in t}

    # ---- private state --------------------------------------------------------------------
    def _state(self) -> ClientState:
        state = ClientState()
        if "local" in self.context.state:
            state.local = dict(self.context.state["local"].to_torch_state_dict())
            state.theta = {k: float(v) for k, v in self.context.state["theta"].items()}
            self.trained_rounds = int(self.context.state["site"]["trained-rounds"])
        elif saved := self.disk.restore(self.context.run_id, self.cfg.resume):  # a restart, or --resume
            state, self.trained_rounds = saved.state, saved.trained_rounds
        ensure_local(state, self.methods, self.encoder, self.cfg, seed=self.cfg.seed * 1000 + self.partition)
        return state

    def save_state(self, trained: bool = False) -> None:
        self.trained_rounds += int(trained)
        if self.state.local:
            self.context.state["local"] = ArrayRecord({k: v.contiguous() for k, v in self.state.local.items()})
        self.context.state["theta"] = ConfigRecord({k: float(v) for k, v in self.state.theta.items()})
        self.context.state["site"] = ConfigRecord({"trained-rounds": self.trained_rounds})
        # on the site's own disk too, so a restarted site (or an interrupted run) resumes
        self.disk.save(self.state, self.context.run_id, self.round, self.trained_rounds)

    def identity(self) -> ConfigRecord:
        """Who answered (MetricRecords hold numbers only), and the one-off feature timing (kept out
        of the MetricRecord: Flower wants the same metric keys from every reply of a round)."""
        return ConfigRecord({"site": self.site, **self.feature_timing})


def named_failures(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Re-raise any error as one line naming this client (its partition in a simulation, else its
    site name), for the server to record; the run goes on without the client."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as e:  # noqa: BLE001 - every failure must reach the server with its client
            node = context.node_config
            name = int(node["partition-id"]) if "partition-id" in node else site_name(node, context.node_id)
            raise RuntimeError(client_failure(name, e)) from e
    return wrapped


class TestOnlyFailure(RuntimeError):
    """Raised by the test-only failure switch (`test_fail_prob`), never in a real run."""


def fail_for_tests(cfg: TrainConfig, round_no: int, partition: int) -> None:
    """TEST ONLY: fail this round's training with probability cfg.test_fail_prob (seeded per
    seed, round and client), before anything changes, as a crashed site would."""
    if cfg.test_fail_prob and random.Random(f"{cfg.test_fail_seed}/{round_no}/{partition}").random() < cfg.test_fail_prob:
        raise TestOnlyFailure(f"test-only failure switch (test_fail_prob={cfg.test_fail_prob:g}) in round {round_no}")


def train_step(run: ClientRun, msg: Message) -> Message:
    fail_for_tests(run.cfg, run.round, run.partition)
    globals_ = unpack_globals(msg.content["arrays"])
    updated, losses = local_train(run.encoder, run.prompts, run.features["train"], globals_, run.state,
                                  run.methods, run.cfg, seed=run.cfg.seed * 100_003 + run.round * 101 + run.partition)
    run.save_state(trained=True)
    arrays = pack_globals({k: updated[k] for k in globals_})  # the received order (fixedclipping_mod compares)
    metrics = {"num-examples": len(run.features["train"].y), "partition": run.partition,
               "bytes-received": msg.content["arrays"].count_bytes(), "bytes-sent": arrays.count_bytes()}
    metrics.update({f"loss/{k}": v for k, v in losses.items()})
    if run.cfg.audit:  # what this client contributed, on its own disk (the server may see only a masked sum)
        (run.out_dir / "audit").mkdir(parents=True, exist_ok=True)
        audit = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
        audit["num-examples"] = torch.tensor([float(metrics["num-examples"])])
        atomic_write(run.out_dir / "audit" / f"round-{run.round:03d}-sent.safetensors", save(audit))
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "site": run.identity()}),
                   reply_to=msg)


def evaluate_step(run: ClientRun, msg: Message) -> Message:
    globals_ = unpack_globals(msg.content["arrays"])
    splits = {"personal": run.features["test"]}
    if "general" in run.features:  # a site without a shared set reports no general accuracy (not a copy)
        splits["general"] = run.features["general"]
    priors = decode_theta_priors(msg.content["config"].get(THETA_PRIOR_KEY), tuple(run.cfg.theta_grid))
    results = evaluate(run.encoder, run.prompts, splits, run.features["val"], globals_, run.state, run.methods,
                       run.cfg, priors)
    run.save_state()
    metrics: dict[str, float | int] = {"num-examples": len(run.features["test"].y), "partition": run.partition,
                                       "global-checksum": checksum(globals_)}
    for key, row in results.items():
        for name, value in row.items():
            metrics[f"{name}/{key}"] = value
    if run.is_last:
        for m in run.methods:
            if m.key in run.state.local:
                data = prompt_artifact(run.state.local[m.key], "local", run.encoder, run.classes,
                                       theta=results[m.key]["theta"], tenant=run.site, producer=f"train:{m.key}",
                                       trained_with=globals_.get(m.key))
                write_local_artifact(run.out_dir / f"local-{m.key}.safetensors", data, run.site, run.trained_rounds)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "site": run.identity()}), reply_to=msg)


def make_client_app(cfg: TrainConfig | None = None) -> ClientApp:
    """cfg given: simulation (closure); None: read from the message (deployment engine)."""
    app = ClientApp()

    # each mod acts only on the messages of its mode: SecAgg+ stages, a DP clipping norm, legacy FitIns
    @app.train(mods=[secure_when_asked, clipping_when_asked, legacy_bridge])
    @named_failures
    def train(msg: Message, context: Context) -> Message:
        return train_step(ClientRun(msg, context, cfg), msg)

    @app.evaluate()
    @named_failures
    def evaluate_(msg: Message, context: Context) -> Message:
        return evaluate_step(ClientRun(msg, context, cfg), msg)

    return app


app = make_client_app()  # for `flwr run` on the deployment engine
