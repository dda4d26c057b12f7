"""What the built-in samplers promise beyond the conformance kit.

``tests/test_conformance.py`` runs ``sdekit.testing.check_scheduler`` on every case below: the unmodified DDPM,
DDIM and LDM pipelines, one model call per timestep, determinism, pipeline save and reload, no host sync in
``step()``, ``add_noise`` and diffusers' ``SchedulerCommonTest`` checks. This file keeps what the kit does not
cover: the exports, a Stable-Diffusion-style loop with classifier-free guidance and custom timesteps, dtypes,
and the errors.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

import sdekit
from sdekit import load_scheduler

from conftest import tiny_unet

CASES = [
    ("pc", {}),
    ("pc", {"predictor": "euler_maruyama", "corrector": "none"}),
    ("pc", {"predictor": "ancestral", "corrector": "ald", "corrector_steps": 2}),
    ("pf-ode", {"solver": "euler"}),
    ("pf-ode", {"solver": "heun"}),
    ("ddim", {}),
    ("ddim", {"eta": 1.0}),
    ("analytic-dpm", {"variance": "beta_tilde"}),
    ("analytic-dpm", {"gamma": [0.5] * 1000}),
    ("analytic-dpm", {"gamma": [0.5] * 1000, "eta": 0.0, "trajectory": "optimal"}),
]
IDS = [name + "".join(f"-{k}" if k == "gamma" else f"-{v}" for k, v in overrides.items()) for name, overrides in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param


def test_scheduler_classes_are_exported_from_sdekit(case: tuple[str, dict]) -> None:
    name, _ = case
    cls = sdekit.get_sampler_class(name)
    assert getattr(sdekit, cls.__name__) is cls
    assert issubclass(cls, sdekit.SchedulerMixin) and issubclass(cls, sdekit.SDEScheduler)


def test_stable_diffusion_style_loop(case: tuple[str, dict]) -> None:
    name, overrides = case
    unet = tiny_unet(channels=4)
    scheduler = load_scheduler(
        name, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config, **overrides
    )
    timesteps, n = retrieve_timesteps(scheduler, num_inference_steps=5, device="cpu")
    assert n == 5
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    for t in timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_input, t).sample
        uncond, cond = noise_pred.chunk(2)
        latents, x0 = scheduler.step(uncond + 2.0 * (cond - uncond), t, latents, generator=gen, return_dict=False)
        assert x0.shape == latents.shape
    assert torch.isfinite(latents).all()
    # Custom timesteps in the model's units, as retrieve_timesteps passes them.
    custom = [999, 700, 400, 100]
    timesteps, n = retrieve_timesteps(scheduler, timesteps=custom)
    # diffusers counts evaluations (as for Heun); the scheduler visits the four levels given.
    assert n == len(scheduler.timesteps) and scheduler.num_inference_steps == 4
    assert float(timesteps[0]) == pytest.approx(999, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtype_is_kept(case: tuple[str, dict], dtype: torch.dtype) -> None:
    name, overrides = case
    scheduler = load_scheduler(name, DDPMScheduler().config, **overrides)
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    t = scheduler.timesteps[0]
    out = scheduler.step(torch.randn_like(x), t, x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    noisy = scheduler.add_noise(x, torch.randn_like(x), torch.full((2,), 500))
    assert noisy.dtype == dtype
    assert len(scheduler) == 1000


def test_contract_errors(case: tuple[str, dict]) -> None:
    name, overrides = case
    scheduler = load_scheduler(name, DDPMScheduler().config, **overrides, check_finite=True)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\)"):
        scheduler.step(torch.zeros(1, 3), t, torch.zeros(1, 2))
    with pytest.raises(FloatingPointError, match="step 0"):
        scheduler.step(torch.full((1, 2), float("nan")), t, torch.zeros(1, 2))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="prediction_type"):
        load_scheduler(name, DDPMScheduler().config, prediction_type="noise")
    with pytest.raises(ValueError, match="Did you mean"):
        load_scheduler(name, DDPMScheduler().config, predicton_type="epsilon")
