"""Training objectives: the exact score wins, each kind matches a hand computation, and bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from sdekit.losses import DenoisingLoss
from sdekit.testing import MixtureScoreModel
from sdekit_sdes import VESDE, VPSDE, SubVPSDE

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
SDES = {
    "ve": VESDE,
    "vp": VPSDE,
    "subvp": SubVPSDE,
    "vp-ddpm": lambda: VPSDE(**DDPM),
    "subvp-ddpm": lambda: SubVPSDE(**DDPM),
}


class Recorder(torch.nn.Module):
    """Returns ``0.3 x_t + 0.1`` (a UNet-like output object) and remembers what it was fed."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor):
        self.sample, self.timestep = sample, timestep
        return type("Out", (), {"sample": 0.3 * sample + 0.1})()


class Perturbed(torch.nn.Module):
    """The oracle's output, scaled and shifted."""

    def __init__(self, model: torch.nn.Module, scale: float, shift: float) -> None:
        super().__init__()
        self.model, self.scale, self.shift = model, scale, shift

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep).sample * self.scale + self.shift


CASES = [
    ("ve", "dsm", "score", "sigma2"),
    ("ve", "dsm", "epsilon", "likelihood"),
    ("vp", "dsm", "epsilon", "sigma2"),
    ("vp", "dsm", "v_prediction", "likelihood"),
    ("subvp", "dsm", "sample", "sigma2"),
    ("subvp", "dsm", "score", "likelihood"),
    ("vp-ddpm", "ddpm", "epsilon", "sigma2"),
    ("vp-ddpm", "ddpm", "v_prediction", "sigma2"),
    ("subvp-ddpm", "ddpm", "sample", "sigma2"),
    ("ve", "smld", "score", "sigma2"),
    ("ve", "smld", "v_prediction", "sigma2"),
]


@pytest.mark.parametrize("sde_name,kind,prediction_type,weighting", CASES)
@pytest.mark.parametrize("scale,shift", [(1.1, 0.0), (0.9, 0.0), (1.0, 0.05), (1.0, -0.05)])
def test_exact_score_beats_a_perturbed_model(mixture_2d, sde_name, kind, prediction_type, weighting, scale, shift):
    sde = SDES[sde_name]()
    objective = DenoisingLoss(sde, kind, prediction_type=prediction_type, weighting=weighting)
    oracle = MixtureScoreModel(mixture_2d, sde, prediction_type=prediction_type, time_input=objective.time_input)
    x0 = mixture_2d.sample(4096, generator=torch.Generator().manual_seed(0))
    exact = objective(oracle, x0, torch.Generator().manual_seed(1)).loss
    worse = objective(Perturbed(oracle, scale, shift), x0, torch.Generator().manual_seed(1)).loss
    # Same seed, same draws: only the model differs, so any change of the exact output must cost.
    assert torch.isfinite(exact) and worse > exact


def test_time_input_and_defaults_follow_the_sde():
    assert DenoisingLoss(VESDE()).time_input == "sigma"
    assert DenoisingLoss(VESDE(), "smld", prediction_type="score").time_input == "sigma"
    for sde in (VPSDE(), SubVPSDE(), VPSDE(**DDPM)):
        objective = DenoisingLoss(sde)
        assert (objective.time_input, objective.prediction_type, objective.eps) == ("ddpm", "epsilon", sde.sampling_eps)
    assert DenoisingLoss(VPSDE(), eps=0.01).eps == 0.01


