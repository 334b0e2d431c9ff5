"""A site of the federation: its name, and its private state on its own disk.

On the deployment engine a SuperNode is a site (a clinic, a shop): it is named by its node
config (`site`, or `tenant`), else by its SuperNode id; in a simulation by its partition
(`client-N`). The name goes into its metrics rows, audit entries and local artifacts.

A site's local prompts and θ live in Flower's in-memory `context.state`, which a restarted
SuperNode has lost, so each round they are also written to the site's own folder, keyed by the
federation (encoder, classes, methods, prompt length, the coordinator's output folder) and
recording the run and round. A restarted site picks them up again within the same run (and in
a later run that resumes); a new run that does not resume sets the previous state aside rather
than overwriting it, and an untrained local prompt never replaces a trained artifact.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Mapping

from flwr.common.logger import log
from safetensors.torch import load_file, save

from prompts_store.store import atomic_write
from training.config import TrainConfig
from training.task import ClientState

STATE_FILE, THETA_FILE, PROGRESS_FILE = "state.safetensors", "theta.json", "progress.json"


def site_name(node_config: Mapping[str, object], node_id: int) -> str:
    """`site` (or `tenant`) from the node config; `client-<partition-id>` in a simulation; else
    `node-<SuperNode id>` (stable across restarts only with node authentication: set `site`)."""
    for key in ("site", "tenant"):
        value = str(node_config.get(key, "")).strip()
        if value:
            return value
    if "partition-id" in node_config:
        return f"client-{int(node_config['partition-id'])}"
    return f"node-{node_id}"


def federation_key(cfg: TrainConfig, classes: list[str]) -> str:
    """Short hash of what makes saved local prompts usable again: same encoder, classes, methods,
    prompt length and coordinator output folder (not lr, rounds or other training knobs)."""
    identity = {"arch": cfg.arch, "pretrained": cfg.pretrained, "classes": list(classes), "n_ctx": cfg.n_ctx,
                "methods": sorted(m.key for m in cfg.method_specs), "out_dir": str(cfg.out_dir)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class SavedState:
    state: ClientState
    run_id: int
    round: int  # last round this state was saved in
    trained_rounds: int  # rounds of local training it holds (0: never trained)


class SiteDisk:
    """One site's state folder for one federation: `<site folder>/state/<site>-<federation key>/`
    (the site's name in it too, so two sites given one folder by mistake never share state)."""

    def __init__(self, out_dir: Path, site: str, cfg: TrainConfig, classes: list[str]):
        self.site = site
        safe_name = re.sub(r"[^A-Za-z0-9._-]", "_", site)[:64]
        self.folder = Path(out_dir) / "state" / f"{safe_name}-{federation_key(cfg, classes)}"

    def load(self) -> SavedState | None:
        progress = self.folder / PROGRESS_FILE
        if not progress.is_file():
            return None
        meta = json.loads(progress.read_text())
        theta_path = self.folder / THETA_FILE
        state = ClientState(local=load_file(str(self.folder / STATE_FILE)) if (self.folder / STATE_FILE).is_file() else {},
                            theta=json.loads(theta_path.read_text()) if theta_path.is_file() else {})
        return SavedState(state, int(meta["run_id"]), int(meta["round"]), int(meta.get("trained_rounds", 0)))

    def save(self, state: ClientState, run_id: int, round_no: int, trained_rounds: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if state.local:
            atomic_write(self.folder / STATE_FILE, save({k: v.contiguous() for k, v in state.local.items()}))
        atomic_write(self.folder / THETA_FILE, json.dumps(state.theta).encode())
        atomic_write(self.folder / PROGRESS_FILE, json.dumps(
            {"site": self.site, "run_id": run_id, "round": round_no, "trained_rounds": trained_rounds}).encode())

    def restore(self, run_id: int, resume: bool) -> SavedState | None:
        """The saved state if this run may continue it (same run: a restart; or --resume), else
        None, having set a previous run's state aside (`<key>.previous`) instead of losing it."""
        saved = self.load()
        if saved is None:
            return None
        if saved.run_id == run_id or resume:
            log(INFO, f"site {self.site}: resumed its local state from round {saved.round} "
                      f"({saved.trained_rounds} trained) in {self.folder}")
            return saved
        aside = self.folder.with_name(self.folder.name + ".previous")
        shutil.rmtree(aside, ignore_errors=True)
        self.folder.rename(aside)
        log(WARNING, f"site {self.site}: a new run without resume starts its local prompts afresh; the previous "
                     f"run's state (round {saved.round}, {saved.trained_rounds} trained) is kept in {aside}")
        return None


def write_local_artifact(path: Path, data: bytes, site: str, trained_rounds: int) -> bool:
    """Write a local prompt artifact unless that would replace an existing one with a prompt this
    site never trained (e.g. after losing its state); then keep the old one and say so."""
    if trained_rounds == 0 and path.is_file():
        log(WARNING, f"site {site}: its local prompt was never trained in this run; kept the existing {path} "
                     f"instead of overwriting it with an untrained one")
        return False
    atomic_write(path, data)
    return True

