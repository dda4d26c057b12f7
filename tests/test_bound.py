"""``sdekit.nll_bound`` and its pieces, on a hand-written Gaussian reverse process (no sampler plugin)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from sdekit.bound import (
    GaussianReverseProcess,
    GaussianStep,
    discretized_gaussian_log_likelihood,
    nll_bound,
)
from sdekit.models import model_device_dtype, model_prediction
from sdekit.testing import GaussianMixture, epsilon_oracle
from sdekit_sdes import VPSDE

LEVELS = [999, 600, 250, 40, 0]


def _abar(level: int) -> float:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return float(torch.prod(1 - betas[: level + 1]))


class _DDPMProcess:
    """DDPM's posterior kernels (Ho et al. eq. 7) on ``LEVELS``, reverse variance ``beta_{t|s}`` (or a multiple of
    the posterior's), written out by hand: a stand-in for any plugin implementing the protocol."""

    def __init__(self, posterior_scale: float = 1.0) -> None:
        self.config = {"prediction_type": "epsilon"}
        self.init_noise_sigma = 1.0
        self.posterior_scale = posterior_scale

    def gaussian_steps(self, variance: str | None = None, eta: float | None = None) -> list[GaussianStep]:
        steps = []
        for t, s in zip(LEVELS, LEVELS[1:]):
            a_t, a_s = _abar(t), _abar(s)
            beta = 1 - a_t / a_s
            steps.append(
                GaussianStep(
                    timestep=t,
                    alpha=a_t**0.5,
                    sigma=(1 - a_t) ** 0.5,
                    alpha_prev=a_s**0.5,
                    sigma_prev=(1 - a_s) ** 0.5,
                    x0_coeff=a_s**0.5 * beta / (1 - a_t),
                    sample_coeff=(1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t),
                    variance=beta,
                    posterior_variance=self.posterior_scale * (1 - a_s) / (1 - a_t) * beta,
                )
            )
        a_0 = _abar(0)
        steps.append(GaussianStep(0, a_0**0.5, (1 - a_0) ** 0.5, 1.0, 0.0, 1.0, 0.0, 1 - a_0, 0.0))
        return steps


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    return (-0.5 * ((x - mean) ** 2 / var + math.log(2 * math.pi * var))).sum(1)


def test_discretised_gaussian_is_a_distribution_and_matches_the_cdf() -> None:
    grid = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(-1.2, 0.01), (-0.3, 0.5), (0.999, 1e-3), (3.0, 0.2), (0.1, 1e-4)]:
        log_p = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean), std)
        assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-12)
        edges = (grid.numpy()[1:-1, None] + [-1 / 255, 1 / 255] - mean) / std
        expected = norm.cdf(edges[:, 1]) - norm.cdf(edges[:, 0])
        inside = expected > 1e-300
        assert torch.allclose(log_p[1:-1][inside].exp(), torch.tensor(expected[inside]), rtol=1e-9, atol=1e-300)
    # Far in the tails the log-probability stays finite and right (scipy's log survival function).
    far = discretized_gaussian_log_likelihood(torch.tensor([1.0]), torch.tensor([0.0]), 0.01)
    assert float(far) == pytest.approx(norm.logsf((1 - 1 / 255) / 0.01), rel=1e-9)
    middle = discretized_gaussian_log_likelihood(torch.tensor([0.5]), torch.tensor([0.0]), 0.02)
    assert math.isfinite(float(middle)) and float(middle) < -250


