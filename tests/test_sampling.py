"""The reverse SDE and the probability-flow ODE, driven by the exact score, give back the mixture."""

from __future__ import annotations

import math

import pytest
import torch

from sdekit.sampling import sample_probability_flow, sample_reverse_sde
from sdekit.testing import GaussianMixture, MixtureScoreModel, mixture_frechet_distance, mixture_frechet_floor
from sdekit_sdes import VESDE, VPSDE, SubVPSDE

N_SAMPLES = 6000
SDES = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def _check_gives_back_mixture(mix: GaussianMixture, samples: torch.Tensor, gen: torch.Generator) -> None:
    """Frechet distance within 1.5x of the data-vs-data floor (chunked: see mixture_frechet_distance), and the
    mean log-density of the data within Monte Carlo error, so mode weights and shapes are right too."""
    floor = mixture_frechet_floor(mix, N_SAMPLES, generator=gen)
    fd = mixture_frechet_distance(samples, mix)
    assert fd <= 1.5 * floor, (fd, floor)
    data = mix.sample(N_SAMPLES, gen, dtype=torch.float64)
    logp, ref = mix.log_prob(samples.to(torch.float64)), mix.log_prob(data)
    assert abs(logp.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(N_SAMPLES) + 0.02


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("method", ["euler_maruyama", "reverse_diffusion"])
def test_reverse_sde_gives_back_the_mixture(name: str, method: str, mixture_2d: GaussianMixture) -> None:
    sde = SDES[name]()
    oracle = MixtureScoreModel(mixture_2d, sde)
    gen = torch.Generator().manual_seed(10)
    x = sample_reverse_sde(
        sde, oracle.score_fn, (N_SAMPLES, 2), 1000, method=method, generator=gen, dtype=torch.float64
    )
    _check_gives_back_mixture(mixture_2d, x, gen)


@pytest.mark.parametrize("name", list(SDES))
def test_probability_flow_gives_back_the_mixture(name: str, mixture_2d: GaussianMixture) -> None:
    sde = SDES[name]()
    oracle = MixtureScoreModel(mixture_2d, sde)
    gen = torch.Generator().manual_seed(11)
    x = sample_probability_flow(
        sde, oracle.score_fn, (N_SAMPLES, 2), 250, method="heun", generator=gen, dtype=torch.float64
    )
    _check_gives_back_mixture(mixture_2d, x, gen)


def test_the_check_fails_for_a_wrong_score(mixture_2d: GaussianMixture) -> None:
    """The criterion above has teeth: a score off by 20% does not pass it."""
    sde = VPSDE()
    oracle = MixtureScoreModel(mixture_2d, sde)
    gen = torch.Generator().manual_seed(12)
    x = sample_reverse_sde(
        sde, lambda x, t: 0.8 * oracle.score_fn(x, t), (N_SAMPLES, 2), 1000, generator=gen, dtype=torch.float64
    )
    with pytest.raises(AssertionError):
        _check_gives_back_mixture(mixture_2d, x, gen)


def test_probability_flow_is_deterministic_given_x_T(mixture_2d: GaussianMixture) -> None:
    sde = VPSDE()
    oracle = MixtureScoreModel(mixture_2d, sde)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    a = sample_probability_flow(sde, oracle.score_fn, x_T=x_T, num_steps=20, method="euler")
    b = sample_probability_flow(sde, oracle.score_fn, x_T=x_T, num_steps=20, method="euler")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one"):
        sample_probability_flow(sde, oracle.score_fn, (8, 2), x_T=x_T)


def test_bad_arguments_and_non_finite_output(mixture_2d: GaussianMixture) -> None:
    sde = VPSDE()
    with pytest.raises(ValueError, match="num_steps"):
        sample_reverse_sde(sde, lambda x, t: x, (4, 2), 0)
    with pytest.raises(ValueError, match="method.*euler_maruyama"):
        sample_reverse_sde(sde, lambda x, t: x, (4, 2), 5, method="euler")
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        sample_reverse_sde(sde, lambda x, t: torch.full_like(x, float("nan")), (4, 2), 5)
