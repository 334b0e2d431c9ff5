"""The `promptfolio` command. Each subcommand lives with the component it drives."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

# (module, function adding the subcommand parsers); imported lazily so `--help` stays fast
SUBCOMMAND_MODULES = [
    "promptfolio.commands",
    "promptfolio.client_commands",
    "promptfolio.embedded.commands",
    "service.commands",
    "training.commands",
]


# commands whose module is known: `promptfolio serve ...` builds only that part of the parser, so a
# (re)start does not import the training stack (torch, open_clip) just to parse its arguments
COMMAND_MODULES = {"serve": "service.commands", "tenant": "service.commands",
                   "upload": "promptfolio.client_commands", "classify": "promptfolio.client_commands"}


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default, except where there is none to show (None, off flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        if "key" in action.dest:  # a key taken from the environment must not be printed by --help
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of `promptfolio` and, through `add_subparsers`, of every subcommand: no prefix
    abbreviations (`--client 3` is not `--clients 3`), defaults shown in help, and an unknown
    option reported with the usage of the subcommand it was given to."""

    def __init__(self, *args, root: bool = False, **kwargs):
        self.root = root
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.help is None and action.option_strings and action.default is not None \
                and action.default is not False and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"  # argparse prints nothing at all for an option without help
        return action

    def parse_known_args(self, args=None, namespace=None):
        known, extras = super().parse_known_args(args, namespace)
        # argparse hands a subcommand's leftovers up to the top-level parser, which then prints its
        # own usage; the innermost parser that has leftovers reports them instead
        if extras and not self.root:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return known, extras


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    import importlib

    from promptfolio import __version__

    parser = Parser(
        prog="promptfolio", root=True,
        description="Federated, personalized zero-shot image classification on a frozen CLIP (PromptFolio).",
    )
    parser.add_argument("--version", action="version", version=f"promptfolio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [COMMAND_MODULES[command]] if command in COMMAND_MODULES else SUBCOMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"promptfolio {args.command}: error: {message}", file=sys.stderr)
        return 2


def user_error(e: Exception) -> str | None:
    """One line for an error the user can fix (bad input, unreachable service, ...); None for a bug."""
    # the modules are looked up, not imported: an exception of theirs means they are loaded
    pydantic, client = sys.modules.get("pydantic"), sys.modules.get("promptfolio.client")
    if pydantic is not None and isinstance(e, pydantic.ValidationError):  # multi-line, with a URL per problem
        return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or e.title}: "
                         f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors()[:5])
    if client is not None and isinstance(e, client.PromptFolioError):
        return str(e)
    if isinstance(e, (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)):
        return " ".join(str(e).split("\n")) or type(e).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
