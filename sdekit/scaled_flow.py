"""The probability-flow ODE in scaled variables: state ``y = x / alpha``, time ``s = sigma / alpha``.

For an SDE with an affine kernel ``x_t = alpha(t) x_0 + sigma(t) z`` (VE, VP, sub-VP and any plugin of that
form), the probability-flow ODE ``dx/dt = f(t) x - g(t)^2 score / 2`` (Song et al., ICLR 2021, eq. 13) becomes,
with the noise-to-signal ratio ``s = sigma / alpha``, ``y = x / alpha`` and ``eps_hat = -sigma score``,

    dy/ds = eps_hat(alpha y, t(s))          (Song, Meng & Ermon, "DDIM", ICLR 2021, eq. 14)

because ``alpha' = f alpha`` and ``sigma sigma' = f sigma^2 + g^2 / 2``. For VE (``alpha = 1``) this is Karras et
al.'s ``dx/dsigma = -sigma score`` (NeurIPS 2022, eq. 4), the form k-diffusion integrates.

Why these variables: ``alpha`` and ``sigma`` enter only through ``t(s)``, never through their derivatives, so a noise
schedule that is only piecewise smooth in ``t`` (a DDPM table interpolated between its entries) gives a right-hand
side that is smooth in ``s``, which an adaptive solver's error estimate needs; and at high noise ``eps_hat`` is
nearly constant along the path, so the solver takes long steps there. (Measured on the oracle of
``benchmarks/likelihood.py``: at equal tolerances, ``s`` needs 10-20% fewer evaluations than ``log s`` and
``t`` needed several times more on DDPM tables.)

Densities follow by the instantaneous change of variables (score-SDE eq. 39) in ``y`` and the scaling
``p_x(x) = p_y(x / alpha) / alpha^D``:

    log p_eps(x(eps)) = log p_T(x(T)) + D log(alpha(T) / alpha(eps)) + int_{s(eps)}^{s(T)} div_y (dy/ds) ds.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch

from .grids import time_of_noise_to_signal
from .parametrization import model_output_to
from .sde import SDE, linear_coefficients

__all__ = ["ScaledFlow"]

_TABLE_POINTS = 1025  # brackets for t(s), evenly spaced in log s
_REFINEMENTS = 4  # Illinois steps inside a bracket: from ~1e-5 (linear interpolation) to below 1e-12


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _time_table(sde: SDE, r_start: float, r_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Times of evenly spaced ``r = log(sigma / alpha)`` from ``r_start`` to ``r_end``
    (:func:`sdekit.grids.time_of_noise_to_signal`), cached per SDE: ``t(s)`` is looked up in ``r``, where one
    spacing suits every scale."""
    key = (sde.sampling_eps, sde.T, r_start, r_end)
    try:
        cached = _TABLES.get(sde)
    except TypeError:  # an SDE that cannot be weakly referenced or hashed: no cache
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    r_table = torch.linspace(r_start, r_end, _TABLE_POINTS, dtype=torch.float64)
    t_table = time_of_noise_to_signal(sde, torch.exp(r_table).clamp(math.exp(r_start), math.exp(r_end)))
    t_table[0], t_table[-1] = sde.sampling_eps, sde.T
    try:
        _TABLES[sde] = (key, (r_table, t_table))
    except TypeError:
        pass
    return r_table, t_table


