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
    "ancestral",
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


def ancestral(
    alphas: Sequence[float],
    sigmas: Sequence[float],
    next_alphas: Sequence[float],
    next_sigmas: Sequence[float],
    variance: str,
) -> list[AffineUpdate]:
    """Ancestral sampling between two levels of any linear-drift SDE: a draw from the Gaussian posterior
    ``q(x_{i+1} | x_i, x_0)`` with the model's ``x_0`` estimate standing in for ``x_0``.

    A linear SDE's kernels are Gaussian, ``x_t = alpha(t) x_0 + sigma(t) z``, and so is its transition from the
    lower level to the higher one: ``x_i = k x_{i+1} + sqrt(v) z`` with ``k = alpha_i / alpha_{i+1}`` and
    ``v = sigma_i^2 - k^2 sigma_{i+1}^2`` (the marginals' variances must add up). Its posterior (Kingma, Salimans,
    Poole & Ho 2021, "Variational Diffusion Models", appendix A: ``q(z_s | z_t, x)``, in these names) has mean
    ``(alpha_{i+1} v x_0 + k sigma_{i+1}^2 x_i) / sigma_i^2``; with Tweedie's ``x_0 = (x_i + sigma_i^2 s) /
    alpha_i`` that is ``(x_i + v s) / k``. The variance is either

    * ``beta_tilde``: the posterior's own, ``v sigma_{i+1}^2 / sigma_i^2``, or
    * ``beta``: the transition's, ``v``;

    the names of DDPM's two choices (Ho et al. 2020, section 3.2). The familiar samplers are special cases:

    * VP (``v = b = 1 - alpha_bar_i / alpha_bar_{i+1}``, ``k = sqrt(1 - b)``): DDPM's step
      ``(x + b s) / sqrt(1 - b) + sqrt(v') z``, ``v'`` the chosen variance (Ho et al. eq. 11; score-SDE eq. 4).
      ``beta_tilde`` is diffusers' ``DDPMScheduler`` default (``variance_type="fixed_small"``), ``beta`` its
      ``fixed_large`` and score-SDE's choice. On a DDPM table it is DDPM's step; with larger steps DDIM's
      ``eta = 1`` (Song, Meng & Ermon 2021, eq. 16).
    * VE (``k = 1``, ``v = sigma_i^2 - sigma_{i+1}^2``): SMLD ancestral sampling, ``x + v s + sqrt(v') z``
      (score-SDE appendix F).
    * sub-VP and any other linear SDE whose noise-to-signal ratio ``sigma / alpha`` grows with ``t``: the same
      posterior for its own kernel.

    Args:
        alphas, sigmas: the kernel scale and std at each level.
        next_alphas, next_sigmas: those of the level the step lands on (1 and 0 at the data end).
        variance: ``beta_tilde`` or ``beta`` (:data:`ANCESTRAL_VARIANCES`).

    Raises:
        ValueError: a step on which ``sigma / alpha`` rises (its transition would have a negative variance).
    """
    updates = []
    for alpha, sigma, alpha_next, sigma_next in zip(alphas, sigmas, next_alphas, next_sigmas):
        keep = alpha / alpha_next
        gap = sigma**2 - (keep * sigma_next) ** 2
        if gap < 0.0:
            raise ValueError(
                f"predictor='ancestral' needs sigma/alpha not to rise from one level to the next; it rises from "
                f"{sigma / alpha:.10g} to {sigma_next / alpha_next:.10g} here, so this SDE has no forward transition "
                "between them. Use predictor='reverse_diffusion' or 'euler_maruyama'."
            )
        var = gap * sigma_next**2 / sigma**2 if variance == "beta_tilde" else gap
        updates.append(AffineUpdate(1.0 / keep, gap / keep, math.sqrt(var)))
    return updates
