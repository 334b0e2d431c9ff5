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
    "n-ctx": ("n_ctx", int, "context tokens (other than 4 with --ctx-init random)"),
    "ctx-init": ("ctx_init", str, "initial context phrase, or 'random' for N(0, 0.02)"),
    "theta-prior-weight": ("theta_prior_weight", float, "promptfolio-auto: weight, in validation images, of the "
                                                        "federation's pooled θ curve against a client's own"),
    "data": ("data", str, "'embedded' or your image folder (one sub-folder per class) to partition"),
    "images-per-class": ("images_per_class", int, "embedded world size"),
    "beta": ("beta", float, "Dirichlet concentration over labels"),
    "shift": ("shift", str, "synthetic styles: own (each client its own) | shared (all one) | none; "
                            "unset: own in the embedded world, none for --data FOLDER"),
    "train-fraction": ("train_fraction", float, "share of each client's images for training"),
    "val-fraction": ("val_fraction", float, "share for validation (θ choice); the rest is the test split"),
    "seed": ("seed", int, "seed for data, partition and training"),
    "out": ("out_dir", str, "output folder"),
    "publish-store": ("publish_store", str, "also store the final global prompt in this prompts store"),
    # dropout and stragglers, secure aggregation, differential privacy (README "Training options")
    "min-train-nodes": ("min_train_nodes", int, "replies a training round needs to aggregate"),
    "round-timeout": ("round_timeout", float, "seconds the server waits for a round's replies"),
    "short-round": ("short_round", str, "a round with fewer replies than --min-train-nodes: skip (keep the last "
                                        "global prompt) | retry"),
    "round-retries": ("round_retries", int, "--short-round retry: attempts before the run stops"),
    "secagg-clip-range": ("secagg_clip_range", float, "SecAgg+: prompt values (times n / max weight) are clipped "
                                                      "to ±this before quantisation"),
    "secagg-max-weight": ("secagg_max_weight", float, "SecAgg+: the largest num-examples a client may have"),
    "dp": ("dp", str, "central differential privacy on the global prompts: off | server | client (where the "
                      "updates are clipped)"),
    "dp-clip-norm": ("dp_clip_norm", float, "--dp: L2 bound of a client's update to the global prompts per round"),
    "dp-noise": ("dp_noise", float, "--dp: noise multiplier σ (noise std = σ · clip norm / sampled clients)"),
    "dp-delta": ("dp_delta", float, "--dp: δ at which ε is reported"),
}
# TEST ONLY: a client fails its training at random (hidden from --help)
TEST_FLAGS = {"test-fail-prob": ("test_fail_prob", float), "test-fail-seed": ("test_fail_seed", int)}


def _train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from training.config import OFFICIAL_RECIPE, TrainConfig, invalid_config_message
    from training.simulation import main_simulation

    fields = {field: getattr(args, flag.replace("-", "_")) for flag, (field, _, _) in FLAGS.items()}
    fields.update({field: getattr(args, flag.replace("-", "_")) for flag, (field, _) in TEST_FLAGS.items()})
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields.get("clip_norm") == 0:
        fields["clip_norm"] = None
    if args.recipe == "official":  # the official values first; explicit flags still win
        fields = {**OFFICIAL_RECIPE, **fields}
    fields.update(arch=args.arch, pretrained=args.pretrained, resume=args.resume, audit=args.audit,
                  skip_bad_images=args.skip_bad_images, secure_aggregation=args.secure_aggregation)
    try:
        cfg = TrainConfig.model_validate(fields)
    except ValidationError as e:
        raise ValueError(invalid_config_message(e)) from None
    return main_simulation(cfg, sys.argv[1:], args.network)


def _personalize(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from training.personalize import fetch_global, personalize, upload_local

    key = os.environ.get("PROMPTFOLIO_KEY")
    source = args.global_prompt
    if source.startswith(("http://", "https://")):
        if not key:
            raise ValueError("fetching the global prompt from the service needs a tenant key in PROMPTFOLIO_KEY")
        source = fetch_global(source, key)
    elif not Path(source).is_file():
        raise FileNotFoundError(f"no such global prompt artifact: {source}")
    if args.upload and not (args.tenant and key):
        raise ValueError("--upload needs --tenant ID and the tenant's key in PROMPTFOLIO_KEY")
    result = personalize(source, args.data, args.out, tenant=args.tenant or "local", arch=args.arch,
                         pretrained=args.pretrained, epochs=args.epochs, seed=args.seed,
                         skip_bad_images=args.skip_bad_images)
    version = f"v{result.global_version}" if result.global_version else "unversioned"
    print(f"held-out test ({result.n_test} images): global prompt alone {result.accuracy_global:.1f}% -> "
          f"personalized (θ={result.theta:g}) {result.accuracy_personalized:.1f}%")
    print(f"wrote {result.out} (trained with global prompt {version}, sha256 {result.global_sha256[:12]}…)")
    if args.upload:
        answer = upload_local(args.upload, args.tenant, key, result.out.read_bytes())
        print(f"uploaded to {args.upload} as tenant {args.tenant}'s local prompt version {answer['version']}")
    return 0


def add_commands(sub) -> None:
    from promptfolio.commands import add_encoder_args
    from training.config import TrainConfig

    p = sub.add_parser("train", help="federated prompt learning on Flower (simulation on this machine)")
    add_encoder_args(p)
    for flag, (field, kind, text) in FLAGS.items():
        default = TrainConfig.model_fields[field].get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        p.add_argument(f"--{flag}", type=kind, default=None, help=f"{text} (default: {shown})")
    p.add_argument("--recipe", choices=["ours", "official"], default="ours",
                   help="official: the PromptFolio paper's settings where ours differ (8 random context tokens, "
                        "lr 0.002, no clipping, β 0.3; README lists every difference)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out (counted in the data summary) instead of refusing the folder")
    p.add_argument("--resume", action="store_true", help="continue from the last completed round in --out")
    p.add_argument("--audit", action="store_true", help="keep every client's returned global prompt per round "
                                                        "(with --secure-aggregation: everything the server received)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="aggregate the global prompts with SecAgg+: the server sees only the weighted sum")
    for flag, (_, kind) in TEST_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, default=None, help=argparse.SUPPRESS)
    p.add_argument("--network", choices=["isolate", "host"], default="isolate",
                   help="run Ray in a private network namespace (default) or on the host network")
    p.set_defaults(handler=_train)

    p = sub.add_parser("personalize", help="late joiner: train a local prompt on your images against a "
                                           "published global prompt (which stays frozen)")
    add_encoder_args(p)
    p.add_argument("--global", dest="global_prompt", required=True,
                   help="global prompt artifact (.safetensors), or the service's URL to fetch it with "
                        "the tenant key in PROMPTFOLIO_KEY")
    p.add_argument("--data", required=True, help="your image folder: one sub-folder of images per class")
    p.add_argument("--out", required=True, help="the local prompt artifact to write (.safetensors)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs over the train split (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split and training")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out instead of refusing")
    p.add_argument("--tenant", help="tenant id recorded in the artifact (and uploaded to with --upload)")
    p.add_argument("--upload", metavar="URL", help="upload the result to the service as the tenant's local prompt "
                                                   "(key from PROMPTFOLIO_KEY)")
    p.set_defaults(handler=_personalize)