class ScaledFlow:
    """The probability-flow ODE of ``sde`` for a model, in ``y = x / alpha`` and ``s = sigma / alpha``.

    Args:
        sde: an SDE with an affine kernel whose ``sigma / alpha`` increases with ``t``, ``sigma(sampling_eps) > 0``.
        predict: ``predict(x, t)``, the model's output at data ``x`` and continuous times ``t`` (one per sample).
        prediction_type: how to read that output (``epsilon``, ``v_prediction``, ``sample``, ``score``).
        what: the caller's name for error messages.

    Raises:
        ValueError: the SDE has no probability-flow ODE of this form (its drift and diffusion are undefined, or not
            ``(f(t) x, g(t))``), or ``sigma / alpha`` is not increasing on ``[sampling_eps, T]`` or is 0 at
            ``sampling_eps``.
    """

    def __init__(
        self,
        sde: SDE,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        prediction_type: str,
        what: str,
    ) -> None:
        self.sde = sde
        self.predict = predict
        self.prediction_type = prediction_type
        name = type(sde).__name__
        probe_times = torch.linspace(sde.sampling_eps, sde.T, 5, dtype=torch.float64).tolist()
        try:
            linear_coefficients(sde.sde, probe_times)
        except NotImplementedError as error:
            raise ValueError(
                f"{name} does not define its drift and diffusion (sde.sde), so it has no probability-flow ODE for "
                f"{what} to integrate."
            ) from error
        except ValueError as error:
            raise ValueError(
                f"{what} needs the probability-flow ODE of an SDE dx = f(t) x dt + g(t) dw (score-SDE eq. 13 with an "
                f"affine kernel); {name}'s drift and diffusion are {error}."
            ) from error
        ends = torch.tensor([sde.sampling_eps, sde.T], dtype=torch.float64)
        alpha, sigma = sde.marginal_coeffs(ends)
        ratio = sigma / alpha
        if not (bool(ratio[0] > 0) and bool(ratio[1] > ratio[0])):
            raise ValueError(
                f"{what} integrates the probability-flow ODE in s = sigma / alpha, which must increase from "
                f"sampling_eps to T and start above 0; {name} has sigma / alpha = {float(ratio[0]):.6g} "
                f"at t={sde.sampling_eps:g} and {float(ratio[1]):.6g} at t={sde.T:g}."
            )
        self.s_start, self.s_end = float(ratio[0]), float(ratio[1])
        r_start, r_end = math.log(self.s_start), math.log(self.s_end)
        self.alpha_start, self.alpha_end = float(alpha[0]), float(alpha[1])
        try:
            self._r_table, self._t_table = _time_table(sde, r_start, r_end)
        except ValueError as error:
            raise ValueError(
                f"{what} integrates the probability-flow ODE in s = sigma / alpha, which must increase strictly in t; "
                f"{name}'s does not on [sampling_eps, T] ({error})"
            ) from error
        if not (
            bool((self._t_table[1:] > self._t_table[:-1]).all())
            and torch.allclose(self._log_ratio(self._t_table), self._r_table, rtol=0, atol=1e-9)
        ):
            raise ValueError(
                f"{what} integrates the probability-flow ODE in s = sigma / alpha, which must increase strictly in t; "
                f"{name}'s does not on [sampling_eps, T]."
            )
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _log_ratio(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.sde.marginal_coeffs(t)
        return torch.log(sigma / alpha)

    def time(self, s: torch.Tensor) -> torch.Tensor:
        """The time ``t`` whose ``sigma / alpha`` is ``s`` (float64, one per sample; clamped to the span).

        A table of ``t`` at evenly spaced ``log s`` brackets each value; linear interpolation and false-position
        steps on the SDE's own kernel refine it; a fixed amount of work, so no host synchronisation.
        """
        r = torch.log(s.to(torch.float64))
        if r.device not in self._tables:
            self._tables[r.device] = (self._t_table.to(r.device), self._r_table.to(r.device))
        t_table, r_table = self._tables[r.device]
        r = r.clamp(r_table[0], r_table[-1])
        k = torch.searchsorted(r_table, r).clamp(1, r_table.numel() - 1)
        t_lo, t_hi = t_table[k - 1], t_table[k]
        f_lo, f_hi = r_table[k - 1] - r, r_table[k] - r  # residuals: f_lo <= 0 <= f_hi

        def secant() -> torch.Tensor:
            width = f_hi - f_lo
            return torch.where(width > 0, t_lo - f_lo * (t_hi - t_lo) / width.clamp(min=1e-300), t_lo)

        # The Illinois variant of false position: halving the residual of an end kept twice in a row stops the
        # bracket from converging from one side only (Dowell & Jarratt, BIT 11, 1971).
        kept_lo = torch.zeros_like(r, dtype=torch.bool)
        kept_hi = torch.zeros_like(r, dtype=torch.bool)
        for _ in range(_REFINEMENTS):
            t = secant()
            f = self._log_ratio(t) - r
            above = f >= 0
            f_lo = torch.where(above & kept_lo, 0.5 * f_lo, f_lo)
            f_hi = torch.where(~above & kept_hi, 0.5 * f_hi, f_hi)
            t_hi, f_hi = torch.where(above, t, t_hi), torch.where(above, f, f_hi)
            t_lo, f_lo = torch.where(above, t_lo, t), torch.where(above, f_lo, f)
            kept_lo, kept_hi = above, ~above
        return secant()

    def velocity(self, y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``dy/ds = eps_hat(alpha y, t(s))`` at per-sample ``s``; differentiable in ``y``."""
        t = self.time(s)
        alpha, _ = self.sde.marginal_coeffs(t)
        view = (-1,) + (1,) * (y.ndim - 1)
        alpha, t = alpha.to(y.dtype), t.to(y.dtype)
        x = alpha.reshape(view) * y
        return model_output_to(self.sde, self.predict(x, t), x, t, self.prediction_type, "epsilon")

    def log_scale_change(self, dims: int) -> float:
        """``D log(alpha(T) / alpha(eps))``: the density change of ``x = alpha y`` between the two ends."""
        return dims * (math.log(self.alpha_end) - math.log(self.alpha_start))