def test_bound_equals_the_log_ratio_over_the_inference_chain() -> None:
    """The closed-form KL decomposition equals ``E_q[log q(x_{1:K} | x_0) - log p(x_{0:K})]`` estimated by sampling
    the whole inference chain (prior, every step and the decoder), within Monte Carlo error."""
    sde = VPSDE(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    mix = GaussianMixture(means=torch.tensor([[0.2, -0.3], [-0.4, 0.1]]), stds=torch.tensor([0.3, 0.2]))
    model = epsilon_oracle(mix, sde)
    process = _DDPMProcess()
    assert isinstance(process, GaussianReverseProcess)
    gen = torch.Generator().manual_seed(0)
    m = 20_000
    x0 = ((mix.sample(m, gen, dtype=torch.float64).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    bound = nll_bound(model, process, x0, generator=torch.Generator().manual_seed(1))
    assert bound.shape == (m,) and bound.dtype == torch.float64

    steps = process.gaussian_steps()
    first = steps[0]
    x = first.alpha * x0 + first.sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    ratio = _gaussian_log_density(x, first.alpha * x0, first.sigma**2) - _gaussian_log_density(x, 0 * x, 1.0)
    for step in steps:
        eps = model(x.float(), torch.tensor(step.timestep)).sample.double()
        x0_hat = ((x - step.sigma * eps) / step.alpha).clamp(-1, 1)
        if step.is_decoder:
            low = torch.where(x0 <= -1 + 1e-9, -torch.inf, x0 - 1 / 255).numpy()
            high = torch.where(x0 >= 1 - 1e-9, torch.inf, x0 + 1 / 255).numpy()
            std = step.variance**0.5
            mass = norm.cdf((high - x0_hat.numpy()) / std) - norm.cdf((low - x0_hat.numpy()) / std)
            ratio -= torch.tensor(mass).log().sum(1)
            continue
        mean_q = step.x0_coeff * x0 + step.sample_coeff * x
        mean_p = step.x0_coeff * x0_hat + step.sample_coeff * x
        x_prev = mean_q + step.posterior_variance**0.5 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        ratio += _gaussian_log_density(x_prev, mean_q, step.posterior_variance)
        ratio -= _gaussian_log_density(x_prev, mean_p, step.variance)
        x = x_prev
    sampled = ratio / (2 * math.log(2))
    error = math.hypot(float(sampled.std()), float(bound.std())) / math.sqrt(m)
    assert abs(float(bound.mean()) - float(sampled.mean())) < 4 * error, (float(bound.mean()), float(sampled.mean()))


def test_bad_input_and_model_outputs() -> None:
    sde = VPSDE(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    model = epsilon_oracle(GaussianMixture(means=torch.zeros(1, 2), stds=torch.tensor([0.3])), sde)
    grid = torch.tensor([[-1.0, 1 / 255]])
    assert nll_bound(model, _DDPMProcess(), grid).shape == (1,)
    with pytest.raises(ValueError, match="off that grid; quantise it first"):
        nll_bound(model, _DDPMProcess(), torch.tensor([[0.1, 0.2]]))
    with pytest.raises(ValueError, match=r"must lie in data_range=\(-1.0, 1.0\)"):
        nll_bound(model, _DDPMProcess(), torch.tensor([[3.0, 0.0]]))
    with pytest.raises(ValueError, match="step 0 .* inference variance 0 .*eta = 0 makes it infinite"):
        nll_bound(model, _DDPMProcess(posterior_scale=0.0), grid)
    x = torch.zeros(2, 3)
    out = torch.ones(2, 3)
    assert model_prediction(lambda s, t: out, x, 5) is out
    assert model_prediction(lambda s, t: (out, None), x, 5) is out
    assert model_prediction(model, torch.zeros(2, 2), torch.tensor(5)).shape == (2, 2)
    with pytest.raises(TypeError, match="expected a tensor, a tuple"):
        model_prediction(lambda s, t: {"sample": out}, x, 5)
    with pytest.raises(ValueError, match=r"returned shape \(2, 6\) for an input of shape \(2, 3\)"):
        model_prediction(lambda s, t: torch.ones(2, 6), x, 5, expect_shape=True)
    assert model_device_dtype(lambda s, t: s, torch.zeros(1, dtype=torch.int64)) == (
        torch.device("cpu"),
        torch.float32,
    )
