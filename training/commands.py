"""`promptfolio train`: a whole federated simulation on Flower."""

from __future__ import annotations

import argparse
import sys

# CLI flag -> TrainConfig field; unset flags keep the config's own defaults (one source of truth)
FLAGS = {
    "methods": ("methods", str, "comma-separated: zero-shot, local, promptfl, promptfolio (θ=0.4), "
                                "promptfolio-<θ>, promptfolio-auto"),
    "clients": ("num_clients", int, "number of clients (SuperNodes)"),
    "rounds": ("rounds", int, "federated rounds"),
    "fraction-train": ("fraction_train", float, "fraction of clients sampled per round"),
    "local-epochs": ("local_epochs", int, "local epochs per round"),
    "batch-size": ("batch_size", int, "local batch size"),
    "lr": ("lr", float, "SGD learning rate (cosine-decayed within each round)"),
    "clip-norm": ("clip_norm", float, "per-client gradient-norm clip; 0 disables"),
    "n-ctx": ("n_ctx", int, "context tokens (with --ctx-init none)"),
    "ctx-init": ("ctx_init", str, "initial context phrase, or 'none' for N(0, 0.02)"),
    "theta-prior-weight": ("theta_prior_weight", float, "promptfolio-auto: weight, in validation images, of the "
                                                        "federation's pooled θ curve against a client's own"),
    "data": ("data", str, "'embedded' or an ImageFolder path to partition"),
    "images-per-class": ("images_per_class", int, "embedded world size"),
    "beta": ("beta", float, "Dirichlet concentration over labels"),
    "shift": ("shift", str, "own (each client its own style) | shared (all one style) | none"),
    "seed": ("seed", int, "seed for data, partition and training"),
    "out": ("out_dir", str, "output folder"),
    "publish-store": ("publish_store", str, "also store the final global prompt in this prompts store"),
}


def _train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from training.config import TrainConfig
    from training.simulation import main_simulation

    fields = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("ctx_init") == "none":
        fields["ctx_init"] = None
    if fields.get("clip_norm") == 0:
        fields["clip_norm"] = None
    fields.update(arch=args.arch, pretrained=args.pretrained,
                  resume=args.resume, audit=args.audit)
    try:
        cfg = TrainConfig.model_validate(fields)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise ValueError(f"invalid training configuration: {problems}") from None
    return main_simulation(cfg, sys.argv[1:], args.network)


def add_commands(sub) -> None:
    from promptfolio.commands import add_encoder_args
    from training.config import TrainConfig

    p = sub.add_parser("train", help="federated prompt learning on Flower (simulation on this machine)")
    add_encoder_args(p)
    for flag, (field, kind, text) in FLAGS.items():
        default = TrainConfig.model_fields[field].get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"{text} (default: {shown})")
    p.add_argument("--resume", action="store_true", help="continue from the last completed round in --out")
    p.add_argument("--audit", action="store_true", help="keep every client's returned global prompt per round")
    p.add_argument("--network", choices=["isolate", "host"], default="isolate",
                   help="run Ray in a private network namespace (default) or on the host network")
    p.set_defaults(handler=_train)
