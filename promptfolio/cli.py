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


# commands whose module is known: `promptfolio serve ...` builds only that part of the parser, so a
# (re)start does not import the training stack (torch, open_clip) just to parse its arguments
COMMAND_MODULES = {"serve": "service.commands", "tenant": "service.commands", "upload": "service.commands"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="promptfolio",
        description="Federated, personalized zero-shot image classification on a frozen CLIP (PromptFolio).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [COMMAND_MODULES[command]] if command in COMMAND_MODULES else SUBCOMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] not in ("-h", "--help") else None)
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
