"""The variational bound on the negative log-likelihood of a Gaussian reverse process, in bits per dimension.

Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020 (below "DDPM"), eq. 5, on a
trajectory ``tau_1 < ... < tau_K`` of noise levels as in Bao, Li, Zhu & Zhang, "Analytic-DPM", ICLR 2022
(below "Analytic-DPM"), eq. 2 and section 4:

    L = KL(q(x_{tau_K} | x_0) || p(x_{tau_K}))
        + sum_{k=2..K} E_q KL(q(x_{tau_{k-1}} | x_{tau_k}, x_0) || p(x_{tau_{k-1}} | x_{tau_k}))
        - E_q log p(x_0 | x_{tau_1}).

A sampler takes part by exposing its reverse kernels through the :class:`GaussianReverseProcess` protocol: a
method ``gaussian_steps(variance=None, eta=None)`` returning one :class:`GaussianStep` per model evaluation, in
sampling order, the last one being the decoder onto the data. Every kernel is an isotropic Gaussian whose mean is
affine in the model's ``x_0`` estimate and the current sample, the form of DDPM eq. 7 and its DDIM generalisation
(Song et al. 2021, eq. 7): then ``q``'s kernel has the same mean with the true ``x_0`` and the KL is closed form.
Nothing here depends on a particular sampler plugin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers.utils.torch_utils import randn_tensor

from .models import model_device_dtype, model_prediction
from .parametrization import split_model_output

__all__ = [
    "GaussianReverseProcess",
    "GaussianStep",
    "discretized_gaussian_log_likelihood",
    "nll_bound",
]


@dataclass(frozen=True)
class GaussianStep:
    """One Gaussian step of a reverse process, from a noise level ``t`` to a lower level ``s`` (or the data).

    The forward kernels are ``x_t = alpha x_0 + sigma eps`` and ``x_s = alpha_prev x_0 + sigma_prev eps``. The
    inference distribution of the bound and the model's reverse kernel share one mean form:

        q(x_s | x_t, x_0) = N(x0_coeff * x_0     + sample_coeff * x_t, posterior_variance I),
        p(x_s | x_t)      = N(x0_coeff * x0_hat  + sample_coeff * x_t, variance I),

    with ``x0_hat`` the model's estimate of ``x_0`` at ``(x_t, timestep)``. The decoder, the last step, lands on
    the data: ``alpha_prev = 1``, ``sigma_prev = 0``, ``x0_coeff = 1``, ``sample_coeff = 0`` and
    ``posterior_variance = 0``; there ``variance`` is the decoder's (DDPM eq. 13 discretises it).

    Args:
        timestep: the model's timestep input at level ``t`` (an entry of the scheduler's ``timesteps``).
        alpha, sigma: the forward kernel's coefficients at ``t``.
        alpha_prev, sigma_prev: the forward kernel's coefficients at ``s``; 1 and 0 for the decoder.
        x0_coeff, sample_coeff: the mean's coefficients.
        variance: the reverse kernel's variance (per dimension).
        posterior_variance: the inference kernel's variance ``lambda^2`` (DDPM's ``beta_tilde`` for a DDPM-type
            process, ``eta^2 beta_tilde`` in DDIM's family; 0 for DDIM's deterministic member and the decoder).
    """

    timestep: float
    alpha: float
    sigma: float
    alpha_prev: float
    sigma_prev: float
    x0_coeff: float
    sample_coeff: float
    variance: float
    posterior_variance: float

    @property
    def is_decoder(self) -> bool:
        """Whether this step lands on the data (the discretised decoder of the bound)."""
        return self.sigma_prev == 0.0


@runtime_checkable
class GaussianReverseProcess(Protocol):
    """What :func:`nll_bound` needs from a scheduler.

    ``config["prediction_type"]`` says what the model returns (see :mod:`sdekit.parametrization`),
    ``init_noise_sigma`` is the prior's standard deviation (the prior is ``N(0, init_noise_sigma^2 I)``), and
    ``gaussian_steps`` returns the reverse kernels of the trajectory chosen by the last ``set_timesteps()``, in
    sampling order, one per model evaluation, the decoder last. ``variance`` and ``eta`` select among the
    scheduler's variance choices and DDIM noise scales; ``None`` means the scheduler's own configuration.
    """

    config: Any
    init_noise_sigma: float

    def gaussian_steps(self, variance: str | None = None, eta: float | None = None) -> list[GaussianStep]:
        """The trajectory's Gaussian reverse kernels, decoder last."""


