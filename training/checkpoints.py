"""Training checkpoints: accelerate's ``save_state`` written atomically, rotated, and found again for resuming.

A checkpoint ``checkpoint-<step>`` is first written as ``.checkpoint-<step>.tmp`` and renamed when complete, so a
process killed mid-save leaves the previous checkpoints loadable and only a temporary folder that resuming
ignores (and the next save removes). ``training_state.json`` inside it records where in the data the run was and
the id of the run that wrote it, so ``latest`` never picks another run's checkpoint. Every file is recorded in the
output folder's manifest (:class:`run_folder.RunFolder`), and rotation deletes recorded files only.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from run_folder import RunFolder

__all__ = [
    "TrainingState",
    "checkpoint_run_id",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

_NAME = re.compile(r"^checkpoint-(\d+)$")
_STAGED = re.compile(r"\.checkpoint-\d+\.tmp")
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
    accelerator: Accelerator, folder: RunFolder, state: TrainingState, total_limit: int | None = None
) -> Path:
    """Save the accelerator state (models, optimizer, registered objects, RNGs) as ``checkpoint-<step>``.

    Every process must call this (``folder`` is only written by the main process). The folder appears under its
    final name only when complete; afterwards at most ``total_limit`` checkpoints of this run are kept (the oldest
    are removed).
    """
    root = folder.root
    final = root / f"checkpoint-{state.global_step}"
    temporary = root / f".checkpoint-{state.global_step}.tmp"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.tmp"):
            if _STAGED.fullmatch(stale.name):
                folder.remove(stale)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / _STATE_FILE).write_text(json.dumps({**asdict(state), "run_id": folder.run_id}))
        if final.exists():
            folder.remove(final)
        folder.record_staged(temporary, final)  # recorded before it appears, so a kill leaves nothing unrecorded
        temporary.rename(final)
        if total_limit is not None:
            ours = [p for p in list_checkpoints(root) if checkpoint_run_id(p) == folder.run_id]
            for old in ours[: max(len(ours) - total_limit, 0)]:
                folder.remove(old)
    accelerator.wait_for_everyone()
    return final


def checkpoint_run_id(path: str | Path) -> str | None:
    """The id of the run that wrote the checkpoint at ``path`` (``None`` if it records none)."""
    try:
        return json.loads((Path(path) / _STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def find_checkpoint(folder: RunFolder, resume_from_checkpoint: str) -> Path | None:
    """The checkpoint to resume from: ``latest`` (the newest this run wrote in its folder, ``None`` if there is
    none) or a path (relative paths are tried in the output folder too), which must be a complete checkpoint.

    Raises:
        ValueError: the path is not a complete checkpoint; the message lists this run's checkpoints.
    """
    ours = [p for p in list_checkpoints(folder.root) if checkpoint_run_id(p) == folder.run_id]
    if resume_from_checkpoint == "latest":
        return ours[-1] if ours else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = folder.root / path
    if not (path / _STATE_FILE).is_file():
        names = ", ".join(p.name for p in ours) or "none yet"
        what = "does not exist" if not path.exists() else f"is not a complete checkpoint (no {_STATE_FILE})"
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint}: {path} {what}; pass 'latest' or a checkpoint of "
            f"this run ({names})."
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> TrainingState:
    """Restore the accelerator state saved by :func:`save_checkpoint` and return where the run stood."""
    accelerator.load_state(str(path))
    saved = json.loads((Path(path) / _STATE_FILE).read_text())
    return TrainingState(saved["global_step"], saved["epoch"], saved["batch_in_epoch"])
