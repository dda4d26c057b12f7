"""sdekit.flow_likelihood.likelihood on the exact mixture oracle.

The probability-flow ODE starts at ``sampling_eps`` (level 0 of a DDPM table, 1e-3 for continuous VP / sub-VP,
1e-5 for VE), where every SDE here has noise level ~0.01; so the exact target is the density of the data noised to
``sampling_eps``. Its gap to the clean density is <= 0.002 bits/dim for this mixture (noise variance 1e-4 against
a narrowest component variance of 0.01). The rest of the error is the prior term: ``prior_logp`` is not the exact
``p_T`` (VP: ``alpha_T ~ 7e-3``; VE: ``sigma_max = 50`` against data means of norm ~2), which moves single samples
by up to ~2e-3 (VP) and ~6e-3 (VE) bits/dim, and the solver error, checked separately with the exact ``p_T``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler

import sdekit
from sdekit.flow_likelihood import LikelihoodResult, likelihood
from sdekit.testing import GaussianMixture, MixtureScoreModel
from sdekit_sdes import VPSDE

CONFIGS = {
    "vp-ddpm": lambda: DDPMScheduler().config,
    "vp": lambda: {"sde": "vp", "sde_params": {"beta_min": 0.1, "beta_max": 20}},
    "subvp": lambda: {"sde": "subvp", "sde_params": {"beta_min": 0.1, "beta_max": 20}},
    "ve": lambda: {"sde": "ve"},
}
# Solver error alone (bits/dim, with the exact p_T in place of the prior): measured 2.4e-5 (VE) to 3.7e-5 (DDPM
# table) at rtol = atol = 1e-5. Integrated in t, the DDPM table's piecewise-constant beta(t) made it 2e-3; the
# scaled variables of sdekit.scaled_flow see no jumps.
SOLVER_TOL = 2e-4


def bits(log_p: torch.Tensor, dims: int) -> torch.Tensor:
    return -log_p / (dims * math.log(2))


def setup(mixture: GaussianMixture, name: str, prediction_type: str = "score"):
    scheduler = sdekit.load_scheduler("pf-ode", CONFIGS[name](), prediction_type=prediction_type)
    model = MixtureScoreModel(mixture, scheduler.sde, prediction_type=prediction_type, time_input=scheduler.time_input)
    model = model.to(torch.float64)  # the oracle computes in its own dtype, like a real model
    return scheduler, model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "score"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_bpd_matches_exact_log_density(mixture_2d: GaussianMixture, name: str, prediction_type: str) -> None:
    scheduler, model = setup(mixture_2d, name, prediction_type)
    sde = scheduler.sde
    x = mixture_2d.sample(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = likelihood(model, x, scheduler, trace="exact", rtol=1e-5, atol=1e-5)
    assert isinstance(result, LikelihoodResult)
    assert result.nll.shape == result.bpd.shape == result.nfe.shape == (3,) and result.z.shape == x.shape
    assert torch.allclose(result.bpd, result.nll / (2 * math.log(2)))
    assert (result.nfe > 0).all()

    clean = bits(mixture_2d.log_prob(x), 2)
    assert (result.bpd - clean).abs().max() < 0.01
    alpha, sigma = sde.marginal_coeffs(torch.tensor(sde.sampling_eps, dtype=torch.float64))
    noised = bits(mixture_2d.log_prob(x, alpha, sigma), 2)
    assert (result.bpd - noised).abs().max() < 0.01
    # The solver's own error: swap the prior term for the exact log p_T at the latent reached.
    alpha_T, sigma_T = sde.marginal_coeffs(torch.tensor(sde.T, dtype=torch.float64))
    mismatch = bits(sde.prior_logp(result.z), 2) - bits(mixture_2d.log_prob(result.z, alpha_T, sigma_T), 2)
    assert (result.bpd - mismatch - noised).abs().max() < SOLVER_TOL


def test_config_mapping_is_the_pf_ode_scheduler(mixture_2d: GaussianMixture) -> None:
    scheduler, model = setup(mixture_2d, "vp", "epsilon")
    x = mixture_2d.sample(2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    config = {**CONFIGS["vp"](), "prediction_type": "epsilon"}
    a = likelihood(model, x, scheduler, trace="exact")
    b = likelihood(model, x, config, trace="exact")
    assert torch.equal(a.nll, b.nll) and torch.equal(a.nfe, b.nfe)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(mixture_2d: GaussianMixture, noise: str) -> None:
    scheduler, model = setup(mixture_2d, "vp")
    x = mixture_2d.sample(1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = likelihood(model, x, scheduler, trace="exact").nll
    seeds = 24
    gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
    estimates = likelihood(model, x.expand(seeds, 2), scheduler, trace="hutchinson", noise=noise, generator=gens).nll
    mean, stderr = estimates.mean(), estimates.std() / math.sqrt(seeds)
    assert stderr > 1e-3  # the estimates do vary with the probe
    # Three standard errors: a one-standard-error band would fail a correct estimator a third of the time.
    assert (mean - exact).abs() < 3 * stderr, (float(mean), float(exact), float(stderr))


def test_sample_result_does_not_depend_on_batch(mixture_2d: GaussianMixture) -> None:
    scheduler, model = setup(mixture_2d, "ve")
    x = mixture_2d.sample(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[1] = torch.tensor([0.0, -2.0])  # a sample at the narrow component, which needs more steps
    batch = likelihood(model, x, scheduler, trace="exact")
    assert len(set(batch.nfe.tolist())) > 1  # the samples did take different steps
    for i in range(4):
        alone = likelihood(model, x[i : i + 1], scheduler, trace="exact")
        assert torch.equal(alone.nll, batch.nll[i : i + 1]) and torch.equal(alone.nfe, batch.nfe[i : i + 1])
        assert torch.equal(alone.z, batch.z[i : i + 1])
    # Hutchinson with one generator per sample: the probe is the sample's own too.
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(4)]  # noqa: E731
    hutch = likelihood(model, x, scheduler, generator=gens())
    alone = likelihood(model, x[2:3], scheduler, generator=[gens()[2]])
    assert torch.equal(alone.nll, hutch.nll[2:3])


def test_dequantization_formula(mixture_2d: GaussianMixture) -> None:
    scheduler, model = setup(mixture_2d, "vp")
    levels = torch.tensor([[0.0, 255.0], [128.0, 37.0]], dtype=torch.float64)
    for lo, hi, offset_bits in ((-1.0, 1.0, 7.0), (0.0, 1.0, 8.0)):
        x = lo + (hi - lo) * levels / 255
        result = likelihood(
            model,
            x,
            scheduler,
            trace="exact",
            dequantize=True,
            data_range=(lo, hi),
            generator=torch.Generator().manual_seed(5),
        )
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        y = lo + (hi - lo) * (levels + u) / 256
        continuous = likelihood(model, y, scheduler, trace="exact")
        assert torch.allclose(result.bpd, continuous.bpd + offset_bits, rtol=0, atol=1e-12)
        assert torch.allclose(result.nll, continuous.nll + 2 * math.log(256 / (hi - lo)), rtol=0, atol=1e-12)


def test_dequantize_rejects_data_out_of_range(mixture_2d: GaussianMixture) -> None:
    scheduler, model = setup(mixture_2d, "vp")
    x = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        likelihood(model, x, scheduler, dequantize=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        likelihood(model, x - 1.0, scheduler, dequantize=True, data_range=(0, 1))


class HalfOutput(torch.nn.Module):
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return sample[:, :1]


class NaNAfter(torch.nn.Module):
    """Exact up to model time ``ddpm`` level 500, NaN beyond."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = self.inner(sample, timestep).sample
        return out * torch.where(timestep > 500, float("nan"), 1.0).reshape(-1, *([1] * (out.ndim - 1)))


