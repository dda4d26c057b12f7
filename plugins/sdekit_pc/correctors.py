"""Correctors: Langevin MCMC steps at a fixed noise level ``t``, driven by the score.

A Langevin step is ``x + eps s(x, t) + sqrt(2 eps) z`` with ``z ~ N(0, I)``. The two correctors differ in the
step size ``eps``:

* ``langevin`` (score-SDE, Song et al. 2021, appendix G, Algorithms 4 and 5): ``eps = 2 alpha (r ||z|| / ||s||)^2``
  with the signal-to-noise ratio ``r = snr``, set from the norms of this step's noise and score;
* ``ald``, annealed Langevin dynamics (NCSN; Song & Ermon 2019, Algorithm 1, whose step is proportional to
  ``sigma_i^2``), in the score-SDE reference code's form ``eps = 2 alpha (r sigma(t))^2``.

``alpha`` is the reference code's factor for VP-type SDEs, ``1 - beta_i`` of the step (1 for VE); see
:func:`langevin_alpha`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sdekit.sde import SDE

from .linear import linear_discretization

__all__ = [
    "CORRECTORS",
    "NORMS",
    "ald_step_size",
    "langevin_alpha",
    "langevin_step_size",
    "langevin_update",
    "sample_norms",
]

CORRECTORS = ("langevin", "ald", "none")
NORMS = ("per_sample", "batch")


def langevin_alpha(sde: SDE, times: Sequence[float], dt: float | Sequence[float] | None = None) -> list[float]:
    """``alpha_i = (1 + a_i)^2`` per time, with ``a_i x`` the drift of the step ``sde.discretize(x, t_i, dt)``.

    The squared mean factor of the forward chain's step into level ``i``: for VP ``1 - b_i`` with ``b_i = 1 -
    alpha_bar(t_i) / alpha_bar(t_i - dt)``, DDPM's ``alpha_i`` (what the reference code uses, score-SDE
    Algorithm 5, with ``dt = 1 / N``); 1 for VE (no drift). For sub-VP, whose drift ``-beta(t) x / 2`` is VP's, the
    Euler-Maruyama chain gives ``(1 - beta(t) dt / 2)^2``, VP's value to first order.

    The sampler passes the grid's actual step down from each level (``t_i - t_{i+1}``), so that a coarse grid,
    whose steps contract ``x`` by far more than one training step does, takes correspondingly smaller Langevin
    steps: the score-SDE Algorithm 5 step size with ``alpha`` read off the step the predictor is about to take.

    Args:
        sde: a linear-drift SDE.
        times: the times.
        dt: the step length, one for all times or one per time; ``None`` takes the SDE's own (``T / N``).
    """
    drifts, _ = linear_discretization(sde, times, dt)
    return [(1.0 + a) ** 2 for a in drifts]


def sample_norms(x: torch.Tensor, norm: str) -> torch.Tensor:
    """L2 norms over all non-batch dimensions: per sample, shaped ``(B, 1, ..., 1)``, or their batch mean (0-d).

    Args:
        x: a batch, batch first.
        norm: ``per_sample`` or ``batch`` (the score-SDE reference code's batch-averaged norm).
    """
    norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    if norm == "batch":
        return norms.mean()
    return norms.reshape((-1,) + (1,) * (x.ndim - 1))


def langevin_step_size(
    score: torch.Tensor, noise: torch.Tensor, snr: float, alpha: float, norm: str = "per_sample"
) -> torch.Tensor:
    """``eps = 2 alpha (snr ||z|| / ||s||)^2`` (score-SDE appendix G, Algorithms 4 and 5).

    Args:
        score: the score ``s(x, t)``.
        noise: this step's ``z``.
        snr: the signal-to-noise ratio ``r``.
        alpha: see :func:`langevin_alpha`.
        norm: ``per_sample`` (default; one step size per sample) or ``batch`` (one for the batch).
    """
    ratio = snr * sample_norms(noise, norm) / sample_norms(score, norm)
    return 2.0 * alpha * ratio**2


def ald_step_size(snr: float, sigma: float, alpha: float) -> float:
    """``eps = 2 alpha (snr sigma)^2``: annealed Langevin dynamics' step at noise level ``sigma``.

    For a Gaussian, ``||s|| ~ ||z|| / sigma``, so this is the ``langevin`` step size with the norms replaced
    by their typical ratio.

    Args:
        snr: the signal-to-noise ratio ``r``.
        sigma: the kernel std ``sigma(t)``.
        alpha: see :func:`langevin_alpha`.
    """
    return 2.0 * alpha * (snr * sigma) ** 2


def langevin_update(
    x: torch.Tensor, score: torch.Tensor, noise: torch.Tensor, step_size: torch.Tensor | float, add_noise: bool = True
) -> torch.Tensor:
    """``x + eps s + sqrt(2 eps) z``; with ``add_noise=False`` only the mean ``x + eps s``.

    Args:
        x: the current sample.
        score: the score at ``x``.
        noise: ``z``.
        step_size: ``eps``, a number or a tensor that broadcasts against ``x``.
        add_noise: add the noise term (default True).
    """
    mean = x + step_size * score
    if not add_noise:
        return mean
    return mean + (2.0 * step_size) ** 0.5 * noise
