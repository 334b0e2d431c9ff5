"""The deployment engine as a site meets it: the run config, a site's identity and its state on disk.

The ClientApp is driven here with real Flower messages and contexts, as a SuperNode drives it
(a site's own image folder, node config, run config); the full SuperLink + SuperNodes run with
TLS and node authentication is scripts/federation-local.sh (README, "Across machines").
"""

import json
import time
import tomllib

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from conftest import REPO
from promptfolio.embedded import world
from promptfolio.embedded.export import export_imagefolder
from prompts_store.artifact import read_artifact
from training.client_app import make_client_app
from training.config import TrainConfig, run_config_defaults, run_config_value
from training.exchange import pack_globals
from training.site import SiteDisk, site_name
from training.task import ClientState

# the deployment's own defaults in pyproject.toml; every other key must equal TrainConfig's
DEPLOYMENT_DEFAULTS = {"methods", "num-clients", "classes", "out-dir"}


def app_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_the_app_config_lists_every_train_config_field_with_its_default():
    listed, defaults = app_config(), run_config_defaults()
    assert set(listed) == set(defaults), "pyproject.toml [tool.flwr.app.config] and TrainConfig disagree"
    assert {k: v for k, v in listed.items() if k not in DEPLOYMENT_DEFAULTS} == \
        {k: v for k, v in defaults.items() if k not in DEPLOYMENT_DEFAULTS}
    cfg = TrainConfig.from_run_config(listed)
    assert cfg.model_dump(exclude={"methods", "num_clients", "classes", "out_dir"}) == \
        TrainConfig().model_dump(exclude={"methods", "num_clients", "classes", "out_dir"})
    assert cfg.classes == world.CLASS_NAMES and cfg.methods == ["promptfolio-auto"]


OVERRIDES = {  # one non-default value per key, as a user types it after --run-config
    "arch": '"promptfolio-tiny"', "pretrained": '""', "methods": '"promptfl,local"', "num-clients": "3",
    "fraction-train": "0.5", "rounds": "3", "local-epochs": "2", "batch-size": "8", "lr": "0.002",
    "momentum": "0.5", "weight-decay": "0.001", "clip-norm": "0", "n-ctx": "8", "ctx-init": '"random"',
    "theta-grid": '"0,0.5,1"', "theta-prior-weight": "5.0", "data": '"/data/x"', "images-per-class": "7",
    "beta": "0.3", "shift": '"shared"', "styles": '"blur,noise"', "shared-style": '"noise"',
    "train-fraction": "0.5", "val-fraction": "0.25", "min-images-per-client": "12", "general-per-class": "2",
    "skip-bad-images": "true", "seed": "7", "classes": '"a,b"', "out-dir": '"runs/x"', "resume": "true",
    "audit": "true", "publish-store": '"store"', "publish-method": '"promptfl"',
    "min-train-nodes": "2", "round-timeout": "30.0", "short-round": '"retry"', "round-retries": "1",
    "secure-aggregation": "true", "secagg-clip-range": "2.0", "secagg-quant-range": "65536",
    "secagg-max-weight": "100.0", "secagg-shares": "0.5", "secagg-threshold": "0.75", "dp": '"client"',
    "dp-clip-norm": "0.5", "dp-noise": "2.0", "dp-delta": "1e-6", "test-fail-prob": "0.1", "test-fail-seed": "3",
}


def test_every_key_can_be_overridden_through_flowers_own_run_config_path():
    """Flower refuses (`Invalid run configuration`) any override of a key the app config lacks."""
    assert set(OVERRIDES) == set(run_config_defaults())
    fused = get_fused_config_from_dir(REPO, parse_config_args([" ".join(f"{k}={v}" for k, v in OVERRIDES.items())]))
    with pytest.raises(ValueError, match="--dp with --secure-aggregation is not supported"):
        TrainConfig.from_run_config(fused)  # Flower took both keys; the two options just don't combine yet
    assert TrainConfig.from_run_config({**fused, "dp": "off"}).secure_aggregation is True
    cfg = TrainConfig.from_run_config({**fused, "secure-aggregation": False})
    changed = {name for name, value in cfg.model_dump().items()
               if run_config_value(value) != run_config_value(TrainConfig.model_fields[name].get_default(
                   call_default_factory=True))}
    assert changed == set(TrainConfig.model_fields) - {"secure_aggregation"}
    assert cfg.pretrained is None and cfg.clip_norm is None and cfg.ctx_init is None and cfg.classes == ["a", "b"]
    with pytest.raises(ValueError, match="not present"):
        get_fused_config_from_dir(REPO, parse_config_args(["no-such-key=1"]))
    with pytest.raises(ValueError, match="needs --ctx-init random"):  # the default phrase has 4 tokens
        TrainConfig.from_run_config({**app_config(), "n-ctx": 8})


