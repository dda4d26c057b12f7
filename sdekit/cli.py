"""The ``sdekit`` command.

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a help line, a function that adds its arguments
to its ``argparse`` sub-parser, and a function that runs it and returns the exit status. Adding a subcommand
is adding an entry there.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from . import registry

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One ``sdekit`` subcommand.

    Attributes:
        help: one-line description shown by ``sdekit --help``.
        configure: adds the subcommand's arguments to its parser.
        run: runs the subcommand on the parsed arguments and returns the process exit status.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _configure_plugins(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", choices=sorted(registry.ENTRY_POINT_GROUPS), help="only list plugins of this kind")


def _run_plugins(args: argparse.Namespace) -> int:
    # The table reports every skipped plugin with its reason, so the registry's warnings would only repeat it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", registry.PluginWarning)
        plugins = registry.list_plugins(kind=args.kind)
    if not plugins:
        print(f"No {args.kind or 'sdekit'} plugins are installed.")
        return 0
    header = ("NAME", "KIND", "DISTRIBUTION", "VERSION", "STATUS", "REASON")
    rows = [(p.name, p.kind, p.distribution, p.version, p.status, p.reason or "") for p in plugins]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, row[-1]]).rstrip())
    return 0


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4000, help="samples per sampler (default 4000)")
    parser.add_argument("--sde-steps", type=int, default=500, help="reverse-SDE steps (default 500)")
    parser.add_argument("--ode-steps", type=int, default=100, help="probability-flow Heun steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import print_demo, run_demo

    _run_plugins(argparse.Namespace(kind=None))
    print()
    print_demo(*run_demo(args.samples, args.sde_steps, args.ode_steps, args.seed))
    return 0


COMMANDS: dict[str, Command] = {
    "plugins": Command(
        help="list the installed SDE and sampler plugins and whether each one loads",
        configure=_configure_plugins,
        run=_run_plugins,
    ),
    "demo": Command(
        help="list the plugins, then sample a known 2-d mixture with every built-in SDE through its exact score",
        configure=_configure_demo,
        run=_run_demo,
    ),
}
"""Subcommand name -> :class:`Command`."""


def build_parser() -> argparse.ArgumentParser:
    """The ``sdekit`` argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="sdekit", description="Score-based diffusion samplers and SDEs for diffusers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.configure(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``sdekit`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    Usage errors print argparse's message and return 2; ``--help`` prints help and returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    return COMMANDS[args.command].run(args)
