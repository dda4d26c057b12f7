"""``Gamma_n = E ||eps_theta(x_n, n)||^2 / d``: its Monte Carlo estimate and its validation.

Bao et al., ICLR 2022, section 3: the optimal reverse variance depends on the data only through the mean square
of the score at each level, ``E ||grad log q_n(x_n)||^2 = Gamma_n d / bbar_n``, estimated once per model with
``x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps`` over data ``x_0`` and noise ``eps``. For the exact noise predictor
``Gamma_n = 1 - abar_n / bbar_n E tr Cov(x_0 | x_n) / d`` lies in ``[0, 1]``.

:func:`estimate_gamma_levels` is that estimate at chosen table levels, with no scheduler state
(``AnalyticDPMScheduler.estimate_gamma`` chooses the levels, stores the values and plans again);
:func:`x0_batches` reads the data; :func:`check_gamma` validates stored values. The ``missing_gamma_message`` and
``optimal_remedy`` texts tell a user without Gamma where to estimate it and what that costs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from sdekit.models import model_device_dtype, model_prediction
from sdekit.parametrization import check_choice, split_model_output
from sdekit.progress import Progress
from sdekit.sde import compute_dtype

__all__ = [
    "GAMMA_ESTIMATORS",
    "check_estimation",
    "check_gamma",
    "estimate_gamma_levels",
    "format_levels",
    "missing_gamma_message",
    "missing_levels",
    "optimal_remedy",
    "table_levels",
    "x0_batches",
]

GAMMA_ESTIMATORS = ("norm", "error")
"""Monte Carlo estimators of ``Gamma`` accepted by :func:`estimate_gamma_levels` (and
``AnalyticDPMScheduler.estimate_gamma``)."""


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


def x0_batches(
    data: Any, num_samples: int, batch_size: int, column: str | None = None, stacklevel: int = 3
) -> Iterator[torch.Tensor]:
    """The first ``num_samples`` rows of ``data`` in batches of ``batch_size`` (the last may be smaller).

    ``data`` is a tensor ``(n, ...)``, a ``datasets.Dataset`` (sliced; ``column`` names the column holding
    ``x_0`` unless there is only one) or any iterable of batches (tensors, dicts or ``(x_0, ...)`` tuples),
    re-cut to ``batch_size``. Fewer rows than ``num_samples`` give a warning (``stacklevel`` as in
    :func:`warnings.warn`; the default 3 names the caller of the function that iterates).
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
            stacklevel=stacklevel,
        )


def check_estimation(num_samples: int, batch_size: int, estimator: str) -> None:
    """``ValueError`` unless ``estimator`` is one of :data:`GAMMA_ESTIMATORS` and both counts are integers >= 1."""
    check_choice("estimator", estimator, GAMMA_ESTIMATORS)
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def table_levels(timesteps: Iterable[int] | None, num_levels: int) -> list[int]:
    """``timesteps`` as ascending distinct table levels, checked to be integers in ``[0, num_levels - 1]``;
    ``None``: all ``num_levels``."""
    if timesteps is None:
        return list(range(num_levels))
    levels = sorted({int(n) for n in timesteps})
    if not levels or levels[0] < 0 or levels[-1] >= num_levels or any(n != int(n) for n in timesteps):
        raise ValueError(f"timesteps must be integers in [0, {num_levels - 1}] (table levels), got {timesteps!r}.")
    return levels


