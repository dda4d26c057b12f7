"""Time grids: where a sampler puts its noise levels, for any SDE.

A grid is a decreasing list of continuous times from ``T`` down to ``sampling_eps``. Three spacings are offered,
all defined on the SDE's own noise level, so they apply to every registered SDE unchanged:

* ``uniform``: evenly spaced in ``t`` (the score-SDE reference code's grid);
* ``logsnr``: evenly spaced in the log signal-to-noise ratio ``lambda = log(alpha^2 / sigma^2)``, the variable
  of DPM-Solver (Lu, Zhou, Bao, Chen, Li & Zhu 2022, section 3.3, "uniform logSNR");
* ``karras``: Karras, Aittala, Aila & Laine (2022, eq. 5), evenly spaced in ``s^(1 / rho)``,
  ``s_i = (s_max^(1/rho) + i / (n - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, which crowds the levels towards the
  data end as ``rho`` grows (their choice: ``rho = 7``).

The noise level is the kernel's noise-to-signal ratio ``s(t) = sigma(t) / alpha(t)`` (for ``x_t = alpha x_0 +
sigma z``; ``lambda = -2 log s``): Karras et al.'s ``sigma`` (their eq. 4 with ``s(t) = alpha``), ``sigma(t)``
itself for a variance-exploding SDE, ``sqrt((1 - alpha_bar) / alpha_bar)`` for VP. Times come back from noise
levels through the SDE's own inverse, :meth:`~sdekit.sde.SDE.t_from_sigma`, where it defines one for a
variance-exploding kernel (``s = sigma``); otherwise by bisection on ``s(t)``, which every SDE here increases
strictly in ``t``.
"""

from __future__ import annotations

import math

import torch

from .sde import SDE

__all__ = [
    "KARRAS_SPAN",
    "TIME_GRIDS",
    "check_time_grid",
    "noise_span",
    "noise_to_signal",
    "time_grid",
    "time_of_noise_to_signal",
]

TIME_GRIDS = ("uniform", "logsnr", "karras")
"""The grid names :func:`time_grid` takes."""

KARRAS_SPAN = 80.0 / 0.002
"""``s_max / s_min`` of the range Karras et al. (2022, table 1: ``sigma`` from 0.002 to 80) tuned ``rho = 7`` for.

On a much wider range (sub-VP on a DDPM table, whose ``s`` at the data end is about VP's squared, spans ~1.6e6)
a few-level ``karras`` grid leaves the middle noise levels bare; samplers compare :func:`noise_span` with this
to choose their default grid."""

_BISECTION_STEPS = 64  # halves [0, T] to below float64 resolution


def check_time_grid(time_grid: str, rho: float) -> None:
    """Raise ``ValueError`` unless ``time_grid`` is one of :data:`TIME_GRIDS` and ``rho`` a finite number > 0.

    ``rho`` is checked whatever the grid, so that a bad value is reported where it is set, not when the grid
    is later switched to ``karras``.
    """
    if not isinstance(time_grid, str) or time_grid not in TIME_GRIDS:
        raise ValueError(f"time_grid must be one of {', '.join(map(repr, TIME_GRIDS))}; got {time_grid!r}.")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho must be a finite number > 0 (Karras et al. use 7), got {rho!r}.")


def noise_to_signal(sde: SDE, t: float | torch.Tensor) -> torch.Tensor:
    """``s(t) = sigma(t) / alpha(t)`` of the SDE's kernel, in float64 (``exp(-lambda / 2)``, ``lambda`` the log-SNR)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    alpha, sigma = sde.marginal_coeffs(t)
    return sigma / alpha


def noise_span(sde: SDE) -> float:
    """``s(T) / s(sampling_eps)``: how many-fold the noise-to-signal ratio falls over the SDE's sampling range
    (``inf`` when it reaches 0 at ``sampling_eps``)."""
    s_max, s_min = (float(v) for v in noise_to_signal(sde, torch.tensor([sde.T, sde.sampling_eps])))
    return s_max / s_min if s_min > 0 else math.inf


def _closed_form_inverse(sde: SDE, s: torch.Tensor) -> torch.Tensor | None:
    """``t`` from the SDE's own ``t_from_sigma`` for a variance-exploding kernel (``s = sigma``), else ``None``."""
    if not sde.is_variance_exploding():
        return None
    try:
        return torch.as_tensor(sde.t_from_sigma(s), dtype=torch.float64)
    except ValueError:  # the SDE does not define the inverse: bisect instead
        return None


