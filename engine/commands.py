"""Subcommands whose code loads lazily: the CLI adds their arguments without importing what they need.

A `Command` names its help line, a torch-free function adding its arguments (so `--help` works on a
device install) and the "module:function" that runs it, imported only when the command is asked for.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import UserError


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function", called with the parsed arguments; returns what to print
    extra: str = "export"  # the pip extra that installs what `run` imports


def add_overrides_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """`--set KEY.PATH=VALUE`, repeatable: spec overrides (engine.spec.apply_overrides)."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help=help_text
    )


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]` and `--workers N`: a dataset answered on Ray (engine.batch.answerer)."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="answer the rows on Ray (needs [ray]): a cluster's address, e.g. head:6379; without one, "
        "$RAY_ADDRESS or a cluster started here by `ray start`, else a new local Ray",
    )
    parser.add_argument(
        "--workers",
        type=_at_least_one,
        default=2,
        metavar="N",
        help="with --ray: actors, each opening the pipeline once",
    )


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def add_commands(parent: argparse._SubParsersAction, commands: dict[str, Command]) -> None:
    for name, command in commands.items():
        parser = parent.add_parser(
            name,
            help=command.help,
            description=command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(parser)


def run_command(command: Command, args: argparse.Namespace) -> object:
    module_name, function = command.run.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(
            f"this command needs {error.name}: pip install 'sparc-engine[{command.extra}]'"
        ) from error
    return getattr(module, function)(args)
