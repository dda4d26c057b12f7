"""Splitting per-sample work over accelerate processes and gathering the results in order.

``accelerate launch --num_processes K -m sdekit sample ...`` runs the same command in ``K`` processes. Each one
takes a share of the work, and the main process receives everything, in order. The output does not depend on
``K`` because of two rules:

* the ``N`` items (samples to draw, data to score) are cut into **global batches** of ``batch_size`` consecutive
  indices (the last one may be shorter), the same for any ``K``; process ``r`` runs a contiguous run of whole
  batches (:func:`process_batches`). A model therefore always sees the same batch compositions, so batched
  kernels round the same way whatever ``K`` is;
* item ``i`` draws its randomness from its own generator, seeded from ``(seed, i)`` alone
  (:func:`sample_generators`); sdekit's schedulers, diffusers' ``randn_tensor`` and :func:`sdekit.likelihood`
  take such a list, one generator per sample.

:func:`map_batches` runs a function on this process's batches and gathers the results on the main process. A
failure on any process stops every process: the others raise :class:`ShardFailure` naming the process and its
error, instead of waiting forever for a result that will not come.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

__all__ = [
    "ShardFailure",
    "map_batches",
    "process_batches",
    "sample_generators",
    "sample_seed",
    "share_size",
    "split_batches",
]

BatchResult = Mapping[str, torch.Tensor]
"""What the function given to :func:`map_batches` returns for one batch: named tensors, batch first."""


class ShardFailure(RuntimeError):
    """Another process failed; the message names it and repeats its error."""


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def sample_seed(seed: int, index: int) -> int:
    """The 64-bit seed of item ``index``'s generator under the run seed ``seed``.

    Both are mixed by numpy's ``SeedSequence`` (a hash designed for this), so neighbouring indices and seeds give
    unrelated streams, unlike ``seed + index``, where seed 0's item 1 would be seed 1's item 0.
    """
    _check_count("seed", seed, 0)
    _check_count("index", index, 0)
    words = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return int(words[0]) | (int(words[1]) << 32)


def sample_generators(seed: int, indices: Iterable[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One ``torch.Generator`` per item of ``indices``, item ``i``'s seeded with :func:`sample_seed` ``(seed, i)``.

    Pass the list wherever a generator is taken (``scheduler.step``, ``randn_tensor``, :func:`sdekit.likelihood`):
    each sample's draws then depend on its index alone, not on the batch or process it lands in. CPU generators
    (the default) also give the same numbers on every device.
    """
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, i)) for i in indices]


def split_batches(num_items: int, batch_size: int) -> list[range]:
    """The global batches: ``range(0, batch_size)``, ``range(batch_size, 2 batch_size)``, ... covering
    ``range(num_items)``; the last one holds the remainder."""
    _check_count("num_items", num_items, 0)
    _check_count("batch_size", batch_size, 1)
    return [range(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]


def process_batches(num_batches: int, process_index: int, num_processes: int) -> range:
    """The batches process ``process_index`` of ``num_processes`` runs: a contiguous run, the counts differing by
    at most one between processes (``floor(r B / K)`` up to ``floor((r + 1) B / K)``)."""
    _check_count("num_batches", num_batches, 0)
    _check_count("num_processes", num_processes, 1)
    if isinstance(process_index, bool) or not isinstance(process_index, int) or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be an integer in [0, {num_processes}), got {process_index!r}.")
    return range(process_index * num_batches // num_processes, (process_index + 1) * num_batches // num_processes)


def share_size(num_items: int, batch_size: int, process_index: int, num_processes: int) -> int:
    """How many of the ``num_items`` items process ``process_index`` of ``num_processes`` runs (for its progress)."""
    batches = split_batches(num_items, batch_size)
    return sum(len(batches[b]) for b in process_batches(len(batches), process_index, num_processes))


def _concatenate(results: list[BatchResult]) -> dict[str, torch.Tensor]:
    if not results:
        return {}
    keys = list(results[0])
    for result in results:
        if list(result) != keys:
            raise ValueError(f"every batch must return the same names; got {keys} and {list(result)}.")
    return {key: torch.cat([result[key] for result in results]) for key in keys}


def _state() -> Any:
    from accelerate import PartialState

    return PartialState()


def map_batches(
    fn: Callable[[range], BatchResult], num_items: int, batch_size: int, *, state: Any = None
) -> dict[str, torch.Tensor] | None:
    """Run ``fn`` on this process's global batches and gather every batch's result on the main process, in order.

    Args:
        fn: called with each batch (a ``range`` of item indices) of this process, in order; returns named tensors
            with one row per index. They are moved to the CPU before they are sent.
        num_items: the number of items ``N``.
        batch_size: items per global batch (:func:`split_batches`).
        state: the ``accelerate.PartialState`` (anything with ``process_index``, ``num_processes``,
            ``is_main_process``); default ``PartialState()``, which under ``accelerate launch`` is the launched
            process group and otherwise a single process.

    Returns:
        On the main process, each name's tensors of all ``N`` items concatenated in index order (an empty dict if
        ``N = 0``); ``None`` on the other processes.

    Raises:
        ShardFailure: on every process but the one that failed, when ``fn`` raised on another process.
        Exception: on the failing process, what ``fn`` raised.
    """
    state = _state() if state is None else state
    batches = split_batches(num_items, batch_size)
    mine = process_batches(len(batches), state.process_index, state.num_processes)
    results: list[BatchResult] = []
    error: BaseException | None = None
    try:
        for b in mine:
            result = fn(batches[b])
            results.append({key: value.detach().cpu() for key, value in result.items()})
    except Exception as caught:  # shared with the other processes below, then raised again
        error = caught
    if state.num_processes == 1:
        if error is not None:
            raise error
        return _concatenate(results) if state.is_main_process else None

    import torch.distributed as dist

    # Everyone learns whether anyone failed before anyone waits for results.
    report = None if error is None else "".join(traceback.format_exception_only(type(error), error)).strip()
    reports: list[str | None] = [None] * state.num_processes
    dist.all_gather_object(reports, report)
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
    if failed:
        rank, text = failed[0]
        raise ShardFailure(f"process {rank} of {state.num_processes} failed: {text}")
    gathered: list[list[BatchResult]] | None = None
    if state.is_main_process:
        gathered = [[] for _ in range(state.num_processes)]
    dist.gather_object(results, gathered, dst=0)
    if not state.is_main_process:
        return None
    # Processes hold contiguous runs of batches in rank order, so rank order is index order.
    return _concatenate([result for part in gathered for result in part])
