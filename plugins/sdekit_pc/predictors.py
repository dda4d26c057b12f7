"""Predictors: one step of a reverse-time SDE solver from ``t_i`` down to ``t_{i+1}``.

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations", ICLR 2021
(score-SDE), section 4.2 and appendices E and F. For a linear-drift SDE (see :mod:`sdekit_pc.linear`) every
predictor is affine in the sample and the score,

    x_{i+1} = sample_coeff * x_i + score_coeff * s(x_i, t_i) + noise_coeff * z,    z ~ N(0, I),

with coefficients that depend only on the time grid. The functions below compute them as Python floats, for many
times at once (one SDE call for all of them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sdekit.sde import SDE

from .linear import linear_discretization, linear_sde

__all__ = [
    "PREDICTORS",
    "AffineUpdate",
    "ancestral_ve",
    "ancestral_vp",
    "euler_maruyama",
    "reverse_diffusion",
]

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")


@dataclass(frozen=True)
class AffineUpdate:
    """The update ``sample_coeff * x + score_coeff * score + noise_coeff * z``."""

    sample_coeff: float
    score_coeff: float
    noise_coeff: float

    def apply(self, x: torch.Tensor, score: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The update; with ``noise=None`` its mean (no noise term)."""
        mean = self.sample_coeff * x + self.score_coeff * score
        return mean if noise is None else mean + self.noise_coeff * noise


def reverse_diffusion(sde: SDE, times: Sequence[float], dt: float) -> list[AffineUpdate]:
    """The reverse of the SDE's own discretization (score-SDE eq. 46), one update per time.

    With the forward step ``x_t = x + f_i + G_i z`` of ``sde.discretize(x, t, dt)`` and ``f_i = a_i x``:
    ``x_{t - dt} = x - f_i + G_i^2 s + G_i z`` (``ReverseSDE.discretize`` in :mod:`sdekit.sde`).

    Args:
        sde: a linear-drift SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0).
    """
    drifts, scales = linear_discretization(sde, times, dt)
    return [AffineUpdate(1.0 - a, G**2, G) for a, G in zip(drifts, scales)]


def euler_maruyama(sde: SDE, times: Sequence[float], dt: float) -> list[AffineUpdate]:
    """Euler-Maruyama on the reverse-time SDE ``dx = [f - g^2 s] dt + g dw_bar`` (score-SDE eq. 6).

    One step back in time: ``x - (a x - g^2 s) dt + g sqrt(dt) z`` with ``f(x, t) = a x``.

    Args:
        sde: a linear-drift SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0).
    """
    drifts, diffusions = linear_sde(sde, times)
    return [AffineUpdate(1.0 - a * dt, g**2 * dt, g * math.sqrt(dt)) for a, g in zip(drifts, diffusions)]


def ancestral_ve(sde: SDE, times: Sequence[float], dt: float, sigmas: Sequence[float]) -> list[AffineUpdate]:
    """SMLD ancestral sampling (score-SDE appendix F) between the noise levels ``sigma_i > sigma_{i+1}``.

    ``x + (sigma_i^2 - sigma_{i+1}^2) s + sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2) z``, the
    mean and variance of ``q(x_{i+1} | x_i, x_0)`` with the score standing in for ``x_0``. The variance gap
    ``sigma_i^2 - sigma_{i+1}^2`` is ``G_i^2`` of the VE discretization (SMLD's chain), which reaches
    ``sigma_{i+1} = 0`` when the step goes below ``t = 0``.

    Args:
        sde: the VE SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0).
        sigmas: the kernel std ``sigma_i`` at each time.
    """
    _, scales = linear_discretization(sde, times, dt)
    updates = []
    for G, sigma in zip(scales, sigmas):
        gap = G**2
        next_var = max(sigma**2 - gap, 0.0)
        updates.append(AffineUpdate(1.0, gap, math.sqrt(next_var * gap) / sigma))
    return updates


def ancestral_vp(sde: SDE, times: Sequence[float], dt: float) -> list[AffineUpdate]:
    """DDPM ancestral sampling (score-SDE eq. 4; Ho et al. 2020 with ``sigma_t^2 = beta_t``).

    ``(x + b s) / sqrt(1 - b) + sqrt(b) z`` with ``b = G_i^2 = 1 - alpha_bar(t_i) / alpha_bar(t_i - dt)``, the
    step's beta from the VP discretization (DDPM's ``beta_i`` on its own table).

    Args:
        sde: the VP SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0).
    """
    _, scales = linear_discretization(sde, times, dt)
    return [AffineUpdate(1.0 / math.sqrt(1.0 - G**2), G**2 / math.sqrt(1.0 - G**2), G) for G in scales]