def estimate_gamma_levels(
    model: Any,
    data: Any,
    log_alpha_bar: torch.Tensor,
    levels: Sequence[int],
    model_times: torch.Tensor,
    prediction_type: str,
    num_samples: int = 1000,
    batch_size: int = 100,
    generator: torch.Generator | None = None,
    column: str | None = None,
    estimator: str = "norm",
    show_progress: bool = True,
    data_range: float | None = None,
    stacklevel: int = 2,
) -> torch.Tensor:
    """Monte Carlo estimates of ``Gamma`` at table ``levels`` (the paper's section 3), neither clipped nor stored.

    For every data sample ``x_0`` and every level ``n``, ``x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps`` with a
    fresh ``eps`` from ``generator``; the model's output is converted to ``eps_theta`` by ``prediction_type``.

    The estimators: ``norm``, the paper's ``mean ||eps_theta||^2 / d``; ``error``,
    ``1 - mean ||eps - eps_theta||^2 / d``. Both have the same expectation for the exact noise predictor
    ``E[eps | x_n]`` (it is an orthogonal projection, so ``E ||eps||^2 = E ||eps_theta||^2 +
    E ||eps - eps_theta||^2``), but the variances need ``1 - Gamma``, which ``error`` estimates with a relative
    error of about ``sqrt(2 / (d M))`` at every level, while ``norm``'s grows like ``1 / (1 - Gamma)`` at high
    noise (in low dimension it can exceed 100%, and the optimal trajectory then exploits levels clipped to
    ``Gamma = 1``). For an imperfect model ``error`` gives the variance
    ``lambda^2 + x0_coeff^2 E ||x_0 - x0_theta||^2 / d`` that minimises the step's KL for the model's own mean.
    ``error`` is never above 1.

    Args:
        model: ``model(x_n, timestep)`` returning a tensor, a tuple or an object with ``.sample``.
        data: ``x_0``, as :func:`x0_batches` reads it (the first ``num_samples`` samples).
        log_alpha_bar: ``log alpha_bar`` at every level of the table, float64.
        levels: the table levels to estimate, as indices into ``log_alpha_bar``.
        model_times: the model's timestep input at each of ``levels``.
        prediction_type: the model's output: ``epsilon``, ``sample`` or ``v_prediction``.
        num_samples, batch_size: data samples in all, and per model call.
        generator: the source of the noise.
        column: the column holding ``x_0`` in datasets / dict batches with several.
        estimator: one of :data:`GAMMA_ESTIMATORS`.
        show_progress: report progress with :class:`sdekit.progress.Progress`.
        data_range: warn if the data leave ``[-data_range, data_range]``; ``None``: no check.
        stacklevel: the warnings' ``stacklevel`` as in :func:`warnings.warn` (2: the caller of this function).

    Returns:
        One float64 value per level, on the CPU. ``ValueError`` if the data are empty or a value is not finite.
    """
    check_estimation(num_samples, batch_size, estimator)
    log_abar = log_alpha_bar[list(levels)]
    alphas, sigmas = log_abar.mul(0.5).exp(), (-torch.expm1(log_abar)).sqrt()
    sums: torch.Tensor | None = None
    low = high = None
    count = dim = 0
    total = len(levels) * -(-num_samples // batch_size)
    with Progress(total=total, desc="Gamma", unit="call", disable=not show_progress) as bar:
        for x0 in x0_batches(data, num_samples, batch_size, column, stacklevel=stacklevel + 1):
            device, dtype = model_device_dtype(model, x0)
            work = compute_dtype(dtype)
            x0 = x0.to(device=device, dtype=work)
            low = x0.min() if low is None else torch.minimum(low, x0.min())
            high = x0.max() if high is None else torch.maximum(high, x0.max())
            if sums is None:
                sums = torch.zeros(len(levels), dtype=torch.float64, device=x0.device)
            for i in range(len(levels)):
                noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=work)
                x_n = float(alphas[i]) * x0 + float(sigmas[i]) * noise
                with torch.no_grad():
                    output = model_prediction(model, x_n.to(dtype), model_times[i])
                _, eps = split_model_output(output, x_n, float(alphas[i]), float(sigmas[i]), prediction_type)
                if estimator == "error":
                    eps = eps - noise
                sums[i] += eps.to(torch.float64).pow(2).sum()
                bar.update(1)
            count += x0.shape[0]
            dim = x0[0].numel()
    if sums is None:
        raise ValueError("the data gave no samples; Gamma cannot be estimated.")
    if data_range is not None and (float(low) < -data_range - 1e-6 or float(high) > data_range + 1e-6):
        warnings.warn(
            f"the data lie in [{float(low):.4g}, {float(high):.4g}], outside the configured data range "
            f"[-{data_range}, {data_range}] (clip_sample_range); give x_0 in the model's range (images scaled to "
            "[-1, 1]), or the estimated Gamma and variances will not match the model's training.",
            stacklevel=stacklevel,
        )
    estimate = (sums / (count * dim)).cpu()
    if estimator == "error":
        estimate = 1 - estimate
    if not bool(torch.isfinite(estimate).all()):
        bad = [level for level, ok in zip(levels, torch.isfinite(estimate).tolist()) if not ok]
        raise ValueError(f"the model returned NaN or Inf at timesteps {format_levels(bad)}; Gamma not stored.")
    return estimate


