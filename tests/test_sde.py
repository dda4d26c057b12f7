"""The built-in SDEs: closed forms against simulation, the DDPM table, shapes, dtypes and bad parameters."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import DDPMScheduler

from sdekit.sde import broadcast_time, gaussian_log_prob
from sdekit_sdes import VESDE, VPSDE, SubVPSDE, ddpm_betas


def _simulate_forward(sde, x0: torch.Tensor, t_end: float, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Euler-Maruyama on the forward SDE, independent of marginal_prob."""
    x = x0.clone()
    dt = t_end / steps
    for i in range(steps):
        drift, diffusion = sde.sde(x, i * dt)
        x = x + drift * dt + diffusion * math.sqrt(dt) * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x


@pytest.mark.parametrize("t_end", [0.3, 1.0])
def test_marginal_prob_matches_simulated_forward_sde(any_sde, t_end: float) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 20000
    x0 = torch.tensor([1.5, -0.5], dtype=torch.float64).expand(n, 2).clone()
    start = x0
    if isinstance(any_sde, VESDE):
        # The VE kernel's std is sigma(t): the data at t = 0 carries N(0, sigma_min^2) noise.
        start = x0 + any_sde.sigma_min * torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    x = _simulate_forward(any_sde, start, t_end, 1000, gen)
    mean, std = any_sde.marginal_prob(x0, t_end)
    sim_std = x.std(dim=0)
    assert torch.allclose(x.mean(dim=0), mean[0], atol=5 * float(std) / math.sqrt(n) + 0.01)
    assert torch.allclose(sim_std, torch.full_like(sim_std, float(std)), rtol=0.03)


def test_vp_mean_coefficient_closed_form() -> None:
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = -(t**2) * (20.0 - 0.1) / 4 - t * 0.1 / 2
    assert torch.allclose(sde.log_mean_coeff(t), expected)
    alpha, std = sde.marginal_coeffs(t)
    assert torch.allclose(std, torch.sqrt(1 - torch.exp(2 * expected)))
    sub_alpha, sub_std = SubVPSDE().marginal_coeffs(t)
    assert torch.allclose(sub_alpha, alpha)
    assert torch.allclose(sub_std, 1 - torch.exp(2 * expected))
    assert torch.all(sub_std[1:] < std[1:])


def test_subvp_diffusion_formula() -> None:
    sde = SubVPSDE(beta_min=0.1, beta_max=20.0)
    t = torch.linspace(0.01, 1, 7, dtype=torch.float64)
    beta = 0.1 + t * 19.9
    expected = torch.sqrt(beta * (1 - torch.exp(-2 * 0.1 * t - 19.9 * t**2)))
    _, diffusion = sde.sde(torch.zeros(7, 3, dtype=torch.float64), t)
    assert torch.allclose(diffusion.flatten(), expected)


def test_ve_closed_forms() -> None:
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(sde.sigma(t), 0.01 * (5000.0**t))
    _, g = sde.sde(torch.zeros(3, 1, dtype=torch.float64), t)
    assert torch.allclose(g.flatten(), sde.sigma(t) * math.sqrt(2 * math.log(5000.0)))
    assert torch.allclose(sde.t_from_sigma(sde.sigma(t)), t)


