"""Plain sampling loops over an SDE and a score function (k-diffusion style: no hidden state).

These integrate the reverse SDE or the probability-flow ODE on the uniform grid ``t_i`` from ``T`` down to
``sampling_eps`` (score-SDE, appendix C / D). The diffusers schedulers in the plugins are the way to sample
with a model inside a pipeline; these functions are the reference they are checked against, and the way to
sample from a bare ``score_fn``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .parametrization import check_choice
from .sde import SDE, ScoreFn

SDE_METHODS = ("euler_maruyama", "reverse_diffusion")
ODE_METHODS = ("euler", "heun")

__all__ = ["ODE_METHODS", "SDE_METHODS", "check_finite", "sample_probability_flow", "sample_reverse_sde", "time_grid"]


def time_grid(sde: SDE, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``num_steps + 1`` times from ``T`` down to ``sde.sampling_eps`` (float64), evenly spaced."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    return torch.linspace(sde.T, sde.sampling_eps, num_steps + 1, dtype=torch.float64, device=device)


def check_finite(x: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``x``, or raise ``FloatingPointError`` if it holds NaN or Inf (one host sync)."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(
            f"{what} produced NaN or Inf values; check the score model's outputs and the step count."
        )
    return x


def sample_reverse_sde(
    sde: SDE,
    score_fn: ScoreFn,
    shape: Sequence[int],
    num_steps: int,
    method: str = "euler_maruyama",
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample by integrating the reverse-time SDE (score-SDE eq. 6) from the prior.

    Args:
        sde: the forward SDE.
        score_fn: ``score_fn(x, t)`` with ``t`` one value per sample.
        shape: output shape, batch first.
        num_steps: number of steps, one score evaluation each.
        method: ``euler_maruyama`` (score-SDE eq. 6 with Euler-Maruyama) or ``reverse_diffusion`` (the reverse of
            the SDE's own discretization, score-SDE eq. 46: ancestral sampling for DDPM / SMLD).
        denoise: return the last step's mean, without its noise (the reference code's ``noise_removal``).
        generator, device, dtype: randomness and placement of the samples.
    """
    check_choice("method", method, SDE_METHODS)
    grid = time_grid(sde, num_steps, device)
    reverse = sde.reverse(score_fn)
    x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(num_steps):
        t, dt = grid[i] * ones, float(grid[i] - grid[i + 1])
        if method == "euler_maruyama":
            drift, diffusion = reverse.sde(x, t)
            mean, scale = x - drift * dt, diffusion * dt**0.5
        else:
            rev_f, rev_g = reverse.discretize(x, t, dt)
            mean, scale = x - rev_f, rev_g
        if denoise and i == num_steps - 1:
            x = mean
        else:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = mean + scale * noise
    return check_finite(x, "sample_reverse_sde")


def sample_probability_flow(
    sde: SDE,
    score_fn: ScoreFn,
    shape: Sequence[int] | None = None,
    num_steps: int = 100,
    method: str = "heun",
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sample by integrating the probability-flow ODE (score-SDE eq. 13) from ``T`` to ``sampling_eps``.

    Args:
        sde, score_fn: as for :func:`sample_reverse_sde`.
        shape: output shape; or give the starting point ``x_T`` instead (deterministic decoding).
        num_steps: number of steps; ``euler`` evaluates the score once a step, ``heun`` (2nd order) twice,
            except on the last step.
        method: ``euler`` or ``heun``.
        generator, device, dtype: for drawing ``x_T`` from the prior.
    """
    check_choice("method", method, ODE_METHODS)
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape (to draw x_T from the prior) and x_T.")
    grid = time_grid(sde, num_steps, device if x_T is None else x_T.device)
    flow = sde.reverse(score_fn, probability_flow=True)
    x = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype) if x_T is None else x_T
    ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(num_steps):
        dt = float(grid[i] - grid[i + 1])
        d1 = flow.sde(x, grid[i] * ones)[0]
        x_next = x - d1 * dt
        if method == "heun" and i < num_steps - 1:
            d2 = flow.sde(x_next, grid[i + 1] * ones)[0]
            x_next = x - 0.5 * (d1 + d2) * dt
        x = x_next
    return check_finite(x, "sample_probability_flow")
