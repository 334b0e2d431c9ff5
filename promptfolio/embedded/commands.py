"""`promptfolio embedded pretrain|eval|export`."""

from __future__ import annotations

import argparse
from pathlib import Path


def _pretrain(args: argparse.Namespace) -> int:
    from promptfolio.embedded import HERE, RECORD_PATH, WEIGHTS_PATH
    from promptfolio.embedded.pretrain import PretrainConfig, pretrain

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the weights file must end in .safetensors")
    record = out.with_name(out.name.removesuffix(".safetensors") + ".record.json")
    # the shipped weights and their record are what every store and artifact was made with
    shipped = {WEIGHTS_PATH.resolve(), RECORD_PATH.resolve()}
    if out.resolve() in shipped or record.resolve() in shipped or out.resolve().parent == HERE:
        raise ValueError(f"--out {out} would overwrite the shipped weights inside the package; write elsewhere "
                         f"(e.g. --out .cache/promptfolio-tiny.safetensors)")
    out.parent.mkdir(parents=True, exist_ok=True)
    pretrain(PretrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed), out, record)
    return 0


def _styles(names: list[str] | None, strength: float | None):
    from promptfolio.embedded import world

    names = names or world.STYLE_NAMES
    return [world.StyleSpec(n, strength) if strength is not None and n != "clean" else world.calibrated(n)
            for n in names]


def _eval(args: argparse.Namespace) -> int:
    from promptfolio.commands import encoder_from_args
    from promptfolio.embedded import evaluate

    enc = encoder_from_args(args)
    rows = evaluate.style_table(enc, _styles(args.style, args.strength), n_eval=args.n)
    print(f"encoder {enc.arch} ({enc.source}); {args.n} images per style, hand prompt "
          f"{evaluate.HAND_TEMPLATE!r}; probe trained on 1500 images of the same style")
    print(evaluate.format_table(rows))
    return 0


def _export(args: argparse.Namespace) -> int:
    from promptfolio.embedded.export import export_imagefolder

    for style in _styles(args.style, args.strength):
        print(export_imagefolder(style, args.n_per_class, args.seed, Path(args.cache_dir)))
    return 0


def add_commands(sub) -> None:
    from promptfolio.commands import add_encoder_args
    from promptfolio.embedded.export import DEFAULT_CACHE
    from promptfolio.embedded.world import STYLE_NAMES

    emb = sub.add_parser("embedded", help="the embedded synthetic world and tiny CLIP")
    esub = emb.add_subparsers(dest="embedded_command", metavar="ACTION", required=True)

    p = esub.add_parser("pretrain", help="reproduce the shipped tiny CLIP (about 10-15 min on 2 cores)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="weights file to write (.safetensors; never the shipped one, "
                                                "which stores and artifacts were made with)")
    p.set_defaults(handler=_pretrain)

    p = esub.add_parser("eval", help="zero-shot and linear-probe accuracy per style")
    add_encoder_args(p)
    p.add_argument("--style", action="append", choices=STYLE_NAMES, help="repeatable; default all")
    p.add_argument("--strength", type=float, help="override the calibrated strength")
    p.add_argument("--n", type=int, default=900, help="evaluation images per style")
    p.set_defaults(handler=_eval)

    p = esub.add_parser("export", help="write the task as ImageFolder trees (cached)")
    p.add_argument("--style", action="append", choices=STYLE_NAMES, help="repeatable; default all")
    p.add_argument("--strength", type=float)
    p.add_argument("--n-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.set_defaults(handler=_export)