def test_a_site_is_named_by_its_node_config_else_its_partition_else_its_node_id():
    assert site_name({"site": "clinic-a", "partition-id": 3}, 99) == "clinic-a"
    assert site_name({"tenant": "acme"}, 99) == "acme"
    assert site_name({"partition-id": 3}, 99) == "client-3"
    assert site_name({"data-path": "/x"}, 15617911036347914025) == "node-15617911036347914025"


def site_folder(tmp_path, seed: int):
    return export_imagefolder(world.calibrated("blur"), n_per_class=3, seed=seed, cache_dir=tmp_path / "data")


def message(kind: str, server_round: int, globals_: dict[str, torch.Tensor], cfg: TrainConfig) -> Message:
    """What the SuperLink delivers to node 7 of run 11 (the ServerApp's config for the round)."""
    config = ConfigRecord({"server-round": server_round, "classes": json.dumps(cfg.classes)})
    meta = Metadata(run_id=11, message_id=f"m-{kind}-{server_round}", src_node_id=1, dst_node_id=7,
                    reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600,
                    message_type=kind)
    return Message(RecordDict({"arrays": pack_globals(globals_), "config": config}), metadata=meta)


def test_a_site_keeps_its_identity_and_state_across_a_restart(tmp_path, embedded_encoder):
    """A SuperNode killed after round 1 and restarted (empty context.state, same run) resumes its
    trained local prompt from its own disk; its replies and artifacts carry its name; it reports no
    general accuracy of its own; an untrained prompt never replaces its artifact."""
    from training.task import initial_context

    run_config = {**app_config(), "rounds": 2, "local-epochs": 1, "methods": "promptfolio-0.4",
                  "out-dir": str(tmp_path / "server")}
    cfg = TrainConfig.from_run_config(run_config)
    node = {"data-path": str(site_folder(tmp_path, 1)), "out-dir": str(tmp_path / "site"), "site": "clinic-a"}
    app = make_client_app()  # as on the deployment engine: config from the run, not a closure
    g = {"promptfolio-0.4": initial_context(embedded_encoder, cfg, seed=0)}

    context = Context(run_id=11, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    reply = app(message("train", 1, g, cfg), context)
    assert not reply.has_error(), reply.error
    assert reply.content["site"]["site"] == "clinic-a" and reply.content["site"]["feature-images"] == 90
    assert set(reply.content["metrics"]) == {"num-examples", "partition", "bytes-received", "bytes-sent",
                                             "loss/promptfolio-0.4"}
    trained = ClientState(local=dict(context.state["local"].to_torch_state_dict()))
    initial = initial_context(embedded_encoder, cfg, seed=0)
    assert not torch.equal(trained.local["promptfolio-0.4"], initial)

    restarted = Context(run_id=11, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    reply = app(message("evaluate", 2, g, cfg), restarted)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert "personal/promptfolio-0.4" in metrics and not any(k.startswith("general/") for k in metrics)
    artifact = tmp_path / "site" / "local-promptfolio-0.4.safetensors"
    ctx, meta = read_artifact(artifact.read_bytes(), embedded_encoder.fingerprint)
    assert meta.tenant == "clinic-a"
    assert torch.equal(ctx, trained.local["promptfolio-0.4"])  # the round-1 prompt, not a fresh one

    # a new run that does not resume: starts afresh, sets the old state aside, keeps the artifact
    before = artifact.read_bytes()
    fresh = Context(run_id=12, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    reply = app(message("evaluate", 2, g, cfg), fresh)
    assert not reply.has_error(), reply.error
    assert artifact.read_bytes() == before
    aside = list((tmp_path / "site" / "state").glob("*.previous"))
    assert len(aside) == 1 and torch.equal(_load(aside[0])["promptfolio-0.4"], trained.local["promptfolio-0.4"])


def _load(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "state.safetensors"))


def test_site_state_resumes_in_the_same_run_or_with_resume_only(tmp_path):
    cfg = TrainConfig(classes=["a", "b"])
    disk = SiteDisk(tmp_path, "clinic-a", cfg, cfg.classes)
    state = ClientState(local={"promptfolio-0.4": torch.ones(4, 8)}, theta={"promptfolio-auto": 0.5})
    disk.save(state, run_id=1, round_no=3, trained_rounds=3)
    saved = disk.restore(run_id=1, resume=False)
    assert saved.round == 3 and saved.trained_rounds == 3 and saved.state.theta == {"promptfolio-auto": 0.5}
    assert disk.restore(run_id=2, resume=True).round == 3  # a later run that resumes
    other = SiteDisk(tmp_path, "clinic-a", TrainConfig(classes=["a", "b"], n_ctx=8, ctx_init=None), ["a", "b"])
    assert other.folder != disk.folder and other.restore(run_id=1, resume=True) is None  # another federation
    assert SiteDisk(tmp_path, "clinic-b", cfg, cfg.classes).restore(run_id=1, resume=True) is None  # another site
    assert disk.restore(run_id=2, resume=False) is None
    assert not disk.folder.exists() and (disk.folder.parent / f"{disk.folder.name}.previous").is_dir()


def test_each_log_line_once_and_no_stand_in_general_score():
    """open_clip logs through the root logger, which then gets a console handler of its own (the
    implicit basicConfig), and every Flower line reached the terminal twice: through Flower's own
    console handler and again through the root's. A site without a shared test set has no general
    score (null), not a copy of its personal one."""
    import logging

    from flwr.common.logger import ConsoleHandler, log

    from training.outputs import progress_line, quiet_duplicate_log, summarize

    class Seen(logging.Handler):  # stands for the root console handler open_clip's logging.info() installs
        lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    root_console = Seen()
    logging.root.addHandler(root_console)
    flower = logging.getLogger("flwr")
    propagate = flower.propagate
    try:
        flower.propagate = True
        log(logging.INFO, "marker-before")
        quiet_duplicate_log()
        log(logging.INFO, "marker-after")
    finally:
        logging.root.removeHandler(root_console)
        flower.propagate = propagate
    assert "marker-before" in Seen.lines and "marker-after" not in Seen.lines
    assert sum(isinstance(h, ConsoleHandler) for h in flower.handlers) == 1  # Flower's own: once

    rows = [{"partition": -1, "site": s, "personal/promptfolio-auto": p, "theta/promptfolio-auto": 0.5}
            for s, p in (("site-a", 60.0), ("site-b", 50.0))]
    cfg = TrainConfig(rounds=2)
    final = summarize(cfg, [{"round": 2, "eval": rows}], [])["final"]["promptfolio-auto"]
    assert final["personal_mean"] == 55.0 and final["general_mean"] is None
    assert progress_line({"round": 2, "eval": rows}, cfg) == "round 2/2  personal acc %: promptfolio-auto 55.0"


def test_a_vanished_supernode_is_named_by_its_site_not_the_superlink():
    """A killed SuperNode's reply is an error the SuperLink writes itself (src: the SuperLink's own
    id); the failure is recorded for the node the instruction went to, named as it last answered."""
    from flwr.app import Error
    from flwr.app.message.message import make_message

    from training.server_app import PortfolioFedAvg

    strategy = PortfolioFedAvg(TrainConfig(classes=["a", "b"]), "fingerprint", 0, [], 1)
    sent = message("train", 2, {}, TrainConfig(classes=["a", "b"]))
    strategy._remember([{"partition": -1, "site": "clinic-a", "node": 7}])
    strategy.outgoing = [sent]
    meta = Metadata(run_id=11, message_id="", src_node_id=1, dst_node_id=1, reply_to_message_id=sent.metadata.message_id,
                    group_id="2", created_at=time.time(), ttl=3600, message_type="train")  # as the SuperLink writes it
    reply = make_message(meta, error=Error(code=5, reason="Error: Node Unavailable"))
    assert strategy._answered(2, [reply], "train") == []
    assert strategy.failures == [{"round": 2, "stage": "train", "client": "clinic-a", "node": 7,
                                  "error": "Error: Node Unavailable"}]