# -- what to say when Gamma is missing ------------------------------------------------------------------------


def missing_levels(gamma: Sequence[float | None] | None, levels: Iterable[int]) -> list[int]:
    """Those of ``levels`` where ``gamma`` (per table level, or ``None``: none known) has no value."""
    return [level for level in levels if gamma is None or gamma[level] is None]


def _gamma_cost(num_levels: int, num_samples: int = 1000, batch_size: int = 100) -> str:
    """The cost of estimating Gamma at ``num_levels`` levels, in words.

    Every level evaluates the model once per data sample, in ``ceil(num_samples / batch_size)`` batched calls:
    ``"10 levels x 1000 samples = 10,000 model evaluations, i.e. 10 x ceil(1000 / batch_size) = 100 model calls
    at batch_size=100"``.
    """
    calls = num_levels * -(-num_samples // batch_size)
    return (
        f"{num_levels} levels x {num_samples} samples = {num_levels * num_samples:,} model evaluations, i.e. "
        f"{num_levels} x ceil({num_samples} / batch_size) = {calls:,} model calls at batch_size={batch_size}"
    )


def missing_gamma_message(
    gamma: Sequence[float | None] | None,
    missing: Sequence[int],
    visited: Sequence[int],
    num_levels: int,
    spaced: bool,
) -> str:
    """The error text when the analytic variance lacks Gamma on a trajectory (to sample it, or for its bound):
    the levels, the ``estimate_gamma`` call that estimates only them, and its cost.

    Args:
        gamma: the stored Gamma per table level, or ``None`` if none was estimated.
        missing: the levels that need Gamma and lack it.
        visited: the trajectory's levels, ascending.
        num_levels: the table's number of levels.
        spaced: ``visited`` is the configured (even or quadratic) trajectory with ``len(visited)`` levels, which
            ``timesteps='trajectory', num_inference_steps=K`` estimates.
    """
    if gamma is None:
        head = (
            "variance='analytic' needs Gamma_n = E||eps_theta(x_n, n)||^2 / d at the levels it visits, and this "
            "scheduler has none."
        )
        todo = list(visited)
    else:
        head = f"variance='analytic' needs Gamma at timesteps {format_levels(missing)}, which were not estimated."
        todo = sorted(set(missing))
    quoted = f"[{', '.join(map(str, todo))}]" if len(todo) <= 20 else None  # too long to quote otherwise
    call = "scheduler.estimate_gamma(model, data, num_samples=1000, "
    if todo == list(visited) and spaced:
        how = f"{call}timesteps='trajectory', num_inference_steps={len(todo)})"
        if quoted is not None:
            how += f", which estimates timesteps={quoted}"
    elif quoted is not None:
        how = f"{call}timesteps={quoted})"
    else:
        how = f"{call}timesteps=[...]) with these {len(todo)} levels ({format_levels(todo)})"
    return (
        f"{head} Estimate it once per model at only these {len(todo)} levels: {how}. That costs "
        f"{_gamma_cost(len(todo))}; all {num_levels} levels (timesteps=None) would cost "
        f"{num_levels * 1000:,} model evaluations. data holds x_0 in the model's range (a tensor, a "
        "datasets.Dataset or an iterable of batches). Gamma is stored in the config, so save_pretrained() keeps "
        "it. Without Gamma, use variance='beta_tilde' or 'beta'."
    )


def optimal_remedy(num_levels: int, num_samples: int = 1000, batch_size: int = 100) -> str:
    """How to get the Gamma that the optimal trajectory needs on a table of ``num_levels`` levels, with the costs."""
    last = num_levels - 1
    grid = len(range(0, last, 10)) + 1
    return (
        f"Estimate Gamma at all {last + 1} levels with scheduler.estimate_gamma(model, data, "
        f"num_samples={num_samples}) ({_gamma_cost(last + 1, num_samples, batch_size)}), or at a grid of "
        f"candidate levels that includes 0 and {last}, e.g. timesteps=[*range(0, {last}, 10), {last}] (the "
        f"program then chooses among them; {_gamma_cost(grid, num_samples, batch_size)}). Or use "
        "trajectory='even' or 'quadratic', whose levels do not depend on Gamma, and estimate only those with "
        "timesteps='trajectory', num_inference_steps=K."
    )
