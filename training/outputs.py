"""What a federated run writes and says: progress lines, metrics.json, the checkpoint, artifacts.

Kept apart from the ServerApp so the strategy only aggregates, and so the CLI, plots and the
benchmark read the same files through one module.
"""

from __future__ import annotations

import json
import logging
import sys
from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import ConsoleHandler, log
from safetensors import safe_open
from safetensors.torch import load_file, save

from promptfolio.encoder import Encoder
from prompts_store.store import atomic_write
from training.config import TrainConfig
from training.export import prompt_artifact

CHECKPOINT = "server/checkpoint.safetensors"
METRICS = "metrics.json"


def report(line: str) -> None:
    """Once to the user: Flower's log when it has its console (the deployment engine, what `flwr run
    --stream` shows); else (a simulation keeps Flower's log in a file) the terminal and that log."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(h, ConsoleHandler) for h in flower.handlers):
        print(line, file=sys.stderr, flush=True)
    log(INFO, line)


def quiet_duplicate_log() -> None:
    """Every Flower log line once: open_clip logs through the root logger, which gives it a
    console handler of its own (logging's implicit basicConfig) that Flower's lines then reach
    a second time by propagation, next to Flower's own console handler."""
    logging.getLogger("flwr").propagate = False


def reply_row(reply: Message) -> dict:
    """A reply's metrics with its site's name (and one-off feature timing), which a MetricRecord
    cannot carry; the ClientApp sends them as the `site` ConfigRecord."""
    row = dict(reply.content["metrics"])
    if isinstance(reply.content.get("site"), ConfigRecord):
        row.update(reply.content["site"])
    return row


def method_means(rows: list[dict], metric: str) -> dict[str, float]:
    keys = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith(metric + "/")})
    return {k: float(np.mean([r[f"{metric}/{k}"] for r in rows if f"{metric}/{k}" in r])) for k in keys}


def client_id(row: dict) -> int | str:
    """A metrics row's client: its partition in a simulation, else its site's name."""
    partition = int(row.get("partition", -1))
    return partition if partition >= 0 or "site" not in row else str(row["site"])


def client_name(row: dict) -> str:
    """client_id as text (audit keys `<client>/...`, log lines)."""
    return str(client_id(row))


def row_order(row: dict) -> tuple[int, str]:
    return int(row.get("partition", -1)), str(row.get("site", ""))


def progress_line(record: dict, cfg: TrainConfig) -> str:
    personal = method_means(record["eval"], "personal")
    general = method_means(record["eval"], "general")
    if not general:  # sites with no shared test set (the deployment engine): no generalization score
        return f"round {record['round']}/{cfg.rounds}  personal acc %: " + "  ".join(
            f"{k} {v:.1f}" for k, v in personal.items())
    parts = [f"{k} {personal[k]:.1f}/{general[k]:.1f}" if k in general else f"{k} {personal[k]:.1f}/-"
             for k in personal]
    return f"round {record['round']}/{cfg.rounds}  personal/general acc %: " + "  ".join(parts)


def mean_or_none(values: list[float]) -> float | None:
    """None (null in metrics.json) when no client measured it, never a NaN or a stand-in."""
    return float(np.mean(values)) if values else None


def summarize(cfg: TrainConfig, history: list[dict], failures: list[dict], stopped: str | None = None,
              privacy: dict | None = None) -> dict:
    """metrics.json: the config, every round (who answered, privacy spent), the final means, every
    client failure (the run goes on without the client), why the run stopped early if it did, and
    the (ε, δ) spent over the run with --dp."""
    summary: dict = {"config": json.loads(cfg.to_json()), "rounds": history, "failed_clients": failures,
                     "stopped": stopped}
    privacy = privacy or next((r["privacy"] for r in reversed(history) if "privacy" in r), None)
    if privacy is not None:
        summary["privacy"] = privacy
    if history:
        last = history[-1]["eval"]
        summary["final"] = {
            key: {"personal_mean": float(np.mean([r[f"personal/{key}"] for r in last])),
                  "general_mean": mean_or_none([r[f"general/{key}"] for r in last if f"general/{key}" in r]),
                  "per_client_personal": [r[f"personal/{key}"] for r in last],
                  "per_client_theta": [r[f"theta/{key}"] for r in last]}
            for key in method_means(last, "personal")}
    return summary


def write_metrics(cfg: TrainConfig, history: list[dict], failures: list[dict], stopped: str | None = None,
                  privacy: dict | None = None) -> None:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg.out_dir / METRICS,
                 json.dumps(summarize(cfg, history, failures, stopped, privacy), indent=1).encode())


def write_checkpoint(cfg: TrainConfig, arrays: ArrayRecord, round_no: int, fingerprint: str) -> None:
    path = cfg.out_dir / CHECKPOINT
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()}
    atomic_write(path, save(tensors, metadata={"round": str(round_no), "encoder": fingerprint}))


def load_checkpoint(cfg: TrainConfig, fingerprint: str) -> tuple[int, ArrayRecord | None, list[dict]]:
    """(last completed round, its arrays, the history up to it); (0, None, []) without --resume."""
    path = cfg.out_dir / CHECKPOINT
    if not (cfg.resume and path.is_file()):
        return 0, None, []
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("encoder") != fingerprint:
        raise ValueError(f"cannot resume: the checkpoint in {path} was made for encoder "
                         f"{str(meta.get('encoder'))[:60]}…, not {fingerprint[:60]}…")
    round_no = int(meta["round"])
    history = json.loads((cfg.out_dir / METRICS).read_text())["rounds"]
    history = [h for h in history if h["round"] <= round_no]
    return round_no, ArrayRecord(load_file(str(path))), history


def write_global_artifacts(cfg: TrainConfig, globals_: dict[str, torch.Tensor], encoder: Encoder,
                           classes: list[str]) -> dict[str, Path]:
    paths = {}
    for key, ctx in globals_.items():
        paths[key] = cfg.out_dir / f"global-{key}.safetensors"
        atomic_write(paths[key], prompt_artifact(ctx, "global", encoder, classes, producer=f"train:{key}"))
    return paths


def publish(cfg: TrainConfig, paths: dict[str, Path], encoder: Encoder) -> None:
    """Store the chosen method's global prompt in the prompts store (--publish-store)."""
    from prompts_store.artifact import read_artifact
    from prompts_store.store import PromptStore

    key = cfg.publish_method or next((m.key for m in cfg.method_specs if m.trains_global), None)
    if cfg.publish_store is None or key is None:
        return
    ctx, meta = read_artifact(paths[key].read_bytes())
    stored = PromptStore(cfg.publish_store, encoder.fingerprint, encoder.text_width, create=True).put(ctx, meta)
    report(f"published the {key} global prompt to {cfg.publish_store} as version {stored.version}")


def read_metrics(out_dir: Path) -> dict | None:
    path = Path(out_dir) / METRICS
    return json.loads(path.read_text()) if path.is_file() else None
