"""Training checkpoints: accelerate's ``save_state`` written atomically, rotated, and found again for resuming.

A checkpoint ``checkpoint-<step>`` is first written as ``.checkpoint-<step>.tmp`` and renamed when complete, so a
process killed mid-save leaves the previous checkpoints loadable and only a temporary folder that resuming
ignores (and the next save removes). ``training_state.json`` inside it records where in the data the run was.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

__all__ = ["TrainingState", "find_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STATE_FILE = "training_state.json"


@dataclass(frozen=True)
class TrainingState:
    """Where a run stands: optimizer steps done, and the epoch and batch index the next step starts at."""

    global_step: int
    epoch: int
    batch_in_epoch: int


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | Path, state: TrainingState, total_limit: int | None = None
) -> Path:
    """Save the accelerator state (models, optimizer, registered objects, RNGs) as ``checkpoint-<step>``.

    Every process must call this. The folder appears under its final name only when complete; afterwards at
    most ``total_limit`` checkpoints are kept (the oldest are removed).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    temporary = root / f".checkpoint-{state.global_step}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / _STATE_FILE).write_text(json.dumps(asdict(state)))
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        if total_limit is not None:
            for old in list_checkpoints(root)[: max(len(list_checkpoints(root)) - total_limit, 0)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: ``latest`` (the newest in ``output_dir``, ``None`` if there is none) or a
    path, which must be a complete checkpoint."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not (path / _STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r}: {path} is not a complete checkpoint (no "
            f"{_STATE_FILE}); pass 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]}."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> TrainingState:
    """Restore the accelerator state saved by :func:`save_checkpoint` and return where the run stood."""
    accelerator.load_state(str(path))
    return TrainingState(**json.loads((Path(path) / _STATE_FILE).read_text()))
