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
    "ANCESTRAL_VARIANCES",
    "PREDICTORS",
    "AffineUpdate",
    "ancestral_ve",
    "ancestral_vp",
    "euler_maruyama",
    "reverse_diffusion",
]

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "ancestral", "none")
ANCESTRAL_VARIANCES = ("beta_tilde", "beta")
"""The ``ancestral`` predictor's variance choices: the posterior's (default) or the forward step's."""


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


def reverse_diffusion(sde: SDE, times: Sequence[float], dt: float | Sequence[float]) -> list[AffineUpdate]:
    """The reverse of the SDE's own discretization (score-SDE eq. 46), one update per time.

    With the forward step ``x_t = x + f_i + G_i z`` of ``sde.discretize(x, t, dt)`` and ``f_i = a_i x``:
    ``x_{t - dt} = x - f_i + G_i^2 s + G_i z`` (``ReverseSDE.discretize`` in :mod:`sdekit.sde`).

    Args:
        sde: a linear-drift SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0): one for all times, or one per time.
    """
    drifts, scales = linear_discretization(sde, times, dt)
    return [AffineUpdate(1.0 - a, G**2, G) for a, G in zip(drifts, scales)]


def euler_maruyama(sde: SDE, times: Sequence[float], dt: float | Sequence[float]) -> list[AffineUpdate]:
    """Euler-Maruyama on the reverse-time SDE ``dx = [f - g^2 s] dt + g dw_bar`` (score-SDE eq. 6).

    One step back in time: ``x - (a x - g^2 s) dt + g sqrt(dt) z`` with ``f(x, t) = a x``.

    Args:
        sde: a linear-drift SDE.
        times: the current times ``t_i``.
        dt: the step ``t_i - t_{i+1}`` (> 0): one for all times, or one per time.
    """
    drifts, diffusions = linear_sde(sde, times)
    steps = [dt] * len(drifts) if isinstance(dt, (int, float)) else list(dt)
    return [AffineUpdate(1.0 - a * h, g**2 * h, g * math.sqrt(h)) for a, g, h in zip(drifts, diffusions, steps)]


def ancestral_ve(sigmas: Sequence[float], next_sigmas: Sequence[float], variance: str) -> list[AffineUpdate]:
    """SMLD ancestral sampling (score-SDE appendix F) from noise level ``sigma_i`` down to ``sigma_{i+1}``.

    The mean of ``q(x_{i+1} | x_i, x_0)`` with the score standing in for ``x_0``, ``x + (sigma_i^2 - sigma_{i+1}^2)
    s``, and a variance of either choice (the names of DDPM's two, Ho et al. 2020 section 3.2):

    * ``beta_tilde``: the posterior's, ``sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2`` (the paper's);
    * ``beta``: the forward step's, ``sigma_i^2 - sigma_{i+1}^2`` (SMLD's chain, score-SDE eq. 45).

    Args:
        sigmas: the kernel std ``sigma_i`` at each level.
        next_sigmas: ``sigma_{i+1}``, the std the step lands on (0 at the data end).
        variance: ``beta_tilde`` or ``beta`` (:data:`ANCESTRAL_VARIANCES`).
    """
    updates = []
    for sigma, sigma_next in zip(sigmas, next_sigmas):
        gap = sigma**2 - sigma_next**2
        var = gap * sigma_next**2 / sigma**2 if variance == "beta_tilde" else gap
        updates.append(AffineUpdate(1.0, gap, math.sqrt(var)))
    return updates


def ancestral_vp(
    alphas: Sequence[float],
    sigmas: Sequence[float],
    next_alphas: Sequence[float],
    next_sigmas: Sequence[float],
    variance: str,
) -> list[AffineUpdate]:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 11 and section 3.2; score-SDE eq. 4) between two VP levels.

    ``(x + b s) / sqrt(1 - b) + sqrt(v) z`` with the step's ``b = 1 - alpha_bar_i / alpha_bar_{i+1}`` (``1 - b =
    alpha_i^2 / alpha_{i+1}^2`` in the kernel scales ``alpha = sqrt(alpha_bar)``) and ``v`` either

    * ``beta_tilde``: the posterior variance ``b sigma_{i+1}^2 / sigma_i^2 = b (1 - alpha_bar_{i+1}) / (1 -
      alpha_bar_i)`` (diffusers' ``DDPMScheduler`` default, ``variance_type="fixed_small"``), or
    * ``beta``: ``b`` itself (``variance_type="fixed_large"``, score-SDE's choice).

    On a DDPM table with ``b`` the table's ``beta_i`` this is DDPM's step; with larger steps ``b`` is the step's
    own (DDIM's generalisation, Song, Meng & Ermon 2021, eq. 16 with ``eta = 1``, for ``beta_tilde``).

    Args:
        alphas, sigmas: the kernel scale and std at each level.
        next_alphas, next_sigmas: those of the level the step lands on (1 and 0 at the data end).
        variance: ``beta_tilde`` or ``beta`` (:data:`ANCESTRAL_VARIANCES`).
    """
    updates = []
    for alpha, sigma, alpha_next, sigma_next in zip(alphas, sigmas, next_alphas, next_sigmas):
        keep = alpha / alpha_next  # sqrt(1 - b)
        b = 1.0 - keep**2
        var = b * sigma_next**2 / sigma**2 if variance == "beta_tilde" else b
        updates.append(AffineUpdate(1.0 / keep, b / keep, math.sqrt(var)))
    return updates
