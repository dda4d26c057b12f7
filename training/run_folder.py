"""The trainer's output folder: who owns which file, and when a run may start in it.

The folder is the user's. The trainer claims it with :meth:`RunFolder.claim`, which starts a new run only in a
new or empty folder, continues a run only when resuming it, and starts over in an earlier run's folder or writes
into a folder of other files only with ``--overwrite_output_dir``. Every file the trainer writes is recorded in
the hidden manifest ``.sdekit-run.json`` (:meth:`RunFolder.record`), together with the run's id; the trainer
deletes recorded files only (:meth:`RunFolder.remove`), and refuses to start where it would overwrite a file it
did not write. Hidden staging entries the trainer names itself (``.checkpoint-N.tmp``, ``.pipeline-*``) count as
its own, since a kill can leave them behind before they are recorded.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["MANIFEST", "STAGING_PATTERNS", "OutputFolderError", "RunFolder"]

MANIFEST = ".sdekit-run.json"
"""The manifest's file name inside the output folder (hidden, so never uploaded to the Hub)."""

STAGING_PATTERNS: tuple[str, ...] = (
    r"\.checkpoint-\d+\.tmp",
    r"\.pipeline-[0-9a-f]+\.(tmp|new|old)",
    re.escape(MANIFEST) + r"\.\d+\.tmp",
)
"""Top-level names (regular expressions) of the trainer's own staging entries, which are its own whether or not
they were recorded: ``.checkpoint-<step>.tmp``, ``.pipeline-<hex id>.tmp|new|old`` and the manifest's own."""

_LISTED = 5  # how many paths an error message names


class OutputFolderError(ValueError):
    """The output folder cannot be used as asked; the message says what to pass instead."""


def _listing(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_LISTED])
    return shown + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