def _vp_coeffs(t: torch.Tensor, beta_min: float = 0.1, beta_max: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-schedule ``-int_0^t beta`` and ``beta(t)`` (score-SDE appendix B), written out independently."""
    return -(beta_min * t + 0.5 * (beta_max - beta_min) * t**2), beta_min + t * (beta_max - beta_min)


def test_dsm_with_sigma2_weighting_is_epsilon_mse():
    x0 = torch.randn(6, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    model = Recorder()
    loss, per_sample = DenoisingLoss(VPSDE(), "dsm")(model, x0, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = 1e-3 + (1 - 1e-3) * torch.rand(6, generator=g, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g)
    log_abar = _vp_coeffs(t)[0].float().view(-1, 1, 1, 1)
    x_t = torch.exp(0.5 * log_abar) * x0 + torch.sqrt(1 - torch.exp(log_abar)) * z
    torch.testing.assert_close(model.sample, x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.timestep, (t * 999).float())
    expected = ((0.3 * x_t + 0.1 - z) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)


def test_dsm_score_model_on_ve_matches_the_reference_form():
    # score-SDE eq. 7 with lambda = sigma^2 for a score model: || sigma s + z ||^2, model fed sigma.
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    model = Recorder()
    _, per_sample = DenoisingLoss(VESDE(), prediction_type="score", reduce="sum")(
        model, x0, torch.Generator().manual_seed(2)
    )
    g = torch.Generator().manual_seed(2)
    t = 1e-5 + (1 - 1e-5) * torch.rand(5, generator=g, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g)
    sigma = (0.01 * (50 / 0.01) ** t).float()
    x_t = x0 + sigma[:, None] * z
    torch.testing.assert_close(model.timestep, sigma)
    expected = ((sigma[:, None] * (0.3 * x_t + 0.1) + z) ** 2).sum(dim=1)
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)


def test_likelihood_weighting_is_g2_times_the_score_residual():
    x0 = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Recorder()
    _, per_sample = DenoisingLoss(SubVPSDE(), prediction_type="score", weighting="likelihood")(
        model, x0, torch.Generator().manual_seed(3)
    )
    g = torch.Generator().manual_seed(3)
    t = 1e-3 + (1 - 1e-3) * torch.rand(7, generator=g, dtype=torch.float64)
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    log_abar, beta = _vp_coeffs(t)
    sigma = 1 - torch.exp(log_abar)  # sub-VP kernel std (score-SDE appendix B)
    g2 = beta * (1 - torch.exp(2 * log_abar))  # sub-VP g(t)^2 (score-SDE eq. 17)
    x_t = torch.exp(0.5 * log_abar)[:, None] * x0 + sigma[:, None] * z
    residual = 0.3 * x_t + 0.1 + z / sigma[:, None]
    torch.testing.assert_close(per_sample, g2 * (residual**2).mean(dim=1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_l_simple_matches_diffusers_add_noise(prediction_type):
    scheduler = DDPMScheduler(**DDPM, prediction_type=prediction_type)
    x0 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = Recorder()
    _, per_sample = DenoisingLoss(VPSDE(**DDPM), "ddpm", prediction_type=prediction_type)(
        model, x0, torch.Generator().manual_seed(4)
    )
    g = torch.Generator().manual_seed(4)
    timesteps = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, timesteps)}
    assert model.timestep.dtype == torch.long and torch.equal(model.timestep, timesteps)
    # diffusers builds alphas_cumprod by a float32 cumprod, sdekit in float64: they agree to float32 rounding.
    torch.testing.assert_close(model.sample, noisy, rtol=1e-6, atol=1e-6)
    expected = ((0.3 * noisy + 0.1 - target[prediction_type]) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-6)


def test_smld_draws_only_the_geometric_levels():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
    model = Recorder()
    x0 = torch.zeros(2000, 2)
    DenoisingLoss(sde, "smld", prediction_type="score")(model, x0, torch.Generator().manual_seed(0))
    levels = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), 10, dtype=torch.float64)).float()
    nearest = (model.timestep[:, None] - levels[None]).abs().argmin(dim=1)
    torch.testing.assert_close(model.timestep, levels[nearest], rtol=1e-6, atol=0)
    assert set(nearest.tolist()) == set(range(10))
    # x0 = 0, so x_t = sigma z: the model is fed the level the sample was noised with.
    ratio = model.sample.pow(2).mean() / model.timestep.pow(2).mean()
    assert 0.85 < ratio < 1.15


class TinyConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        time = torch.log1p(timestep.float()).view(-1, 1, 1, 1).expand_as(sample)
        return self.conv(torch.cat([sample, time], dim=1))


class TinyLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([sample, torch.log1p(timestep.float())[:, None]], dim=1))


@pytest.mark.parametrize(
    "sde_name,kind,weighting", [("ve", "dsm", "likelihood"), ("subvp", "dsm", "sigma2"), ("vp-ddpm", "ddpm", "sigma2")]
)
@pytest.mark.parametrize("model_cls,shape", [(TinyConv, (4, 1, 5, 5)), (TinyLinear, (4, 2))])
def test_gradients_flow(sde_name, kind, weighting, model_cls, shape):
    torch.manual_seed(0)
    model = model_cls()
    x0 = torch.randn(shape)
    loss, _ = DenoisingLoss(SDES[sde_name](), kind, weighting=weighting)(model, x0, torch.Generator().manual_seed(0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0 for grad in grads)


@pytest.mark.parametrize("kind,sde_name", [("dsm", "vp"), ("ddpm", "vp-ddpm"), ("smld", "ve")])
def test_reduce_sum_is_mean_times_dimensions_and_draws_are_seeded(kind, sde_name):
    sde = SDES[sde_name]()
    x0 = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mean = DenoisingLoss(sde, kind)(Recorder(), x0, torch.Generator().manual_seed(9))
    total = DenoisingLoss(sde, kind, reduce="sum")(Recorder(), x0, torch.Generator().manual_seed(9))
    torch.testing.assert_close(total.per_sample, mean.per_sample * 12)
    torch.testing.assert_close(total.loss, mean.loss * 12)
    again = DenoisingLoss(sde, kind)(Recorder(), x0, torch.Generator().manual_seed(9))
    other = DenoisingLoss(sde, kind)(Recorder(), x0, torch.Generator().manual_seed(10))
    assert torch.equal(again.per_sample, mean.per_sample)
    assert not torch.equal(other.per_sample, mean.per_sample)


def test_half_precision_input_computes_in_float32(mixture_2d):
    sde = VPSDE()
    oracle = MixtureScoreModel(mixture_2d, sde)
    x0 = mixture_2d.sample(2048, generator=torch.Generator().manual_seed(0))
    full = DenoisingLoss(sde)(oracle, x0, torch.Generator().manual_seed(1))
    half = DenoisingLoss(sde)(oracle, x0.to(torch.bfloat16), torch.Generator().manual_seed(1))
    assert half.loss.dtype == torch.float32 and half.per_sample.dtype == torch.float32
    torch.testing.assert_close(half.loss, full.loss, rtol=0.1, atol=0.01)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "dms"}, "kind.*'dsm'"),
        ({"weighting": "likelihod"}, "weighting.*'likelihood'"),
        ({"reduce": "meen"}, "reduce.*'mean'"),
        ({"prediction_type": "epsilom"}, "prediction_type.*'epsilon'"),
        ({"kind": "ddpm"}, "VP-type SDE.*VESDE"),
        ({"kind": "ddpm", "sde": VPSDE(), "prediction_type": "score"}, "not an L_simple target"),
        ({"kind": "smld", "sde": VPSDE()}, "needs a variance-exploding SDE.*got VPSDE"),
        ({"kind": "smld", "weighting": "likelihood"}, "likelihood.*'dsm' only"),
        ({"sde": VPSDE(), "eps": 0.0}, "sigma > 0"),
        ({"eps": 1.5}, r"eps must lie in \[0, 1"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    kwargs = {"sde": VESDE(), **kwargs}
    with pytest.raises(ValueError, match=match):
        DenoisingLoss(**kwargs)


def test_bad_calls_are_refused():
    objective = DenoisingLoss(VPSDE())
    with pytest.raises(ValueError, match=r"returned shape \(2, 1\) for an input of shape \(2, 3\)"):
        objective(lambda x, t: x[:, :1], torch.randn(2, 3))
    with pytest.raises(ValueError, match="floating-point"):
        objective(Recorder(), torch.ones(2, 3, dtype=torch.long))
