"""The reverse kernels of Analytic-DPM on a discrete variance-preserving table.

Bao, Li, Zhu & Zhang, "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in Diffusion
Probabilistic Models", ICLR 2022 (below "the paper"). Notation: ``abar`` is the table's ``alpha_bar``,
``bbar = 1 - abar``; a step goes from level ``t`` to a lower level ``s``, ``alpha_{t|s} = abar_t / abar_s`` and
``beta_{t|s} = 1 - alpha_{t|s}``.

* DDIM's family of inference kernels (the paper's ``q_lambda``, section 2; DDIM eq. 7):
  ``q(x_s | x_t, x_0) = N(x0_coeff x_0 + sample_coeff x_t, lambda^2 I)`` with
  ``sample_coeff = sqrt((bbar_s - lambda^2) / bbar_t)``, ``x0_coeff = sqrt(abar_s) - sample_coeff sqrt(abar_t)``
  and ``lambda^2 = eta^2 beta_tilde``, ``beta_tilde = bbar_s / bbar_t beta_{t|s}`` (DDIM eq. 16; DDPM eq. 7 at
  eta = 1).
* The optimal reverse variance (the paper's Theorem 1, with the score's mean square replaced by its estimate
  ``Gamma_t = E ||eps_theta(x_t, t)||^2 / d`` of section 3; for skip steps, section 4):
  ``sigma*^2 = lambda^2 + (sqrt(bbar_t / alpha_{t|s}) - sqrt(bbar_s - lambda^2))^2 (1 - Gamma_t)``.
  Since ``sqrt(bbar_t / alpha_{t|s}) - sqrt(bbar_s - lambda^2) = x0_coeff sqrt(bbar_t / abar_t)``, this is
  ``lambda^2 + x0_coeff^2 Cov_t`` with ``Cov_t = bbar_t / abar_t (1 - Gamma_t)``, the mean posterior variance of
  ``x_0`` given ``x_t`` per dimension.
* Theorem 2: for data in ``[a, b]^d``, ``Cov_t <= ((b - a) / 2)^2``; the estimate is clipped to
  ``[0, ((b - a) / 2)^2]``.

The formulas take Python floats (what ``step()`` uses, so that it launches no tensor work on the host) or float64
tensors that broadcast (the step-cost matrix of the optimal trajectory), with the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

__all__ = ["VARIANCES", "LevelPair", "StepKernel", "level_pairs", "step_kernel", "step_kl"]

VARIANCES = ("analytic", "beta_tilde", "beta")
"""Reverse variances: the analytic estimate of the optimal one, DDIM's ``eta^2 beta_tilde`` (DDPM's
``beta_tilde`` at eta = 1, zero at eta = 0), and DDPM's ``beta_{t|s}``."""

Value = Union[float, torch.Tensor]
"""A Python float (per-step coefficients) or a float64 tensor (the step-cost matrix)."""


def _clip(x: Value, low: float | None = None, high: Value | None = None) -> Value:
    """``x`` clipped to ``[low, high]`` (``None``: no bound); floats stay floats."""
    if torch.is_tensor(x):
        if low is not None:
            x = x.clamp(min=low)
        if high is None:
            return x
        return torch.minimum(x, high) if torch.is_tensor(high) else x.clamp(max=high)
    if low is not None:
        x = max(x, low)
    return x if high is None else min(x, float(high))


@dataclass(frozen=True)
class LevelPair:
    """The table's values at a current level ``t`` and a target level ``s < t`` (floats or tensors)."""

    abar_t: Value
    bbar_t: Value
    abar_s: Value
    bbar_s: Value
    beta_ts: Value  # beta_{t|s} = 1 - abar_t / abar_s


def level_pairs(log_abar_t: torch.Tensor, log_abar_s: torch.Tensor) -> LevelPair:
    """:class:`LevelPair` tensors from ``log alpha_bar`` (``expm1`` keeps ``bbar`` and ``beta_{t|s}`` exact)."""
    return LevelPair(
        abar_t=log_abar_t.exp(),
        bbar_t=-torch.expm1(log_abar_t),
        abar_s=log_abar_s.exp(),
        bbar_s=-torch.expm1(log_abar_s),
        beta_ts=-torch.expm1(log_abar_t - log_abar_s),
    )


@dataclass(frozen=True)
class StepKernel:
    """Mean coefficients and variances of the steps ``t -> s``; see the module docstring."""

    x0_coeff: Value
    sample_coeff: Value
    posterior_variance: Value  # lambda^2
    variance: Value  # the reverse variance
    covariance: Value  # Cov_t from Gamma_t, clipped (Theorem 2); 0 without Gamma


def step_kernel(
    pair: LevelPair,
    gamma_t: Value | None,
    eta: float,
    variance: str,
    max_covariance: float | None,
    max_variance: Value | None = None,
) -> StepKernel:
    """The kernels of the steps ``t -> s``.

    Args:
        pair: the table's values at both levels.
        gamma_t: ``Gamma_t`` at the current level, in ``[0, 1]``; ``None`` when unknown (then ``variance`` must not
            be ``analytic``, and ``covariance`` is 0).
        eta: DDIM's noise scale in ``[0, 1]``.
        variance: one of :data:`VARIANCES`.
        max_covariance: Theorem 2's ``((b - a) / 2)^2``, or ``None`` for unbounded data.
        max_variance: an upper bound on the analytic variance (the paper's pixel rule), or ``None``.
    """
    lam2 = eta**2 * pair.bbar_s / pair.bbar_t * pair.beta_ts  # DDIM eq. 16, squared
    sample_coeff = (_clip(pair.bbar_s - lam2, low=0.0) / pair.bbar_t) ** 0.5
    x0_coeff = pair.abar_s**0.5 - sample_coeff * pair.abar_t**0.5
    covariance = 0.0 * x0_coeff
    if gamma_t is not None:
        covariance = _clip(pair.bbar_t / pair.abar_t * (1 - gamma_t), low=0.0, high=max_covariance)  # Theorem 2
    if variance == "analytic":
        var = _clip(lam2 + x0_coeff**2 * covariance, high=max_variance)  # Theorem 1, the DDIM-family form
    elif variance == "beta_tilde":
        var = lam2
    else:
        var = pair.beta_ts
    return StepKernel(x0_coeff, sample_coeff, lam2, var, covariance)


def step_kl(kernel: StepKernel) -> torch.Tensor:
    """Expected KL per dimension between the inference and reverse kernels of ``kernel`` (tensors), times 2.

    ``log(sigma^2 / lambda^2) + (lambda^2 + x0_coeff^2 Cov_t) / sigma^2 - 1``: the Gaussian KL with the squared
    mean error ``x0_coeff^2 E||x_0 - E[x_0 | x_t]||^2 / d = x0_coeff^2 Cov_t`` of an exact ``x_0`` estimate. With
    the analytic variance (and no clipping active) it is the paper's ``J(s, t) = log(sigma*^2 / lambda^2)``, the
    step cost of its optimal-trajectory program (section 4). Needs ``lambda^2 > 0`` (``eta > 0``).
    """
    var, lam2 = kernel.variance, kernel.posterior_variance
    return torch.log(var / lam2) + (lam2 + kernel.x0_coeff**2 * kernel.covariance) / var - 1
