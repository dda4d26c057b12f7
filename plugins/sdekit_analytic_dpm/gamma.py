"""``Gamma_n = E ||eps_theta(x_n, n)||^2 / d``: its Monte Carlo estimate and its validation.

Bao et al., ICLR 2022, section 3: the optimal reverse variance depends on the data only through the mean square
of the score at each level, ``E ||grad log q_n(x_n)||^2 = Gamma_n d / bbar_n``, estimated once per model with
``x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps`` over data ``x_0`` and noise ``eps``. For the exact noise predictor
``Gamma_n = 1 - abar_n / bbar_n E tr Cov(x_0 | x_n) / d`` lies in ``[0, 1]``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["check_gamma", "format_levels", "x0_batches"]


def format_levels(levels: Iterable[int], limit: int = 12) -> str:
    """Integer levels as compact ranges, e.g. ``0-3, 17, 900-999`` (at most ``limit`` ranges, then ``...``)."""
    runs: list[list[int]] = []
    for level in sorted(set(levels)):
        if runs and level == runs[-1][1] + 1:
            runs[-1][1] = level
        else:
            runs.append([level, level])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(text) + (", ..." if len(runs) > limit else "")


def check_gamma(
    gamma: Sequence[float | None] | torch.Tensor, num_levels: int, stacklevel: int = 2
) -> list[float | None]:
    """``gamma`` as a list of ``num_levels`` floats in ``[0, 1]`` (``None`` where unknown).

    A list of the wrong length is cut to ``num_levels`` or padded with ``None``; values outside ``[0, 1]`` are
    clipped. Both warn (``stacklevel`` is passed to :func:`warnings.warn`), naming the
    timesteps concerned. NaN or infinite values raise ``ValueError``.
    """
    if torch.is_tensor(gamma):
        gamma = gamma.detach().to("cpu", torch.float64).flatten().tolist()
    elif hasattr(gamma, "tolist"):  # numpy arrays
        gamma = gamma.tolist()
    if isinstance(gamma, (str, bytes)) or not isinstance(gamma, Sequence):
        raise ValueError(f"gamma must be a list of numbers (None where not estimated), got {type(gamma).__name__}.")
    values: list[float | None] = []
    for level, value in enumerate(gamma):
        if value is None:
            values.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"gamma[{level}] = {value!r}; every entry must be a finite number or None.")
        values.append(float(value))
    if len(values) != num_levels:
        if len(values) > num_levels:
            detail = f"the values for timesteps {format_levels(range(num_levels, len(values)))} are dropped"
        else:
            detail = (
                f"timesteps {format_levels(range(len(values), num_levels))} have none (estimate them with "
                f"estimate_gamma(..., timesteps=[...]))"
            )
        warnings.warn(f"gamma has {len(values)} values for {num_levels} timesteps; {detail}.", stacklevel=stacklevel)
        values = (values + [None] * num_levels)[:num_levels]
    outside = [level for level, value in enumerate(values) if value is not None and not 0.0 <= value <= 1.0]
    if outside:
        extent = [values[level] for level in outside]
        warnings.warn(
            f"Gamma = E||eps_theta||^2 / d lies in [0, 1] for an exact noise predictor, but it is outside at "
            f"timesteps {format_levels(outside)} (from {min(extent):.4g} to {max(extent):.4g}); clipping to [0, 1]. "
            "Small excursions are Monte Carlo error (a larger num_samples reduces it); large ones mean the model "
            "mispredicts the noise there.",
            stacklevel=stacklevel,
        )
        values = [None if value is None else min(max(value, 0.0), 1.0) for value in values]
    return values


def _to_tensor(batch: Any, column: str | None) -> torch.Tensor:
    """One batch of ``x_0``: a tensor or array; a dict (a ``datasets`` batch: ``column``, or its only column); or
    a tuple / list ``(x_0, labels, ...)`` as PyTorch data loaders give, whose first item is ``x_0``."""
    if isinstance(batch, dict):
        if column is None:
            if len(batch) != 1:
                raise ValueError(
                    f"the data's batches have columns {sorted(batch)}; pass column=... to say which holds x_0."
                )
            (batch,) = batch.values()
        elif column not in batch:
            raise ValueError(f"column={column!r} is not one of the data's columns {sorted(batch)}.")
        else:
            batch = batch[column]
        if isinstance(batch, list) and batch and torch.is_tensor(batch[0]):
            batch = torch.stack(batch)
    elif isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    try:
        tensor = torch.as_tensor(batch)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"could not turn a data batch of type {type(batch).__name__} into a tensor of x_0 ({error}); give "
            "tensors in the model's range (for a datasets.Dataset of images, set a transform that returns them)."
        ) from None
    if not tensor.is_floating_point():
        raise ValueError(
            f"the data must hold x_0 as floats in the model's range, got {tensor.dtype} (scale integer images to "
            "[-1, 1] first)."
        )
    return tensor


def _is_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` (or anything like it: columns, a length and slicing), without importing it."""
    return hasattr(data, "column_names") and hasattr(data, "__len__") and hasattr(data, "__getitem__")


def _raw_batches(data: Any, batch_size: int, column: str | None) -> Iterator[torch.Tensor]:
    if torch.is_tensor(data):
        for start in range(0, data.shape[0], batch_size):
            yield data[start : start + batch_size]
    elif _is_dataset(data):
        for start in range(0, len(data), batch_size):
            yield _to_tensor(data[start : start + batch_size], column)
    else:
        if not isinstance(data, Iterable):
            raise ValueError(
                f"data must be a tensor, a datasets.Dataset or an iterable of batches, got {type(data).__name__}."
            )
        for batch in data:
            yield _to_tensor(batch, column)


def x0_batches(data: Any, num_samples: int, batch_size: int, column: str | None = None) -> Iterator[torch.Tensor]:
    """The first ``num_samples`` rows of ``data`` in batches of ``batch_size`` (the last may be smaller).

    ``data`` is a tensor ``(n, ...)``, a ``datasets.Dataset`` (sliced; ``column`` names the column holding
    ``x_0`` unless there is only one) or any iterable of batches (tensors, dicts or ``(x_0, ...)`` tuples),
    re-cut to ``batch_size``. Fewer rows than ``num_samples`` give a warning.
    """
    pending: list[torch.Tensor] = []
    held = given = 0
    for batch in _raw_batches(data, batch_size, column):
        batch = batch[: num_samples - given - held]
        pending.append(batch)
        held += batch.shape[0]
        while held >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            given += batch_size
            pending, held = [joined[batch_size:]], held - batch_size
        if given + held >= num_samples:
            break
    if held:
        yield torch.cat(pending)
        given += held
    if given < num_samples:
        warnings.warn(
            f"the data holds {given} samples, fewer than num_samples={num_samples}; Gamma is estimated from {given}.",
            stacklevel=3,
        )
