"""Every built-in sampler honours the diffusers scheduler contract in unmodified diffusers pipelines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    LDMPipeline,
    VQModel,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from torch.utils._python_dispatch import TorchDispatchMode

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


class _CallCounter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args: object) -> None:
        self.calls += 1


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[str, dict]:
    return request.param


def _ddpm_pipe(name: str, overrides: dict) -> DDPMPipeline:
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe.scheduler = load_scheduler(name, pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_scheduler_classes_are_exported_from_sdekit(case: tuple[str, dict]) -> None:
    name, _ = case
    cls = sdekit.get_sampler_class(name)
    assert getattr(sdekit, cls.__name__) is cls
    assert issubclass(cls, sdekit.SchedulerMixin) and issubclass(cls, sdekit.SDEScheduler)


def test_ddpm_pipeline_runs_and_calls_the_model_once_per_timestep(case: tuple[str, dict]) -> None:
    name, overrides = case
    pipe = _ddpm_pipe(name, overrides)
    counter = _CallCounter(pipe.unet)
    out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 8, 8, 3) and np.isfinite(out.images).all()
    assert counter.calls == len(pipe.scheduler.timesteps) >= 4
    again = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    np.testing.assert_array_equal(out.images, again.images)  # same seed, same samples; set_timesteps resets state


def test_ddim_and_ldm_pipelines_run(case: tuple[str, dict]) -> None:
    name, overrides = case
    ddim = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler())
    ddim.scheduler = load_scheduler(name, ddim.scheduler.config, **overrides)  # after construction: see docs
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 8, 8, 3) and np.isfinite(images.images).all()

    torch.manual_seed(0)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8,),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        num_vq_embeddings=16,
        vq_embed_dim=3,
    )
    ldm = LDMPipeline(
        vqvae=vqvae, unet=tiny_unet(), scheduler=load_scheduler(name, DDIMScheduler().config, **overrides)
    )
    ldm.set_progress_bar_config(disable=True)
    images = ldm(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (1, 8, 8, 3) and np.isfinite(images.images).all()


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


def test_save_and_reload_give_back_the_scheduler(case: tuple[str, dict], tmp_path) -> None:
    name, overrides = case
    pipe = _ddpm_pipe(name, overrides)
    pipe.save_pretrained(tmp_path)
    library, class_name = json.loads((tmp_path / "model_index.json").read_text())["scheduler"]
    assert class_name == type(pipe.scheduler).__name__
    assert library == "sdekit"
    reloaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(reloaded.scheduler) is type(pipe.scheduler)
    assert _public(reloaded.scheduler.config) == _public(pipe.scheduler.config)
    alone = type(pipe.scheduler).from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(alone.config) == _public(pipe.scheduler.config)


def _public(config: dict) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host (.item(), bool(t), float(t), .tolist())."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default):
            raise AssertionError(f"step() synchronises with the host through {func}")
        return func(*args, **(kwargs or {}))


def test_step_never_syncs_with_the_host(case: tuple[str, dict]) -> None:
    name, overrides = case
    scheduler = load_scheduler(name, DDPMScheduler().config, **overrides)
    scheduler.set_timesteps(6)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=gen)
    scheduler.step(torch.randn_like(x), scheduler.timesteps[0], x, generator=gen)  # index lookup may sync once
    for t in scheduler.timesteps[1:]:
        out = torch.randn(x.shape, generator=gen)
        with _NoHostSync():
            x = scheduler.step(out, t, x, generator=gen).prev_sample
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_dtype_is_kept_and_add_noise_takes_any_shape(case: tuple[str, dict], dtype: torch.dtype) -> None:
    name, overrides = case
    scheduler = load_scheduler(name, DDPMScheduler().config, **overrides)
    scheduler.set_timesteps(3)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    t = scheduler.timesteps[0]
    out = scheduler.step(torch.randn_like(x), t, x, generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    for shape in [(5,), (5, 7), (5, 2, 3, 4, 2)]:
        x0, noise = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        noisy = scheduler.add_noise(x0, noise, torch.full((5,), 500))
        assert noisy.shape == x0.shape and noisy.dtype == dtype
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
