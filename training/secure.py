"""Secure aggregation of the global prompts with Flower's SecAgg+ (`--secure-aggregation`).

Flower 1.42 ships SecAgg+ only as a legacy workflow: `SecAggPlusWorkflow` drives four message
rounds per training round through a `LegacyContext`, asking a legacy strategy for the round's
instructions (`configure_fit`) and handing it the unmasked result (`aggregate_fit`). Our
message-API strategy keeps sampling, dropout handling, metrics and checkpoints; for one round it
lends the workflow a two-method adapter (`_RoundStrategy`) built from the messages it sampled.

Weighting: SecAgg+ sums. Each client's `secaggplus_mod` multiplies its prompts by
n / max_weight, clips to ±clip_range, quantises to `quant_range` levels and uploads the masked
[n / max_weight, n / max_weight · prompt]; the server unmasks only the sums and divides, which
is num-examples-weighted FedAvg. Neither one client's prompt nor its n is visible to the server.

Clients: `secaggplus_mod` runs only when a message carries SecAgg+ stages, and `legacy_bridge`
turns the workflow's FitIns/FitRes records into our {"arrays", "config"} messages and back (the
reply's `site` record rides in the FitRes metrics, so secure rows name their site too), so one
ClientApp serves both modes (the deployment engine cannot know the mode when it starts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitIns, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.client.mod import secaggplus_mod
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from safetensors.torch import save_file

from training.config import TrainConfig

KEYS_CONFIG = "secagg-array-keys"  # the global prompts' names, in the order of the legacy parameter list
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


@dataclass
class SecureRound:
    """What one secure round gave the server: the weighted mean and each sender's metrics."""

    arrays: ArrayRecord | None
    rows: list[dict]  # the train metrics of the clients whose masked vectors were summed
    failed: int  # sampled clients that dropped out at some stage
    errors: list[tuple[int, str]] = field(default_factory=list)  # (node, error reason) of failed replies
    received: dict[str, torch.Tensor] = field(default_factory=dict)  # everything the server got (audit)


@dataclass(frozen=True)
class _Node:
    node_id: int  # the workflow reads only this attribute of a legacy ClientProxy


class _RoundStrategy:
    """The two legacy Strategy calls SecAggPlusWorkflow makes, for one round of ours."""

    def __init__(self, messages: list[Message], keys: list[str]):
        self.messages, self.keys = messages, keys
        self.parameters = None
        self.rows: list[dict] = []

    def configure_fit(self, server_round, parameters, client_manager):
        out = []
        for m in self.messages:
            arrays = m.content["arrays"]
            config = {**dict(m.content["config"]), KEYS_CONFIG: ",".join(self.keys)}
            out.append((_Node(m.metadata.dst_node_id),
                        FitIns(ndarrays_to_parameters([arrays[k].numpy() for k in self.keys]), config)))
        return out

    def aggregate_fit(self, server_round, results, failures):
        self.rows = [dict(res.metrics, node=proxy.node_id) for proxy, res in results]
        self.parameters = results[0][1].parameters if results else None  # the workflow put the mean in each
        return self.parameters, {}


class _RecordingGrid:
    """The grid, keeping every reply the server receives (for --audit)."""

    def __init__(self, grid: Grid):
        self.grid, self.replies, self.errors = grid, [], []

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(r for r in replies if not r.has_error())
        # an error the SuperLink wrote itself carries its own id: name the addressee instead
        nodes = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        self.errors.extend((nodes.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r.error.reason)
                           for r in replies if r.has_error())
        return replies


def received_arrays(replies: list[Message]) -> dict[str, torch.Tensor]:
    """Every array the server received in a secure round: ArrayRecords and SecAgg+ vectors."""
    out: dict[str, torch.Tensor] = {}
    for i, reply in enumerate(replies):
        node = reply.metadata.src_node_id
        for name, record in reply.content.array_records.items():
            for key, arr in record.items():
                out[f"{i}/{node}/{name}/{key}"] = torch.from_numpy(np.array(arr.numpy()))
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS, {})
        for j, raw in enumerate(configs.get(Key.MASKED_PARAMETERS, [])):
            out[f"{i}/{node}/masked/{j}"] = torch.from_numpy(np.array(bytes_to_ndarray(raw)).astype(np.int64))
    return out


def workflow_for(cfg: TrainConfig) -> SecAggPlusWorkflow:
    return SecAggPlusWorkflow(num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
                              max_weight=cfg.secagg_max_weight, clipping_range=cfg.secagg_clip_range,
                              quantization_range=cfg.secagg_quant_range, timeout=cfg.round_timeout)


def secure_train_round(grid: Grid, messages: list[Message], cfg: TrainConfig, server_round: int) -> SecureRound:
    """Run one training round through SecAgg+ for the sampled `messages` (our train messages)."""
    keys = list(messages[0].content["arrays"].keys())
    strategy = _RoundStrategy(messages, keys)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)  # type: ignore[arg-type] - duck-typed: two methods are used
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = messages[0].content["arrays"]
    recording = _RecordingGrid(grid)
    workflow_for(cfg)(recording, context)  # type: ignore[arg-type]
    arrays = None
    if strategy.parameters is not None:
        means = parameters_to_ndarrays(strategy.parameters)
        arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in zip(keys, means, strict=True)})
    return SecureRound(arrays, strategy.rows, len(messages) - len(strategy.rows), recording.errors,
                       received_arrays(recording.replies) if cfg.audit else {})


def save_received(received: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in received.items()} or {"nothing": torch.zeros(0)}, str(path))


# ---- client side ------------------------------------------------------------------------------
def secure_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's secaggplus_mod, for the messages of a secure round only."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def legacy_bridge(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The workflow's FitIns record -> our train message; our reply -> the FitRes record it expects."""
    if FITINS_ARRAYS not in msg.content.array_records:
        return call_next(msg, context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config[KEYS_CONFIG]).split(",")
    arrays = ArrayRecord({k: Array(v) for k, v in zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True)})
    config = ConfigRecord({k: v for k, v in fitins.config.items() if k != KEYS_CONFIG})
    msg.content = RecordDict({"arrays": arrays, "config": config})  # same metadata: only the records change
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    sent = reply.content["arrays"]
    metrics: MetricRecord = reply.content["metrics"]
    site = reply.content.config_records.get("site", {})  # the site's name travels in the FitRes metrics
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([sent[k].numpy() for k in keys]),
                    int(metrics["num-examples"]), {**dict(metrics), **dict(site)})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