class NoFlowSDE(VPSDE):
    def sde(self, x: torch.Tensor, t: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def test_bad_inputs(mixture_2d: GaussianMixture) -> None:
    scheduler, model = setup(mixture_2d, "vp", "epsilon")
    x = mixture_2d.sample(2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        likelihood(HalfOutput(), x, scheduler)
    with pytest.raises(FloatingPointError, match=r"NaN or Inf at t=") as info:
        likelihood(NaNAfter(model), x, scheduler, trace="exact")
    reached = float(str(info.value).split("t=")[1].split(";")[0])
    assert 500 / 999 < reached <= 1.0
    fake = SimpleNamespace(sde=NoFlowSDE(), time_input="ddpm", config=SimpleNamespace(prediction_type="epsilon"))
    with pytest.raises(ValueError, match="probability-flow"):
        likelihood(model, x, fake)
    with pytest.raises(ValueError, match="trace"):
        likelihood(model, x, scheduler, trace="approx")
    with pytest.raises(ValueError, match="noise"):
        likelihood(model, x, scheduler, noise="uniform")
    with pytest.raises(ValueError, match="rtol"):
        likelihood(model, x, scheduler, rtol=0)
    with pytest.raises(ValueError, match="generators"):
        likelihood(model, x, scheduler, generator=[torch.Generator()])
