"""Progress reports for long steps: a tqdm bar on a terminal, a line every few percent elsewhere.

A bar redrawn with carriage returns is unreadable in a CI log or a file, so where the stream is not a terminal
(nor a notebook) :class:`Progress` prints one plain line each time another ``every`` percent is done, and one at
the end. ``SDEKIT_PROGRESS`` overrides the choice: ``bar``, ``lines`` or ``off``.

    from sdekit.progress import Progress

    with Progress(total=600, desc="training", unit="step") as bar:
        for step in range(600):
            bar.update(1, loss=0.1234)

A diffusers pipeline draws its own tqdm bar; :func:`pipeline_progress` routes it through :class:`Progress`:

    with pipeline_progress(pipe, "ddim"):
        images = pipe(num_inference_steps=25).images    # ddim:  40% 10/25 step [...]
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["PipelineProgress", "Progress", "pipeline_progress", "progress_mode"]

T = TypeVar("T")
_MODES = ("bar", "lines", "off")


def progress_mode(stream: TextIO | None = None) -> str:
    """How progress is shown on ``stream`` (default ``sys.stderr``): ``SDEKIT_PROGRESS`` if set, else ``bar`` on a
    terminal or in a notebook and ``lines`` elsewhere."""
    forced = os.environ.get("SDEKIT_PROGRESS", "").strip().lower()
    if forced:
        if forced not in _MODES:
            raise ValueError(f"SDEKIT_PROGRESS must be one of {', '.join(_MODES)}, got {forced!r}.")
        return forced
    stream = sys.stderr if stream is None else stream
    interactive = getattr(stream, "isatty", lambda: False)() or "ipykernel" in sys.modules
    return "bar" if interactive else "lines"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Progress over ``total`` units of work, shown as :func:`progress_mode` says.

    Args:
        total: units of work in all (``None`` if unknown: lines mode then reports only at the end).
        desc: what is being done, e.g. ``"training"``.
        unit: the name of one unit, e.g. ``"step"``; rates are shown per unit.
        initial: units already done (a resumed run); rates and the ETA count only the work done from here.
        every: in lines mode, print a line each time another ``every`` percent is done; default 10.
        stream: where to write; default ``sys.stderr``.
        disable: show nothing.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        unit: str = "it",
        *,
        initial: int = 0,
        every: float = 10.0,
        stream: TextIO | None = None,
        disable: bool = False,
    ) -> None:
        if not 0 < every <= 100:
            raise ValueError(f"every must be a percentage in (0, 100], got {every}.")
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.mode = "off" if disable else progress_mode(self.stream)
        self.postfix: dict[str, Any] = {}
        self._start = time.monotonic()
        self._closed = False
        self._printed_bucket = self._bucket()
        self._printed_n: int | None = None
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=self.stream, dynamic_ncols=True)

    def _bucket(self) -> int:
        if not self.total:
            return 0
        return math.floor(100.0 * min(self.n, self.total) / self.total / self.every)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more units done; ``postfix`` values (a loss, a learning rate) are shown beside the count."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and self._bucket() > self._printed_bucket:
            self._printed_bucket = self._bucket()
            self._print_line()

    def line(self) -> str:
        """The current state as one line: ``desc: 40% 240/600 step [00:52<01:18, 4.6 step/s] loss=0.0312``."""
        elapsed = time.monotonic() - self._start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.total:
            head = f"{100.0 * self.n / self.total:3.0f}% {self.n}/{self.total} {self.unit}"
            eta = _duration((self.total - self.n) / rate) if rate > 0 else "?"
            timing = f"[{_duration(elapsed)}<{eta}, {rate:.3g} {self.unit}/s]"
        else:
            head, timing = f"{self.n} {self.unit}", f"[{_duration(elapsed)}, {rate:.3g} {self.unit}/s]"
        extra = " ".join(f"{k}={_value(v)}" for k, v in self.postfix.items())
        prefix = f"{self.desc}: " if self.desc else ""
        return f"{prefix}{head} {timing}" + (f" {extra}" if extra else "")

    def _print_line(self) -> None:
        self._printed_n = self.n
        print(self.line(), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print ``message`` on its own line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.mode != "off":
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish: close the bar, or print the final line if the last one printed is not it."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._printed_n != self.n:
            self._print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iterate(self, iterable: Iterable[T]) -> Iterator[T]:
        """Yield from ``iterable``, counting one unit per item, and close at the end."""
        try:
            for item in iterable:
                yield item
                self.update(1)
        finally:
            self.close()


class PipelineProgress:
    """A stand-in for a diffusers pipeline's ``progress_bar`` method that reports through :class:`Progress`.

    Pipelines call ``self.progress_bar(iterable)`` and loop over the result (``DDPMPipeline``), or use
    ``with self.progress_bar(total=n) as bar:`` and call ``bar.update()`` (most others); both work here. Each call
    starts a new :class:`Progress` labelled ``desc``.

    Args:
        desc: the label of every line or bar, e.g. the sampler's name.
        unit: the name of one unit; default ``"step"`` (one model call in a pipeline's loop).
        **options: more keyword arguments of :class:`Progress` (``every``, ``stream``, ``disable``).
    """

    def __init__(self, desc: str, unit: str = "step", **options: Any) -> None:
        self.desc, self.unit, self.options = desc, unit, options

    def __call__(self, iterable: Iterable[T] | None = None, total: int | None = None) -> Iterator[T] | Progress:
        """``iterable`` counted one unit per item (``total`` defaults to its length), or a :class:`Progress` of
        ``total`` units to ``update()``; as diffusers' ``progress_bar``, one of the two is required."""
        if iterable is not None:
            size = len(iterable) if hasattr(iterable, "__len__") else total
            return Progress(size, self.desc, self.unit, **self.options).iterate(iterable)
        if total is not None:
            return Progress(total, self.desc, self.unit, **self.options)
        raise ValueError("progress_bar needs an iterable or a total.")


@contextmanager
def pipeline_progress(pipeline: Any, desc: str, unit: str = "step", **options: Any) -> Iterator[PipelineProgress]:
    """Inside the block, ``pipeline``'s progress bars report through :class:`Progress` labelled ``desc``.

    The pipeline's own ``progress_bar`` (and ``set_progress_bar_config``) is back in place after the block, even
    if it raised.

    Args:
        pipeline: a diffusers ``DiffusionPipeline`` (anything whose loop calls ``self.progress_bar``).
        desc, unit, **options: as for :class:`PipelineProgress`.
    """
    own = vars(pipeline).get("progress_bar")
    reporter = PipelineProgress(desc, unit, **options)
    pipeline.progress_bar = reporter
    try:
        yield reporter
    finally:
        if own is None:
            del pipeline.progress_bar
        else:
            pipeline.progress_bar = own
