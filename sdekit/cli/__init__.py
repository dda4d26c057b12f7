"""The ``sdekit`` command (also ``python -m sdekit`` and ``accelerate launch -m sdekit``).

Each subcommand is a :class:`Command` in :data:`COMMANDS`: a help line, a function that adds its arguments to its
``argparse`` sub-parser, a function that runs it and returns the exit status, and an example for its ``--help``.
Adding a subcommand is adding an entry there; the options that commands share (``--model``, ``--sampler``, the SDE
overrides, ``--seed``, ``--batch-size``, ``--out``, ``--overwrite``) come from :mod:`sdekit.cli.base`, model
loading from :mod:`sdekit.cli.models`, data and output files from :mod:`sdekit.cli.files`, and splitting the work
over processes from :mod:`sdekit.sharding`.

A mistake (a :class:`UsageError`, or a ``ValueError`` from sdekit saying what to change) ends in one line,
``sdekit: error: <message>``, with exit status 2 and no traceback; ``SDEKIT_DEBUG=1`` shows the traceback instead.
Ctrl-C exits with status 130 and leaves no partial output.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..registry import PluginError
from ..sharding import ShardFailure
from . import controllable, encoding, likelihood, plugins, sample
from .base import Command, UsageError, is_main_process

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main"]


COMMANDS: dict[str, Command] = {
    "sample": Command(sample.HELP, sample.configure, sample.run, sample.EXAMPLE),
    "likelihood": Command(likelihood.HELP, likelihood.configure, likelihood.run, likelihood.EXAMPLE),
    "encode": Command(encoding.ENCODE_HELP, encoding.configure_encode, encoding.run_encode, encoding.ENCODE_EXAMPLE),
    "decode": Command(encoding.DECODE_HELP, encoding.configure_decode, encoding.run_decode, encoding.DECODE_EXAMPLE),
    "inpaint": Command(
        controllable.INPAINT_HELP,
        controllable.configure_inpaint,
        controllable.run_inpaint,
        controllable.INPAINT_EXAMPLE,
    ),
    "colorize": Command(
        controllable.COLORIZE_HELP,
        controllable.configure_colorize,
        controllable.run_colorize,
        controllable.COLORIZE_EXAMPLE,
    ),
    "plugins": Command(plugins.PLUGINS_HELP, plugins.configure_plugins, plugins.run_plugins, plugins.PLUGINS_EXAMPLE),
    "demo": Command(plugins.DEMO_HELP, plugins.configure_demo, plugins.run_demo, plugins.DEMO_EXAMPLE),
}
"""Subcommand name -> :class:`Command`."""

_REPORTED = (UsageError, ValueError, PluginError, ShardFailure, FloatingPointError, OSError)
"""Errors shown as one line: mistakes in the input, a model that returns NaN, a file that cannot be written."""


def build_parser() -> argparse.ArgumentParser:
    """The ``sdekit`` argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="sdekit",
        description="Score-based diffusion samplers and SDEs for diffusers.",
        epilog="Run `sdekit COMMAND --help` for a command's options and an example. Under `accelerate launch "
        "--num_processes K -m sdekit COMMAND ...` the work is split over K processes with the same result.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=command.help.replace("%", "%%"),  # argparse %-formats help texts
            description=command.help,
            epilog=f"example:\n  {command.example}" if command.example else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.configure(sub)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``sdekit`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    0: done; 2: a usage error (argparse's message) or a mistake in the input (``sdekit: error: ...``, printed by
    the main process only); 130: interrupted. ``--help`` prints help and returns 0.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:
        return 0 if exc.code is None else int(exc.code)
    debug = os.environ.get("SDEKIT_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        if is_main_process():
            print(f"sdekit {args.command}: interrupted; nothing was written.", file=sys.stderr, flush=True)
        return 130
    except _REPORTED as err:
        if debug:
            raise
        if is_main_process():
            print(f"sdekit: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroy the process group an ``accelerate launch`` run joined, so that a process whose peer has already
    exited (after an error) shuts down cleanly instead of aborting in the communication backend's threads."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
