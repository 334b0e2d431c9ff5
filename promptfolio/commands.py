"""Core subcommands: `promptfolio info`."""

from __future__ import annotations

import argparse


def add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="embedded", help="open_clip architecture, or 'embedded' (default)")
    p.add_argument("--pretrained", default="embedded",
                   help="open_clip tag, local checkpoint path, or 'embedded' (default)")


def encoder_from_args(args: argparse.Namespace):
    from promptfolio.encoder import load_encoder, parse_pretrained

    return load_encoder(args.arch, parse_pretrained(args.pretrained))


def _info(args: argparse.Namespace) -> int:
    enc = encoder_from_args(args)
    n_params = sum(p.numel() for p in enc.model.parameters())
    print(f"architecture   {enc.arch}\nweights        {enc.source}\nfingerprint    {enc.fingerprint}\n"
          f"parameters     {n_params / 1e6:.1f} M\ntext width     {enc.text_width}\n"
          f"feature dim    {enc.embed_dim}\nimage size     {enc.image_size}\ncontext length {enc.context_length}")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("info", help="load an encoder and print its fingerprint and shapes")
    add_encoder_args(p)
    p.set_defaults(handler=_info)
