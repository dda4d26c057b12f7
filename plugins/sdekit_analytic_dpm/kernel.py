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
* The decoder, the last step from the first level ``tau_1`` onto the data, in the variational bound on a
  trajectory (section 4): ``analytic``, Theorem 1 with ``lambda = 0``, i.e. ``Cov_{tau_1}`` clipped by Theorem 2;
  ``beta``, ``bbar_{tau_1}`` (DDPM's ``sigma_1^2 = beta_1``); ``beta_tilde``, the full chain's ``beta_tilde`` of
  the step from ``tau_1 + 1`` to ``tau_1`` (DDPM's posterior variance at its first level is 0; Nichol & Dhariwal
  2021 and the paper's code use this one).

The formulas take Python floats (what ``step()`` uses, so that it launches no tensor work on the host) or float64
tensors that broadcast (the step-cost matrix of the optimal trajectory), with the same code. :func:`plan_steps`
precomputes a trajectory's steps as floats, and :func:`to_gaussian_steps` exports them for ``sdekit.nll_bound``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Union

import torch

from sdekit.bound import GaussianStep

__all__ = [
    "VARIANCES",
    "LevelPair",
    "PlannedStep",
    "StepKernel",
    "check_eta",
    "level_pairs",
    "plan_steps",
    "step_kernel",
    "step_kl",
    "to_gaussian_steps",
]

VARIANCES = ("analytic", "beta_tilde", "beta")
"""Reverse variances: the analytic estimate of the optimal one, DDIM's ``eta^2 beta_tilde`` (DDPM's
``beta_tilde`` at eta = 1, zero at eta = 0), and DDPM's ``beta_{t|s}``."""

Value = Union[float, torch.Tensor]
"""A Python float (per-step coefficients) or a float64 tensor (the step-cost matrix)."""


def check_eta(eta: object) -> float:
    """``eta`` as a float if it is a number in ``[0, 1]``; else ``ValueError``."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(
            f"eta must be a number in [0, 1] (1 is Analytic-DDPM, 0 Analytic-DDIM; lambda^2 = eta^2 beta_tilde must "
            f"not exceed the target level's variance); got {eta!r}."
        )
    return float(eta)


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


@dataclass(frozen=True)
class PlannedStep:
    """One evaluation of a planned trajectory: the table at both levels and the coefficients at the planned eta."""

    level: int
    target: int | None  # None: the data
    alpha: float  # sqrt(abar_t)
    sigma: float  # sqrt(bbar_t)
    pair: LevelPair | None  # floats; None for the last step
    gamma: float | None
    max_variance: float | None  # the pixel rule's bound on the step onto tau_1
    x0_coeff: float
    sample_coeff: float
    std: float

    def kernel(self, eta: float, variance: str, max_covariance: float | None) -> StepKernel:
        """This step's kernel at ``eta`` with ``variance`` (not for the last step)."""
        return step_kernel(self.pair, self.gamma, eta, variance, max_covariance, self.max_variance)

    def at(self, eta: float, variance: str, max_covariance: float | None) -> PlannedStep:
        """This step with its coefficients at ``eta`` (not for the last step)."""
        kernel = self.kernel(eta, variance, max_covariance)
        return replace(self, x0_coeff=kernel.x0_coeff, sample_coeff=kernel.sample_coeff, std=math.sqrt(kernel.variance))


def plan_steps(
    levels: Sequence[int],
    log_alpha_bar: torch.Tensor,
    gamma: Sequence[float | None],
    eta: float,
    variance: str,
    max_covariance: float | None,
    pixel_bound: float | None,
) -> list[PlannedStep]:
    """The steps of a trajectory, one per model call, with their coefficients as floats.

    Args:
        levels: the trajectory's table levels, strictly decreasing; the last step goes from ``levels[-1]`` to the
            data (``x0_hat`` without noise).
        log_alpha_bar: ``log alpha_bar`` at every level of the table, float64.
        gamma: ``Gamma`` at each of ``levels`` (``None`` where unknown: not with the analytic variance).
        eta, variance, max_covariance: as in :func:`step_kernel`.
        pixel_bound: the pixel rule's bound on the variance of the step onto ``levels[-1]``, or ``None``.
    """
    steps: list[PlannedStep] = []
    for index, level in enumerate(levels):
        log_t = log_alpha_bar[level]
        alpha, sigma = float(log_t.mul(0.5).exp()), float((-torch.expm1(log_t)).sqrt())
        if index == len(levels) - 1:
            steps.append(PlannedStep(level, None, alpha, sigma, None, gamma[index], None, 1.0, 0.0, 0.0))
            continue
        target = levels[index + 1]
        tensors = level_pairs(log_t, log_alpha_bar[target])
        pair = LevelPair(**{f.name: float(getattr(tensors, f.name)) for f in fields(LevelPair)})
        max_variance = pixel_bound if index == len(levels) - 2 else None
        step = PlannedStep(level, target, alpha, sigma, pair, gamma[index], max_variance, 0.0, 0.0, 0.0)
        steps.append(step.at(eta, variance, max_covariance))
    return steps


def to_gaussian_steps(
    steps: Sequence[PlannedStep],
    timesteps: Sequence[float],
    log_alpha_bar: torch.Tensor,
    eta: float,
    variance: str,
    max_covariance: float | None,
    gamma: Sequence[float] | None = None,
) -> list[GaussianStep]:
    """The reverse kernels of planned ``steps`` as :class:`sdekit.bound.GaussianStep`, the decoder last.

    Args:
        steps: from :func:`plan_steps`.
        timesteps: the model's timestep input at each step.
        log_alpha_bar: ``log alpha_bar`` at every level of the table (for the ``beta_tilde`` decoder).
        eta, variance, max_covariance: as in :func:`step_kernel`; the decoder's variance is in the module
            docstring.
        gamma: ``Gamma`` at each step's level, replacing the planned values (the analytic variance needs them all);
            default ``None``, the planned values.
    """
    out: list[GaussianStep] = []
    for index, (step, timestep) in enumerate(zip(steps, timesteps)):
        if gamma is not None:
            step = replace(step, gamma=gamma[index])
        if step.target is not None:
            kernel = step.kernel(eta, variance, max_covariance)
            prev = steps[index + 1]
            out.append(
                GaussianStep(
                    timestep,
                    step.alpha,
                    step.sigma,
                    prev.alpha,
                    prev.sigma,
                    kernel.x0_coeff,
                    kernel.sample_coeff,
                    kernel.variance,
                    kernel.posterior_variance,
                )
            )
            continue
        if variance == "analytic":
            covariance = step.sigma**2 / step.alpha**2 * (1 - step.gamma)
            decoder = min(covariance, max_covariance) if max_covariance is not None else covariance
        elif variance == "beta":
            decoder = step.sigma**2
        else:
            above = level_pairs(log_alpha_bar[step.level + 1], log_alpha_bar[step.level])
            decoder = float(above.bbar_s / above.bbar_t * above.beta_ts)
        out.append(GaussianStep(timestep, step.alpha, step.sigma, 1.0, 0.0, 1.0, 0.0, decoder, 0.0))
    return out