class RunFolder:
    """A claimed output folder: the run's id and the files the trainer wrote in it (relative POSIX paths).

    Build it with :meth:`claim`; only the main process holds one.
    """

    def __init__(self, root: Path, run_id: str, files: Iterable[str] = ()) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.files: set[str] = set(files)
        # Files that were in the folder when it was claimed and that the trainer did not write: never recorded
        # (so never deleted), even when they sit in a folder the trainer records whole, such as the logs.
        self.users: set[str] = set()

    # -- claiming -----------------------------------------------------------------------------------------

    @classmethod
    def claim(
        cls,
        root: str | os.PathLike[str],
        *,
        resume: bool,
        overwrite: bool,
        written_names: Sequence[str],
        replaced_names: Sequence[str],
    ) -> RunFolder:
        """Take ``root`` for a run, or raise :class:`OutputFolderError` saying why not and what to pass.

        Args:
            root: the output folder (created if missing).
            resume: the run continues an earlier one (``--resume_from_checkpoint``): allowed in that run's folder,
                and in a new or empty one.
            overwrite: ``--overwrite_output_dir``: start a new run in an earlier run's folder (its recorded files
                are deleted) or in a folder of other files (they are kept).
            written_names: top-level names (glob patterns) the run writes in, e.g. ``logs``, ``checkpoint-*``. In a
                folder that holds no run, a file under one of them stops the claim: the run could write over it.
            replaced_names: those of ``written_names`` that the run replaces whole (``unet``, ``README.md``). A file
                the trainer did not write under one of them always stops the claim. In an earlier run's folder,
                other unrecorded files (a tracker's, after a hard kill) are left where they are.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise OutputFolderError(f"--output_dir {root} is a file; pass a folder.")
        previous = cls._load(root)
        if previous is not None and not previous.files and not resume:
            previous = None  # a run stopped before it wrote anything: nothing of it to keep or resume
        if previous is not None and resume:
            previous._refuse_foreign(replaced_names)
            previous.users = {f for f in previous._files_below(root) if f != MANIFEST and f not in previous.files}
            return previous
        present = sorted(cls._files_below(root)) if root.is_dir() else []
        if previous is not None and not overwrite:
            checkpoints = sorted(p for p in {f.split("/")[0] for f in previous.files} if p.startswith("checkpoint-"))
            found = f" (checkpoints: {', '.join(checkpoints)})" if checkpoints else ""
            raise OutputFolderError(
                f"--output_dir {root} holds an earlier training run{found}. Continue it with "
                "--resume_from_checkpoint latest, start over with --overwrite_output_dir (deletes only the files "
                "the trainer wrote), or choose another --output_dir."
            )
        foreign = [p for p in present if p != MANIFEST and (previous is None or p not in previous.files)]
        if foreign and previous is None and not overwrite:
            what = "a checkpoint of another run" if resume else "files"
            raise OutputFolderError(
                f"--output_dir {root} is not empty and holds no sdekit training run ({_listing(foreign)}); it "
                f"cannot hold {what} of this one. Choose a new or empty folder, or pass --overwrite_output_dir to "
                "train into it anyway (files the trainer did not write are never changed)."
            )
        fresh = cls(root, uuid.uuid4().hex)
        fresh._refuse_foreign(written_names if previous is None else replaced_names, foreign)
        fresh.users = {f for f in foreign if not fresh._is_staging(f)}
        if previous is not None:
            for name in sorted({f.split("/")[0] for f in previous.files}):
                previous.remove(name)
        root.mkdir(parents=True, exist_ok=True)
        fresh.save()
        return fresh

    @classmethod
    def _load(cls, root: Path) -> RunFolder | None:
        path = root / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            return cls(root, str(data["run_id"]), data["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise OutputFolderError(
                f"{path} is damaged ({type(err).__name__}: {err}); remove it to treat every file in "
                f"{root} as the user's, or choose another --output_dir."
            ) from err

    @staticmethod
    def _files_below(path: Path) -> Iterable[str]:
        """Every file (and, ending in ``/``, every empty folder) below ``path``, relative to ``path``."""
        for dirpath, dirnames, filenames in os.walk(path):
            here = Path(dirpath)
            for name in filenames:
                yield (here / name).relative_to(path).as_posix()
            if not dirnames and not filenames and here != path:
                yield here.relative_to(path).as_posix() + "/"

    def _is_staging(self, relative: str) -> bool:
        top = relative.split("/")[0]
        return any(re.fullmatch(pattern, top) for pattern in STAGING_PATTERNS)

    def _refuse_foreign(self, names: Sequence[str], foreign: Sequence[str] | None = None) -> None:
        if foreign is None:
            foreign = [f for f in self._files_below(self.root) if f != MANIFEST and f not in self.files]
        clash = sorted(
            f for f in foreign if not self._is_staging(f) and any(fnmatch.fnmatch(f.split("/")[0], n) for n in names)
        )
        if clash:
            raise OutputFolderError(
                f"--output_dir {self.root}: the run would replace files the trainer did not write "
                f"({_listing(clash)}). Move them out of the folder, or choose another --output_dir."
            )

    def check_no_foreign(self, replaced_names: Sequence[str]) -> None:
        """Raise :class:`OutputFolderError` if a file the trainer did not write sits under ``replaced_names``
        (checked again before the pipeline is written, since the user may have added one meanwhile)."""
        self._refuse_foreign(replaced_names)

    # -- recording and removing ---------------------------------------------------------------------------

    def _relative(self, path: str | os.PathLike[str]) -> str | None:
        """``path`` relative to the folder, or ``None`` if it lies outside (an absolute ``--logging_dir``)."""
        path = Path(path)
        if path.is_relative_to(self.root):  # a path into the folder, spelled as the folder is
            path = path.relative_to(self.root)
        elif path.is_absolute():
            root = Path(os.path.abspath(self.root))
            path = Path(os.path.abspath(path))
            if not path.is_relative_to(root):
                return None
            path = path.relative_to(root)
        # else: a name inside the folder, such as "logs"
        return None if ".." in path.parts else path.as_posix()

    def record(self, *paths: str | os.PathLike[str]) -> None:
        """Record files the trainer has just written: each path is a file, or a folder whose files count as
        written, except those that were there, not the trainer's, when the folder was claimed. Paths outside the
        folder are not its to record. Saves the manifest."""
        for path in paths:
            relative = self._relative(path)
            if relative is None:
                continue
            full = self.root / relative
            if full.is_dir():
                found = (f"{relative}/{f}" for f in self._files_below(full) if not f.endswith("/"))
                self.files.update(f for f in found if f not in self.users)
            elif full.is_file() and relative not in self.users:
                self.files.add(relative)
        self.save()

    def record_staged(self, staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
        """Record the files of the staging folder ``staged`` under the folder ``final`` it is about to be renamed
        to, so that a kill right after the rename leaves nothing unrecorded. Saves the manifest."""
        staged_path = Path(staged)
        relative = self._relative(final)
        if relative is not None:
            self.files.update(f"{relative}/{f}" for f in self._files_below(staged_path) if not f.endswith("/"))
        self.save()

    def remove(self, path: str | os.PathLike[str]) -> list[str]:
        """Delete the recorded files at or below ``path`` and the folders they leave empty; files the trainer did
        not write stay. Returns those that stayed (relative paths). Saves the manifest."""
        relative = self._relative(path)
        if relative is None:
            raise ValueError(f"{path} is outside the output folder {self.root}.")
        full = self.root / relative
        if self._is_staging(relative) and full.is_dir():
            self.files.update(f"{relative}/{f}" for f in self._files_below(full) if not f.endswith("/"))
        mine = sorted(f for f in self.files if f == relative or f.startswith(relative + "/"))
        for name in mine:
            (self.root / name).unlink(missing_ok=True)
            self.files.discard(name)
        kept = [] if not full.is_dir() else [f"{relative}/{f}" for f in self._files_below(full) if not f.endswith("/")]
        if full.is_dir():
            for dirpath, _, _ in sorted(os.walk(full), key=lambda item: -len(item[0])):
                if not any(Path(dirpath).iterdir()):
                    Path(dirpath).rmdir()
        self.save()
        return kept

    def save(self) -> None:
        """Write the manifest atomically (a temporary file renamed over it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f"{MANIFEST}.{os.getpid()}.tmp"
        partial.write_text(json.dumps({"run_id": self.run_id, "files": sorted(self.files)}, indent=0))
        partial.replace(self.root / MANIFEST)
