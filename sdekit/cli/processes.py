"""The process a command runs in: its accelerate state and device, and progress shown by the main process only."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..progress import Progress
from .base import UsageError

__all__ = ["command_device", "process_state", "share_progress"]


def process_state(device: str | None = None) -> Any:
    """``accelerate.PartialState``: under ``accelerate launch``, this process of the launched group (its index,
    their number, its device); otherwise the only process.

    The processes talk through gloo when they compute on the CPU (``device`` is a CPU, or the machine has no GPU),
    as ``training/train.py`` does, and through the accelerator's backend otherwise.

    Raises:
        UsageError: the launcher started several processes but accelerate does not see them as one group (each
            would then do all the work and write the output).
    """
    from accelerate import PartialState

    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    if device is not None:
        try:
            on_cpu = on_cpu or torch.device(device).type == "cpu"
        except RuntimeError:
            raise UsageError(f"--device {device} is not a device; pass cpu, cuda, cuda:1, mps, ...") from None
    state = PartialState(cpu=on_cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise UsageError(
            f"the launcher started {launched} processes but accelerate sees {state.num_processes} "
            f"({state.distributed_type}); launch with `accelerate launch --num_processes {launched} -m sdekit ...`."
        )
    return state


def command_device(args: argparse.Namespace, state: Any) -> torch.device:
    """``--device`` if given, else the process's accelerate device (its own GPU under ``accelerate launch``)."""
    if args.device is None:
        return torch.device(state.device)
    try:
        return torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device} is not a device; pass cpu, cuda, cuda:1, mps, ...") from None


def share_progress(state: Any, total: int, desc: str, unit: str) -> Progress:
    """A :class:`~sdekit.progress.Progress` over this process's ``total`` units, shown by the main process only;
    with several processes its label says that it counts the main process's share."""
    if state.num_processes > 1:
        desc = f"{desc} (process 0's share of {state.num_processes})"
    return Progress(total, desc, unit, disable=not state.is_main_process)
