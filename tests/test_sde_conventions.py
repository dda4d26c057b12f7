"""SDE plugins own their conventions: the core asks an SDE how it is built from a scheduler configuration, which
model time it takes, its prior and its noise levels, and never branches on its name. Shown with a VE-type SDE
registered under a name the core has never heard of (tests/plugin_dist2: ``noise-levels``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, ScoreSdeVeScheduler

import sdekit
from sdekit.losses import DenoisingLoss
from sdekit.ode import model_score_fn
from sdekit.parametrization import from_model_time, to_model_time
from sdekit.registry import check_sde_instance

from conftest import tiny_unet


class RecordingModel(torch.nn.Module):
    """A small U-Net that records the timesteps it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = tiny_unet(channels=1, sample_size=8)
        self.timesteps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.timesteps.append(torch.as_tensor(timestep).detach().clone())
        return self.unet(x, timestep).sample


def _sample(scheduler: sdekit.SDEScheduler, model: RecordingModel, steps: int = 6) -> torch.Tensor:
    """The loop of a Stable-Diffusion-style pipeline: prior noise scaled by init_noise_sigma, one call per step."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, generator=generator).prev_sample
    return x


def test_builtin_sdes_declare_their_conventions() -> None:
    ve = sdekit.sde_from_config({"sde": "ve", "sigma_min": 0.02, "sigma_max": 20.0, "num_train_timesteps": 500})
    assert (ve.sigma_min, ve.sigma_max, ve.N) == (0.02, 20.0, 500)
    assert (ve.default_time_input(), ve.prior_std(), ve.is_discrete) == ("sigma", 20.0, False)
    assert ve.is_variance_exploding() and not ve.is_variance_preserving()
    assert float(ve.t_from_sigma(ve.sigma(0.3))) == pytest.approx(0.3)

    vp = sdekit.sde_from_config(DDPMScheduler(num_train_timesteps=50).config)
    assert (vp.N, vp.is_discrete, vp.default_time_input(), vp.prior_std()) == (50, True, "ddpm", 1.0)
    assert vp.is_variance_preserving() and not vp.is_variance_exploding()
    with pytest.raises(ValueError, match="does not define t_from_sigma"):
        vp.t_from_sigma(0.5)

    subvp = sdekit.sde_from_config({"sde": "subvp", "sde_params": {"beta_min": 0.1, "beta_max": 20.0}})
    assert not subvp.is_discrete and not subvp.is_variance_preserving() and subvp.default_time_input() == "ddpm"


def test_the_base_class_defaults_suit_an_sde_that_declares_nothing(plugins_on_path: Path) -> None:
    brownian = sdekit.sde_from_config({"sde": "constant-ve", "num_train_timesteps": 7})  # takes no shared keys
    assert (brownian.N, brownian.default_time_input(), brownian.is_discrete) == (100, "continuous", False)
    assert brownian.prior_std() == pytest.approx(1.0)  # N(0, sigma^2 T), read off prior_logp
    assert torch.allclose(brownian.sigma(torch.tensor([0.25])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="ConstantVESDE does not define t_from_sigma"):
        from_model_time(brownian, 0.5, "sigma")
    pf = sdekit.load_scheduler("pf-ode", sde="constant-ve", sde_params={"sigma": 2.0})
    assert pf.time_input == "continuous" and pf.init_noise_sigma == pytest.approx(2.0)


def test_a_new_ve_type_sde_samples_exactly_like_ve_and_feeds_the_model_sigma(plugins_on_path: Path) -> None:
    config = {"sde": "noise-levels", "sigma_min": 0.01, "sigma_max": 5.0, "num_train_timesteps": 100}
    for sampler in ("pc", "pf-ode"):
        new = sdekit.load_scheduler(sampler, config)
        builtin = sdekit.load_scheduler(sampler, {**config, "sde": "ve"})
        assert type(new.sde).__name__ == "NoiseLevelSDE" and type(builtin.sde).__name__ == "VESDE"
        assert new.time_input == builtin.time_input == "sigma" and new.init_noise_sigma == 5.0
        seen_new, seen_builtin = RecordingModel(), RecordingModel()
        assert torch.equal(_sample(new, seen_new), _sample(builtin, seen_builtin)), sampler
        fed = torch.stack([t.float().reshape(()) for t in seen_new.timesteps])
        assert torch.equal(fed, torch.stack([t.float().reshape(()) for t in seen_builtin.timesteps]))
        # The model is fed the noise level: sigma at each evaluation time, from sigma_max down to the smallest.
        times = from_model_time(new.sde, new.timesteps.double(), "sigma")
        assert torch.allclose(fed.double(), new.sde.sigma(times).to(torch.float32).double(), rtol=1e-6)
        assert float(fed[0]) == pytest.approx(5.0, rel=1e-6)

    # The ancestral predictor, the SMLD loss, the ODE's default model time and the trainer's config path all
    # treat it as the VE SDE it is.
    ancestral = sdekit.load_scheduler("pc", config, predictor="ancestral", corrector="none")
    reference = sdekit.load_scheduler("pc", {**config, "sde": "ve"}, predictor="ancestral", corrector="none")
    assert torch.equal(_sample(ancestral, RecordingModel()), _sample(reference, RecordingModel()))
    sde = sdekit.sde_from_config(config)
    assert DenoisingLoss(sde, "smld").time_input == "sigma"
    score = model_score_fn(RecordingModel(), sde)
    assert score(torch.zeros(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)
    assert float(to_model_time(sde, 1.0, sde.default_time_input())) == pytest.approx(5.0)


def test_a_score_sde_ve_checkpoint_config_builds_the_ve_sde() -> None:
    pc = sdekit.load_scheduler("pc", ScoreSdeVeScheduler(sigma_min=0.02, sigma_max=30.0).config)
    assert type(pc.sde).__name__ == "VESDE" and (pc.sde.sigma_min, pc.sde.sigma_max) == (0.02, 30.0)
    assert pc.time_input == "sigma" and pc.init_noise_sigma == 30.0


def test_a_config_naming_an_sde_that_is_not_installed_lists_the_installed_ones() -> None:
    with pytest.raises(sdekit.UnknownPluginError, match=r"Unknown SDE plugin 'vpp'. Did you mean 'vp'\?") as err:
        sdekit.load_scheduler("pc", {"sde": "vpp", "num_train_timesteps": 10})
    assert {"subvp", "ve", "vp"} <= set(err.value.available)
    assert f"Available SDE plugins: {', '.join(err.value.available)}." in str(err.value)


def test_a_plugin_vp_type_sde_takes_ddpm_model_time() -> None:
    class CosineVP(sdekit.VPTypeSDE):
        """A VP-type SDE written by a plugin author, with the cosine-like rate ``beta(t) = 2 t``."""

        def __init__(self, N: int = 1000, sampling_eps: float = 1e-3) -> None:
            super().__init__(N=N, sampling_eps=sampling_eps)

        def beta(self, t: torch.Tensor) -> torch.Tensor:
            return 2 * t

        def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
            return -(t**2)

        def diffusion(self, t: torch.Tensor) -> torch.Tensor:
            return torch.sqrt(self.beta(t))

        def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.exp(0.5 * self.log_alpha_bar(t)), torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

        def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):  # noqa: ANN001, ANN201
            return self._standard_normal(shape, generator, device, dtype)

        def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
            return sdekit.sde.gaussian_log_prob(z, 1.0)

    sde = CosineVP()
    assert sde.default_time_input() == "ddpm" and sde.is_variance_preserving()
    assert DenoisingLoss(sde, "ddpm").time_input == "ddpm"  # L_simple's integer levels need DDPM time


def test_an_sde_whose_attribute_hides_a_declared_method_is_refused() -> None:
    class Shadowing(type(sdekit.get_sde("ve"))):
        def __init__(self) -> None:
            super().__init__()
            self.sigma = 0.5  # hides SDE.sigma(t)

    with pytest.raises(sdekit.InvalidPluginError, match=r"Shadowing instances set the attribute\(s\) sigma, which"):
        check_sde_instance(Shadowing())
    ve = sdekit.get_sde("ve")
    assert check_sde_instance(ve) is ve
