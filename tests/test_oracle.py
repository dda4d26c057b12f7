"""The exact-score oracle and the metrics: checked against autograd, moments and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdekit.testing import (
    GaussianMixture,
    MixtureScoreModel,
    epsilon_oracle,
    frechet_distance,
    gaussian_frechet_distance,
    mixture_frechet_distance,
    mixture_frechet_floor,
    score_oracle,
    sliced_wasserstein,
)
from sdekit_sdes import VESDE, VPSDE


def _autograd_score(mix: GaussianMixture, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    mix.log_prob(x, alpha, sigma).sum().backward()
    return x.grad


@pytest.mark.parametrize("kind", ["full", "diag", "iso"])
def test_score_is_the_gradient_of_log_prob(kind: str, mixture_2d: GaussianMixture) -> None:
    gen = torch.Generator().manual_seed(0)
    if kind == "full":
        mix = mixture_2d
    elif kind == "diag":
        mix = GaussianMixture(
            torch.randn(4, 6, generator=gen, dtype=torch.float64), stds=torch.rand(4, 6, generator=gen) + 0.2
        )
    else:
        mix = GaussianMixture(
            torch.randn(3, 6, generator=gen), stds=torch.tensor([0.3, 0.5, 1.0]), event_shape=(1, 2, 3)
        )
    x = torch.randn((5,) + mix.event_shape, generator=gen, dtype=torch.float64) * 2
    alpha = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    sigma = torch.sqrt(1 - alpha**2)
    assert torch.allclose(mix.score(x, alpha, sigma), _autograd_score(mix, x, alpha, sigma), atol=1e-8)


def test_log_prob_against_torch_distributions(mixture_2d: GaussianMixture) -> None:
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(mixture_2d.weights),
        torch.distributions.MultivariateNormal(
            0.7 * mixture_2d.means, 0.49 * mixture_2d.component_covariances() + 0.3**2 * torch.eye(2)
        ),
    )
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(mixture_2d.log_prob(x, 0.7, 0.3), ref.log_prob(x))


def test_samples_have_the_mixture_moments(mixture_2d: GaussianMixture) -> None:
    x = mixture_2d.sample(200000, torch.Generator().manual_seed(2), dtype=torch.float64)
    assert torch.allclose(x.mean(0), mixture_2d.mean(), atol=0.02)
    assert torch.allclose(torch.cov(x.T), mixture_2d.covariance(), atol=0.03)


def test_epsilon_oracle_on_ddpm_timesteps_gives_the_posterior_mean() -> None:
    # One Gaussian N(m, s^2 I): E[x0 | x_t] = m + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha m).
    m, s = torch.tensor([[0.5, -1.0, 2.0, 0.0]]), 0.3
    mix = GaussianMixture(m, stds=torch.tensor([s]), event_shape=(1, 2, 2))
    sde = VPSDE(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    model = epsilon_oracle(mix, sde)
    ref = DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 400, 999])
    xt = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = model(xt, timesteps).sample
    assert model.num_calls == 1 and eps.shape == xt.shape and eps.dtype == xt.dtype
    abar = ref.alphas_cumprod.to(torch.float64)[timesteps].reshape(4, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x0_from_model = (xt - sigma * eps) / alpha
    mm = m.reshape(1, 1, 2, 2).to(torch.float64)
    posterior = mm + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (xt - alpha * mm)
    assert torch.allclose(x0_from_model, posterior, rtol=1e-4, atol=1e-5)
    # A scalar timestep applies to the whole batch; return_dict=False gives a tuple.
    (out,) = model(xt, 400, return_dict=False)
    assert torch.allclose(out[2], eps[2])


def test_score_oracle_takes_sigma() -> None:
    mix = GaussianMixture(torch.zeros(1, 3), stds=torch.tensor([1.0]))
    sde = VESDE()
    model = score_oracle(mix, sde)
    x = torch.ones(2, 3)
    sigma = torch.tensor([0.5, 10.0])
    out = model(x, sigma).sample
    assert torch.allclose(out, -x / (1 + sigma[:, None] ** 2))
    assert model.config.prediction_type == "score" and model.config.time_input == "sigma"


def test_oracle_model_behaves_like_a_module_and_rejects_bad_choices() -> None:
    mix = GaussianMixture(torch.zeros(1, 12), stds=torch.tensor([1.0]), event_shape=(3, 2, 2))
    model = MixtureScoreModel(mix, VPSDE(), prediction_type="v_prediction")
    assert model.config.in_channels == 3 and model.config.sample_size == 2
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.to(torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="prediction_type"):
        MixtureScoreModel(mix, VPSDE(), prediction_type="noise")


def test_mixture_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMixture(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.zeros(1, 2), covs=-torch.eye(2)[None])
    with pytest.raises(ValueError, match="event_shape"):
        GaussianMixture(torch.zeros(1, 4), stds=torch.ones(1), event_shape=(3,))


def test_frechet_distance_closed_forms() -> None:
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 1.0])
    expected = 1.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    got = gaussian_frechet_distance(torch.zeros(3), torch.diag(a), torch.tensor([1.0, 0, 0]), torch.diag(b))
    assert math.isclose(got, expected, rel_tol=1e-9)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(100000, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(100000, 3, generator=gen, dtype=torch.float64) + torch.tensor([2.0, 0.0, 0.0])
    assert math.isclose(frechet_distance(x, y), 4.0, rel_tol=0.02)
    assert frechet_distance(x, x) < 1e-9


def test_sliced_wasserstein() -> None:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 1, generator=gen, dtype=torch.float64)
    assert sliced_wasserstein(x, x, generator=gen) < 1e-12
    # In 1-d every projection is +-1, and W2 between a set and its shift by c is |c|.
    assert math.isclose(sliced_wasserstein(x, x + 0.5, generator=gen), 0.5, rel_tol=1e-9)
    with pytest.raises(ValueError, match="values per sample"):
        sliced_wasserstein(x, torch.zeros(10, 2))


def test_mixture_frechet_distance_and_floor(mixture_2d: GaussianMixture) -> None:
    gen = torch.Generator().manual_seed(6)
    x = mixture_2d.sample(1000, gen, dtype=torch.float64)
    whole = gaussian_frechet_distance(x.mean(0), torch.cov(x.T), mixture_2d.mean(), mixture_2d.covariance())
    assert math.isclose(mixture_frechet_distance(x, mixture_2d, chunk_size=1000), whole, rel_tol=1e-12)
    floor = mixture_frechet_floor(mixture_2d, 1000, chunk_size=100, generator=gen)
    assert 0 < floor < 0.5
    # A shifted set is far above the floor.
    assert mixture_frechet_distance(x + 0.5, mixture_2d, chunk_size=100) > 0.5 > floor
    with pytest.raises(ValueError, match="chunk_size"):
        mixture_frechet_distance(x, mixture_2d, chunk_size=2000)