def time_of_noise_to_signal(sde: SDE, s: torch.Tensor) -> torch.Tensor:
    """The times in ``[sampling_eps, T]`` whose noise-to-signal ratio is ``s`` (float64, the shape of ``s``).

    Uses the SDE's ``t_from_sigma`` for a variance-exploding kernel that defines it, otherwise bisection on
    :func:`noise_to_signal` (64 halvings of ``[sampling_eps, T]``, all values at once).

    Raises:
        ValueError: a value lies outside ``[s(sampling_eps), s(T)]``, or ``s(t)`` does not increase strictly there
            (the grid cannot be laid out in that SDE's noise level).
    """
    s = torch.as_tensor(s, dtype=torch.float64)
    lo_t, hi_t = sde.sampling_eps, sde.T
    s_lo, s_hi = (float(v) for v in noise_to_signal(sde, torch.tensor([lo_t, hi_t], dtype=torch.float64)))
    if not s_hi > s_lo:
        raise ValueError(
            f"{type(sde).__name__}'s noise level sigma/alpha does not grow from t=sampling_eps to T ({s_lo:g} to "
            f"{s_hi:g}), so time_grid='logsnr' / 'karras' cannot be laid out on it; use time_grid='uniform'."
        )
    tol = 1e-12 * s_hi
    if bool(torch.any((s < s_lo - tol) | (s > s_hi + tol))):
        raise ValueError(f"noise levels must lie in [{s_lo:g}, {s_hi:g}] (sampling_eps to T); got {s.tolist()}.")
    t = _closed_form_inverse(sde, s)
    if t is None:
        lo = torch.full_like(s, lo_t)
        hi = torch.full_like(s, hi_t)
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            above = noise_to_signal(sde, mid) >= s
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        t = 0.5 * (lo + hi)
    t = t.clamp(lo_t, hi_t)
    if not torch.allclose(noise_to_signal(sde, t), s, rtol=1e-8, atol=1e-12 * s_hi):
        raise ValueError(
            f"{type(sde).__name__}'s noise level sigma/alpha is not strictly increasing in t on [sampling_eps, T], so "
            "time_grid='logsnr' / 'karras' cannot be laid out on it; use time_grid='uniform'."
        )
    return t


def time_grid(sde: SDE, num_points: int, kind: str = "uniform", rho: float = 7.0) -> list[float]:
    """``num_points`` continuous times from ``sde.T`` down to ``sde.sampling_eps`` (both included), spaced as ``kind``.

    Args:
        sde: any SDE; ``logsnr`` and ``karras`` need its noise-to-signal ratio to grow strictly with ``t`` and to be
            positive at ``sampling_eps`` (``logsnr``).
        num_points: how many times, >= 1 (1 gives ``[T]``).
        kind: ``uniform``, ``logsnr`` or ``karras`` (:data:`TIME_GRIDS`).
        rho: the ``karras`` exponent, > 0 (default 7, Karras et al.'s); ignored by the other grids.

    Returns:
        Python floats, strictly decreasing; the ends are ``T`` and ``sampling_eps`` exactly.
    """
    check_time_grid(kind, rho)
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}.")
    t_max, t_min = sde.T, sde.sampling_eps
    if kind == "uniform" or num_points < 3:
        times = torch.linspace(t_max, t_min, num_points, dtype=torch.float64)
        return times.tolist()
    s_max, s_min = (float(v) for v in noise_to_signal(sde, torch.tensor([t_max, t_min], dtype=torch.float64)))
    fraction = torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)
    if kind == "logsnr":
        if not s_min > 0:
            raise ValueError(
                f"time_grid='logsnr' needs a positive noise level at sampling_eps={t_min}, but "
                f"{type(sde).__name__} has sigma/alpha = {s_min} there; raise sampling_eps or use time_grid='karras'."
            )
        s = torch.exp(math.log(s_max) + fraction * (math.log(s_min) - math.log(s_max)))
    else:
        # Karras et al. (2022), eq. 5.
        top, bottom = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
        s = (top + fraction * (bottom - top)) ** rho
    times = time_of_noise_to_signal(sde, s[1:-1]).tolist()
    grid = [t_max, *times, t_min]
    if any(later >= earlier for earlier, later in zip(grid, grid[1:])):
        raise ValueError(
            f"time_grid={kind!r} with {num_points} levels puts two levels at the same time on "
            f"{type(sde).__name__} (its noise level is flat somewhere in [sampling_eps, T]); use fewer levels or "
            "time_grid='uniform'."
        )
    return grid
