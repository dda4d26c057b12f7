"""What every ``sdekit`` subcommand is made of: the :class:`Command` record, :class:`UsageError`, and the options
commands share (the model, the run, the output), so that a new command declares them in a few lines."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Command",
    "UsageError",
    "add_data_options",
    "add_model_options",
    "add_output_options",
    "add_run_options",
    "is_main_process",
    "json_object",
    "json_value",
    "key_value",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


class UsageError(ValueError):
    """A mistake in the command line or its inputs; the message says what to change. ``sdekit`` prints it as one
    line, ``sdekit: error: <message>``, and exits with status 2."""


@dataclass(frozen=True)
class Command:
    """One ``sdekit`` subcommand.

    Attributes:
        help: one-line description shown by ``sdekit --help``.
        configure: adds the subcommand's arguments to its parser.
        run: runs the subcommand on the parsed arguments and returns the process exit status.
        example: a command line shown at the end of the subcommand's ``--help``.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    example: str = ""


def is_main_process() -> bool:
    """Whether this is the main process of an ``accelerate launch`` run (or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def _int_at_least(text: str, lowest: int) -> int:
    """``text`` as an integer >= ``lowest``, or the ``argparse`` error that says so."""
    try:
        value = int(text)
    except ValueError:
        value = lowest - 1
    if value < lowest:
        raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """An ``argparse`` type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def json_value(text: str) -> Any:
    """``text`` read as JSON (a number, ``true``, a list, an object), or as the plain string if it is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def json_object(text: str) -> dict[str, Any]:
    """An ``argparse`` type: a JSON object such as ``'{"beta_min": 0.1, "beta_max": 20}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"beta_max\": 20}}' ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"beta_max\": 20}}', got {text!r}")
    return value


def key_value(text: str) -> tuple[str, Any]:
    """An ``argparse`` type: ``KEY=VALUE``, the value read by :func:`json_value`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as eta=1.0, got {text!r}")
    return key.strip(), json_value(value)


def add_model_options(parser: argparse.ArgumentParser, *, sampler: bool) -> None:
    """``--model`` and the options that describe how to run it: ``--sampler`` and ``--option`` (if ``sampler``),
    the SDE overrides ``--sde``, ``--sde-params``, ``--prediction-type``, ``--time-input``, and ``--device``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a folder saved by save_pretrained or by training/train.py, or a Hub model id in the local cache",
    )
    if sampler:
        group.add_argument("--sampler", required=True, metavar="NAME", help="the sampler plugin (see sdekit plugins)")
        group.add_argument(
            "--option",
            type=key_value,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a setting of the sampler, e.g. eta=1.0 or corrector=langevin (repeatable; values are JSON)",
        )
    sde = parser.add_argument_group(
        "SDE (needed for a model folder without a scheduler; otherwise they override the saved scheduler's)"
    )
    sde.add_argument("--sde", metavar="NAME", help="the SDE the model was trained with: vp, subvp, ve or a plugin")
    sde.add_argument(
        "--sde-params", type=json_object, metavar="JSON", help="""its parameters, e.g. '{"beta_max": 20}'"""
    )
    sde.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample", "score"),
        help="what the model predicts (default for a folder without a scheduler: epsilon)",
    )
    sde.add_argument(
        "--time-input",
        choices=("ddpm", "sigma", "continuous"),
        help="the model's timestep units (default: the SDE's own)",
    )
    group.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda, cuda:1, ...; default: the process's accelerate device (its own GPU under accelerate launch)",
    )


def add_data_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """The ``data`` group: ``--data`` (required), ``--split`` (default ``test``) and ``--num-samples N``, whose help
    says the command will ``verb`` the first N items."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        metavar="DIR_OR_DATASET",
        help="an image folder, an .npz written by sdekit sample, a save_to_disk folder or a cached Hub dataset",
    )
    data.add_argument("--split", default="test", help="the split of a dataset (default test)")
    data.add_argument("--num-samples", type=positive_int, metavar="N", help=f"{verb} the first N items (default all)")


def add_run_options(parser: argparse.ArgumentParser, *, batch_size: int, seed: bool = True) -> None:
    """``--batch-size`` (default ``batch_size``) and, with ``seed``, ``--seed`` (default 0)."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=batch_size,
        metavar="B",
        help=f"samples per model call (default {batch_size}); results do not depend on how they are split "
        "over processes",
    )
    if seed:
        parser.add_argument(
            "--seed",
            type=non_negative_int,
            default=0,
            help="sample i draws its noise from a generator seeded with (seed, i) (default 0)",
        )


def add_output_options(
    parser: argparse.ArgumentParser, suffixes: Sequence[str], what: str, *, required: bool = True
) -> None:
    """``--out PATH`` (one of ``suffixes``, described by ``what``) and ``--overwrite``."""
    parser.add_argument(
        "--out",
        required=required,
        metavar="PATH",
        help=f"{what} ({', '.join(suffixes)}); an existing file is refused unless --overwrite",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
