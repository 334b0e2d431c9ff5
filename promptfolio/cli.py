"""The `promptfolio` command. Each subcommand lives with the component it drives."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# (module, function adding the subcommand parsers); imported lazily so `--help` stays fast
SUBCOMMAND_MODULES = [
    "promptfolio.commands",
    "promptfolio.embedded.commands",
    "service.commands",
    "training.commands",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="promptfolio",
        description="Federated, personalized zero-shot image classification on a frozen CLIP (PromptFolio).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as e:  # user errors: one clear line, no traceback
        print(f"promptfolio {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