def _log_normal_cdf_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``log(Phi(upper) - Phi(lower))`` for ``upper > lower``, accurate in both tails.

    Where both points lie above 0, the mass is computed on the mirrored interval ``(-upper, -lower)``, so the
    subtraction never cancels two numbers close to 1.
    """
    flip = lower > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp(log_lo - log_hi).clamp(max=1.0 - 1e-15))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: float | torch.Tensor,
    data_range: Sequence[float] = (-1.0, 1.0),
    num_bins: int = 256,
) -> torch.Tensor:
    """Element-wise ``log p(x)`` under a Gaussian discretised to ``num_bins`` bins over ``data_range`` (DDPM eq. 13).

    Bin ``k`` is centred on ``lo + k (hi - lo) / (num_bins - 1)``; the outermost bins extend to infinity, so the
    probabilities over the bins sum to 1.

    Args:
        x: values on the bin centres.
        mean: the Gaussian's mean, broadcastable against ``x``.
        std: its standard deviation (a number or a tensor broadcastable against ``x``), > 0.
        data_range: ``(lo, hi)``, default ``(-1, 1)``.
        num_bins: number of values the data takes, default 256 (8-bit data).
    """
    lo, hi = float(data_range[0]), float(data_range[1])
    half = 0.5 * (hi - lo) / (num_bins - 1)
    dtype = torch.promote_types(x.dtype, torch.float64)
    x, mean = x.to(dtype), mean.to(dtype)
    std = torch.as_tensor(std, dtype=dtype, device=x.device)
    upper = torch.where(x >= hi - half, torch.inf, (x + half - mean) / std)
    lower = torch.where(x <= lo + half, -torch.inf, (x - half - mean) / std)
    return _log_normal_cdf_difference(upper, lower)


def _check_8bit(x0: torch.Tensor, data_range: Sequence[float], num_bins: int) -> None:
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with lo < hi, got {tuple(data_range)!r}.")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}.")
    index = (x0.to(torch.float64) - lo) / (hi - lo) * (num_bins - 1)
    off_grid = (index - index.round()).abs().max()
    if not bool(torch.isfinite(index).all()) or float(index.min()) < -1e-6 or float(index.max()) > num_bins - 1 + 1e-6:
        raise ValueError(
            f"x0 must lie in data_range={tuple(data_range)}; got values from {float(x0.min()):.4g} to "
            f"{float(x0.max()):.4g}."
        )
    if float(off_grid) > 1e-3:
        raise ValueError(
            f"the bound's decoder is discretised for data taking {num_bins} values lo + k (hi - lo) / "
            f"{num_bins - 1} over data_range={tuple(data_range)}, but x0 is up to {float(off_grid):.3g} bins off "
            "that grid; quantise it first, e.g. x0 = ((x0 + 1) * 127.5).round() / 127.5 - 1 for 8-bit data in "
            "[-1, 1]."
        )


@torch.no_grad()
def nll_bound(
    model: Any,
    scheduler: GaussianReverseProcess,
    x0: torch.Tensor,
    variance: str | None = None,
    eta: float | None = None,
    generator: torch.Generator | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    num_bins: int = 256,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """Per-sample negative ELBO of the scheduler's ``K``-step reverse process, in bits per dimension.

    The trajectory is the one of the scheduler's last ``set_timesteps()`` (``K = len(gaussian_steps())`` model
    calls). Every KL term is evaluated at its own ``x_t ~ q(x_t | x_0)`` (one noise draw per term and sample, as
    DDPM does); the prior term is exact and the decoder is the discretised Gaussian of DDPM eq. 13. The bound is
    infinite when an inference kernel has zero variance (DDIM's ``eta = 0``): that raises ``ValueError``.

    Args:
        model: the noise-prediction network, ``model(x_t, timestep)`` returning a tensor, a tuple or an object
            with ``.sample``, of the scheduler's ``prediction_type``.
        scheduler: a scheduler implementing :class:`GaussianReverseProcess`, after ``set_timesteps()``.
        x0: data ``(B, ...)`` on the ``num_bins``-value grid of ``data_range`` (8-bit data by default).
        variance: the reverse variance choice passed to ``scheduler.gaussian_steps`` (for ``analytic-dpm``:
            ``analytic``, ``beta_tilde`` or ``beta``); default ``None``, the scheduler's own.
        eta: DDIM's noise scale passed to ``gaussian_steps``; default ``None``, the scheduler's own.
        generator: the source of the noise draws.
        data_range: ``(lo, hi)`` of the data; default ``(-1, 1)``.
        num_bins: number of values the data takes per dimension; default 256.
        clip_denoised: clip the model's ``x_0`` estimate to ``data_range`` (as DDPM's sampler does; it can only
            bring the estimate closer to data inside the range); default True.

    Returns:
        A float64 tensor ``(B,)``: the bound in bits per dimension, ``nats / (D ln 2)``.
    """
    _check_8bit(x0, data_range, num_bins)
    steps = scheduler.gaussian_steps(variance=variance, eta=eta)
    if not steps or not steps[-1].is_decoder:
        raise ValueError("scheduler.gaussian_steps() must end with the decoder step onto the data (sigma_prev = 0).")
    for index, step in enumerate(steps[:-1]):
        if step.is_decoder or step.posterior_variance <= 0 or step.variance <= 0:
            raise ValueError(
                f"step {index} (timestep {step.timestep}) has inference variance {step.posterior_variance:.3g} and "
                f"reverse variance {step.variance:.3g}; the bound needs both > 0 (DDIM's eta = 0 makes it "
                "infinite: use eta > 0, eta = 1 being DDPM)."
            )
    if steps[-1].variance <= 0:
        raise ValueError("the decoder's variance must be > 0 for a finite bound.")
    prediction_type = scheduler.config["prediction_type"]
    device, model_dtype = model_device_dtype(model, x0)
    x0 = x0.to(device=device, dtype=torch.float64)
    dim = x0[0].numel()
    lo, hi = float(data_range[0]), float(data_range[1])

    # Prior term: KL(N(alpha_T x0, sigma_T^2) || N(0, s^2)) per dimension, summed.
    first, prior_var = steps[0], float(scheduler.init_noise_sigma) ** 2
    mean_sq = (first.alpha * x0).pow(2).flatten(1).sum(1)
    nats = 0.5 * (dim * (first.sigma**2 / prior_var - 1 + math.log(prior_var / first.sigma**2)) + mean_sq / prior_var)

    for step in steps:
        noise = randn_tensor(x0.shape, generator=generator, device=device, dtype=torch.float64)
        x_t = step.alpha * x0 + step.sigma * noise
        output = model_prediction(model, x_t.to(model_dtype), step.timestep)
        x0_hat, _ = split_model_output(output.to(torch.float64), x_t, step.alpha, step.sigma, prediction_type)
        if clip_denoised:
            x0_hat = x0_hat.clamp(lo, hi)
        if step.is_decoder:
            log_p = discretized_gaussian_log_likelihood(x0, x0_hat, math.sqrt(step.variance), data_range, num_bins)
            nats = nats - log_p.flatten(1).sum(1)
        else:
            # KL of two isotropic Gaussians whose means differ by x0_coeff (x0 - x0_hat) (DDPM eq. 5's L_{t-1}).
            ratio = step.posterior_variance / step.variance
            sq = (step.x0_coeff * (x0 - x0_hat)).pow(2).flatten(1).sum(1)
            nats = nats + 0.5 * (dim * (ratio - 1 - math.log(ratio)) + sq / step.variance)
    return nats / (dim * math.log(2))