@pytest.mark.parametrize(
    "schedule,start,end",
    [
        ("linear", 1e-4, 0.02),
        ("scaled_linear", 0.00085, 0.012),
        ("squaredcos_cap_v2", 1e-4, 0.02),
        ("sigmoid", 1e-4, 0.02),
    ],
)
def test_discrete_vp_matches_ddpm_table(schedule: str, start: float, end: float) -> None:
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, beta_start=start, beta_end=end)
    sde = VPSDE(num_train_timesteps=1000, beta_schedule=schedule, beta_start=start, beta_end=end)
    assert sde.N == 1000
    betas = ref.betas.to(torch.float64)
    assert torch.equal(ddpm_betas(1000, start, end, schedule), betas)
    table = torch.cumprod(1 - betas, dim=0)
    t = torch.arange(1000, dtype=torch.float64) / 999
    assert torch.allclose(sde.alpha_bar(t), table, rtol=1e-12, atol=0)
    # DDPM float32 table agrees to float32 precision.
    assert torch.allclose(sde.alpha_bar(t).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    # Between entries log alpha_bar is linear.
    mid = (torch.arange(999, dtype=torch.float64) + 0.5) / 999
    assert torch.allclose(sde.log_alpha_bar(mid), 0.5 * (table[:-1].log() + table[1:].log()))
    # The DDPM step between adjacent entries (and into entry 0 from the clean data) has the table's beta.
    x = torch.zeros(1000, 1, dtype=torch.float64)
    f, G = sde.discretize(x + 1, t, dt=1 / 999)
    assert torch.allclose(G.flatten() ** 2, betas, rtol=1e-9)
    assert torch.allclose(f.flatten(), torch.sqrt(1 - betas) - 1, rtol=1e-9)


def test_discrete_beta_is_the_rate_of_log_alpha_bar() -> None:
    sde = VPSDE(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    t = torch.linspace(0.013, 0.987, 40, dtype=torch.float64)
    h = 1e-7
    numeric = -(sde.log_alpha_bar(t + h) - sde.log_alpha_bar(t - h)) / (2 * h)
    assert torch.allclose(sde.beta(t), numeric, rtol=1e-5)


def test_trained_betas_and_reference_discretizations() -> None:
    betas = torch.linspace(1e-3, 0.2, 10, dtype=torch.float64)
    sde = VPSDE(trained_betas=betas)
    assert sde.N == 10
    assert torch.allclose(sde.alpha_bar(torch.tensor(1.0, dtype=torch.float64)), torch.prod(1 - betas))
    ve = VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
    grid = torch.arange(10, dtype=torch.float64) / 9
    sigmas = ve.sigma(grid)
    _, G = ve.discretize(torch.zeros(10, 1, dtype=torch.float64), grid, dt=1 / 9)
    expected = torch.sqrt(sigmas**2 - torch.cat([torch.zeros(1, dtype=torch.float64), sigmas[:-1]]) ** 2)
    assert torch.allclose(G.flatten(), expected)


def test_trained_betas_of_another_length_follow_diffusers_with_a_warning() -> None:
    """diffusers takes trained_betas as the table whatever num_train_timesteps says, and timestep k reads entry k."""
    betas = [0.1, 0.2, 0.3]
    warning = r"trained_betas has 3 entries but num_train_timesteps=5.*repeat its last beta"
    with pytest.warns(UserWarning, match=warning):
        longer = VPSDE(num_train_timesteps=5, trained_betas=betas)
    assert longer.N == 5 and longer.is_discrete
    levels = torch.arange(5, dtype=torch.float64) / 4
    expected = torch.cumprod(1 - torch.tensor([0.1, 0.2, 0.3, 0.3, 0.3], dtype=torch.float64), 0)
    assert torch.allclose(longer.alpha_bar(levels), expected, rtol=1e-12)
    with pytest.warns(UserWarning, match="entries past 1 are unused"):
        shorter = VPSDE(num_train_timesteps=2, trained_betas=betas)
    assert shorter.N == 2
    assert torch.allclose(shorter.alpha_bar(torch.tensor([0.0, 1.0], dtype=torch.float64)), expected[:2], rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VPSDE(num_train_timesteps=3, trained_betas=betas).N == 3  # agreeing lengths: no warning
    with pytest.raises(ValueError, match="num_train_timesteps"):
        VPSDE(num_train_timesteps=1, trained_betas=betas)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_shape_per_sample_time_and_dtype(any_sde, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 5, generator=gen).to(dtype)
    t = torch.tensor([0.2, 0.5, 0.9])
    drift, diffusion = any_sde.sde(x, t)
    mean, std = any_sde.marginal_prob(x, t)
    f, G = any_sde.discretize(x, t, 0.01)
    for value in (drift, mean, f):
        assert value.shape == x.shape and value.dtype == dtype
    for value in (diffusion, std, G):
        assert value.shape == (3, 1, 1, 1) and value.dtype == dtype
    for i in range(3):
        mean_i, std_i = any_sde.marginal_prob(x[i : i + 1], float(t[i]))
        assert torch.allclose(mean_i.float(), mean[i : i + 1].float(), rtol=1e-2, atol=1e-3)
        assert torch.allclose(std_i.float(), std[i].float().flatten(), rtol=1e-2)
    assert any_sde.marginal_prob(x[:, 0, 0, 0], t)[0].shape == (3,)  # a 1-d batch of scalars


def test_prior_sampling_and_logp(any_sde) -> None:
    z = any_sde.prior_sampling((4000, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, prior_std = any_sde.marginal_prob(torch.zeros(1, dtype=torch.float64), 1.0)
    expected_std = any_sde.sigma_max if isinstance(any_sde, VESDE) else 1.0
    assert abs(z.std().item() - expected_std) / expected_std < 0.03
    ref = torch.distributions.Normal(0.0, expected_std).log_prob(z).sum(dim=1)
    assert torch.allclose(any_sde.prior_logp(z), ref)
    assert torch.allclose(gaussian_log_prob(z[:5], 2.0), torch.distributions.Normal(0.0, 2.0).log_prob(z[:5]).sum(1))
    # The prior really is the marginal at T (up to the data's vanishing contribution).
    assert abs(float(prior_std) - expected_std) / expected_std < 0.01


def test_same_generator_same_prior_sample(any_sde) -> None:
    a = any_sde.prior_sampling((2, 3), generator=torch.Generator().manual_seed(5))
    b = any_sde.prior_sampling((2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_broadcast_time_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"one value per sample.*\(4,\)"):
        broadcast_time(torch.ones(3), torch.zeros(4, 2))


@pytest.mark.parametrize(
    "factory,param",
    [
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (lambda: VESDE(sigma_min=-0.1), "sigma_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min"),
        (lambda: VPSDE(beta_min=5.0, beta_max=1.0), "beta_max"),
        (lambda: SubVPSDE(beta_min=-0.1), "beta_min"),
        (lambda: VPSDE(beta_max=float("nan")), "beta_max"),
        (lambda: VPSDE(N=0), "N"),
        (lambda: VPSDE(sampling_eps=1.0), "sampling_eps"),
        (lambda: VPSDE(num_train_timesteps=10, beta_schedule="cosine"), "beta_schedule"),
        (lambda: VPSDE(num_train_timesteps=1), "num_train_timesteps"),
        (lambda: VPSDE(beta_start=-1e-4, beta_end=0.02), "beta_start"),
        (lambda: VPSDE(trained_betas=[0.1, 1.5]), "beta"),
        (lambda: VPSDE(beta_min=0.1, num_train_timesteps=1000), "not both"),
    ],
)
def test_bad_parameters_raise_value_error_naming_them(factory, param: str) -> None:
    with pytest.raises(ValueError, match=param):
        factory()
