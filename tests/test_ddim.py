"""The ``ddim`` sampler: diffusers' DDIMScheduler and DDPMScheduler reproduced, and the mixture given back.

diffusers keeps ``alphas_cumprod`` in float32 (a float32 cumulative product, up to 4e-7 relative off the exact
table), so even diffusers' own scheduler moves by ~2e-5 over a loop when given the exact float64 table. The
reference schedulers below are therefore given the float64 table of the same (float32) betas; the comparison then
measures the algorithm, to 1e-6.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler

import sdekit
from sdekit.testing import (
    GaussianMixture,
    epsilon_oracle,
    frechet_distance,
    mixture_frechet_distance,
    mixture_frechet_floor,
)
from sdekit_ddim import DDIMSDEScheduler

from conftest import float64_table, tiny_unet

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class _LinearModel:
    """A fixed random smooth map ``(x, t) -> output``: a deterministic stand-in for a network."""

    def __init__(self, dim: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.weight = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
        self.bias = 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.weight + self.bias) * (1 + float(timestep) / 1000)


def _loop(
    scheduler: DDIMScheduler | DDPMScheduler | DDIMSDEScheduler,
    steps: int | None,
    seed: int = 1,
    timesteps: list[int] | None = None,
    **step_kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """A full sampling loop in float64 on 3 samples; returns the samples, the timesteps and the generator."""
    model = _LinearModel()
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=gen, **step_kwargs).prev_sample
    return x, scheduler.timesteps, gen


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_reproduces_diffusers_ddim(spacing: str, prediction_type: str) -> None:
    settings = itertools.product((7, 50), (0.0, 0.6), (False, True), (True, False), (0, 1), (False, True))
    for steps, eta, clip, alpha_to_one, offset, clipped_output in settings:
        config = dict(
            timestep_spacing=spacing,
            prediction_type=prediction_type,
            clip_sample=clip,
            set_alpha_to_one=alpha_to_one,
            steps_offset=offset,
        )
        step_kwargs = dict(eta=eta, use_clipped_model_output=clipped_output)
        ref, ref_steps, ref_gen = _loop(float64_table(DDIMScheduler(**config)), steps, **step_kwargs)
        ours, our_steps, our_gen = _loop(DDIMSDEScheduler(**config), steps, **step_kwargs)
        where = f"{config}, steps={steps}, {step_kwargs}"
        assert our_steps.dtype == torch.int64 and torch.equal(our_steps, ref_steps), where
        assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (where, (ours - ref).abs().max())
        # The noise is drawn exactly as diffusers draws it, so a shared generator ends in the same state.
        assert torch.equal(our_gen.get_state(), ref_gen.get_state()), where


def test_config_eta_and_per_call_override() -> None:
    ref, _, _ = _loop(float64_table(DDIMScheduler(clip_sample=False)), 20, eta=0.5)
    from_config, _, _ = _loop(DDIMSDEScheduler(eta=0.5), 20)
    overridden, _, _ = _loop(DDIMSDEScheduler(eta=0.0), 20, eta=0.5)
    deterministic, _, _ = _loop(DDIMSDEScheduler(eta=0.5), 20, eta=0.0)
    ref_deterministic, _, _ = _loop(float64_table(DDIMScheduler(clip_sample=False)), 20, eta=0.0)
    assert torch.allclose(from_config, ref, rtol=0, atol=1e-6)
    assert torch.allclose(overridden, ref, rtol=0, atol=1e-6)
    assert torch.allclose(deterministic, ref_deterministic, rtol=0, atol=1e-6)


def test_use_clipped_model_output_rederives_the_noise() -> None:
    """With clipping active the flag changes the update, exactly as in diffusers."""
    config = dict(clip_sample=True, clip_sample_range=0.5)
    plain, _, _ = _loop(DDIMSDEScheduler(**config), 10)
    clipped, _, _ = _loop(DDIMSDEScheduler(**config), 10, use_clipped_model_output=True)
    ref, _, _ = _loop(float64_table(DDIMScheduler(**config)), 10, use_clipped_model_output=True)
    assert (plain - clipped).abs().max() > 1e-2
    assert torch.allclose(clipped, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_eta_one_over_all_levels_is_ddpm(prediction_type: str, clip: bool) -> None:
    """eta = 1 makes sigma_t^2 DDPM's beta_tilde (``variance_type="fixed_small"``).

    DDPM's posterior mean combines the clipped ``x_0`` with ``x_t``, which is DDIM with the noise re-derived from
    the clipped ``x_0`` (``use_clipped_model_output=True``). DDPM draws no noise at its last step (t = 0), where
    DDIM draws one and scales it by sigma = 0: the samples are identical and the generator ends exactly one draw
    further on.
    """
    config = dict(prediction_type=prediction_type, clip_sample=clip)
    ref_scheduler = float64_table(DDPMScheduler(**config))
    ref, ref_steps, ref_gen = _loop(ref_scheduler, 1000)
    ours, our_steps, our_gen = _loop(DDIMSDEScheduler(eta=1.0, **config), 1000, use_clipped_model_output=True)
    assert torch.equal(our_steps, ref_steps)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6), (ours - ref).abs().max()
    torch.randn(3, 12, generator=ref_gen, dtype=torch.float64)
    assert torch.equal(our_gen.get_state(), ref_gen.get_state())


def test_custom_timesteps_step_to_the_next_entry() -> None:
    """With custom timesteps each step lands on the next one: at eta = 1 that is DDPMScheduler's custom loop."""
    levels = [999, 700, 420, 200, 55, 3]
    ref, ref_steps, _ = _loop(float64_table(DDPMScheduler(clip_sample=False)), None, timesteps=levels)
    ours, our_steps, _ = _loop(DDIMSDEScheduler(eta=1.0), None, timesteps=levels)
    assert our_steps.dtype == torch.int64 and our_steps.tolist() == levels == ref_steps.tolist()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)


def test_continuous_vp_uses_alpha_bar_at_the_continuous_times() -> None:
    scheduler = DDIMSDEScheduler(sde_params={"beta_min": 0.1, "beta_max": 20.0}, set_alpha_to_one=False)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [750, 500, 250, 0]
    abar = scheduler.sde.alpha_bar
    x, eps = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    for t, prev in zip(scheduler.timesteps.tolist(), [500, 250, 0, 0]):
        a_t, a_s = float(abar(t / 999)), float(abar(prev / 999))
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        expected = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps  # DDIM eq. 12 at eta = 0
        x = scheduler.step(eps, t, x).prev_sample
        assert torch.allclose(x, expected, rtol=1e-12, atol=1e-12)
    # Timestep 0 is the clean data there (sigma = 0): an x_0 prediction still gives finite samples.
    sample_model = DDIMSDEScheduler(sde_params={"beta_min": 0.1, "beta_max": 20.0}, prediction_type="sample")
    final, steps, _ = _loop(sample_model, 4)
    assert steps[-1] == 0 and torch.isfinite(final).all()


@pytest.mark.parametrize(
    "source",
    [
        DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing"),
        DDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            set_alpha_to_one=False,
            prediction_type="v_prediction",
        ),
    ],
    ids=["ddpm-cosine-trailing", "ddim-scaled-linear-offset"],
)
def test_from_config_reproduces_the_schedule(source: DDIMScheduler | DDPMScheduler) -> None:
    ours = sdekit.load_scheduler("ddim", source.config)
    assert isinstance(ours, DDIMSDEScheduler)
    reference = DDIMScheduler.from_config(source.config)
    for key in ("timestep_spacing", "steps_offset", "clip_sample", "set_alpha_to_one", "prediction_type"):
        assert ours.config[key] == reference.config[key], key
    n = ours.config.num_train_timesteps
    table = ours.sde.alpha_bar(torch.arange(n, dtype=torch.float64) / (n - 1))
    assert torch.allclose(table, reference.alphas_cumprod.to(torch.float64), rtol=1e-5, atol=0)
    x_ours, steps_ours, _ = _loop(ours, 25)
    x_ref, steps_ref, _ = _loop(float64_table(reference), 25)
    assert torch.equal(steps_ours, steps_ref)
    assert torch.allclose(x_ours, x_ref, rtol=0, atol=1e-6)


def test_stock_diffusers_pipeline_agrees_to_float32_precision() -> None:
    """In an unmodified DDIMPipeline (float32, stock float32 table) the two schedulers agree closely."""
    unet = tiny_unet()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for name in ("diffusers", "sdekit"):
        if name == "sdekit":
            pipe.scheduler = sdekit.load_scheduler("ddim", pipe.scheduler.config)
        gen = torch.Generator().manual_seed(3)
        images[name] = pipe(batch_size=2, num_inference_steps=10, eta=0.5, generator=gen, output_type="np").images
    assert abs(images["diffusers"] - images["sdekit"]).max() < 1e-4


# -- the exact-score oracle --------------------------------------------------------------------------------


def _oracle_samples(mix: GaussianMixture, steps: int, eta: float, n: int, seed: int) -> torch.Tensor:
    scheduler = DDIMSDEScheduler(eta=eta)
    model = epsilon_oracle(mix, scheduler.sde)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=gen).prev_sample
    return x


def test_frechet_distance_falls_as_steps_grow(mixture_2d: GaussianMixture) -> None:
    """Deterministic DDIM from the same x_T: the distance to the data falls from 10 to 50 to 250 steps."""
    data = mixture_2d.sample(50_000, torch.Generator().manual_seed(4), dtype=torch.float64)
    fd = [frechet_distance(_oracle_samples(mixture_2d, steps, 0.0, 12_000, 5), data) for steps in (10, 50, 250)]
    assert fd[0] > 2 * fd[1] and fd[1] > 1.5 * fd[2], fd


def test_ddpm_budget_is_within_the_data_floor(mixture_2d: GaussianMixture) -> None:
    """eta = 1 over all 1000 levels is within 1.5x of the data-vs-data floor; 10 steps are not."""
    n = 12_000
    floor = mixture_frechet_floor(mixture_2d, n, generator=torch.Generator().manual_seed(6))
    full = mixture_frechet_distance(_oracle_samples(mixture_2d, 1000, 1.0, n, 7), mixture_2d)
    few = mixture_frechet_distance(_oracle_samples(mixture_2d, 10, 1.0, n, 7), mixture_2d)
    assert full <= 1.5 * floor, (full, floor)
    assert few > 1.5 * floor, (few, floor)


# -- bad input -----------------------------------------------------------------------------------------------


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="eta must be a finite number >= 0.*-0.1"):
        DDIMSDEScheduler(eta=-0.1)
    scheduler = DDIMSDEScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0.*-1"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=-1.0)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0.*nan"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=float("nan"))
    # eta > 1 asks for more noise than the target level holds (diffusers returns NaN there).
    with pytest.raises(ValueError, match="eta=1.5 asks step 0 for noise std .* eta <= "):
        DDIMSDEScheduler(eta=1.5).set_timesteps(10)
    with pytest.raises(ValueError, match="eta=1.5 asks step 0 for noise std .* eta <= "):
        scheduler.step(x, scheduler.timesteps[0], x, eta=1.5)
    with pytest.raises(ValueError, match="timestep_spacing.*'leading'.*Did you mean 'trailing'"):
        DDIMSDEScheduler(timestep_spacing="trailng")
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 and num_train_timesteps=1000.*1001"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be between 1 .* got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="steps_offset=5 .* past the last training level 999"):
        DDIMSDEScheduler(steps_offset=5).set_timesteps(1000)
    with pytest.raises(ValueError, match="steps_offset must be an integer >= 0"):
        DDIMSDEScheduler(steps_offset=-1)
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        scheduler.set_timesteps(timesteps=[999.5, 10])
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 500])
    for sde in ("subvp", "ve"):
        with pytest.raises(ValueError, match=f"sde='{sde}'.*not variance preserving.*sde='vp'"):
            DDIMSDEScheduler(sde=sde)
    with pytest.raises(ValueError, match="num_train_timesteps=1000 but the SDE has N=500"):
        DDIMSDEScheduler(sde_params={"beta_min": 0.1, "beta_max": 20.0, "N": 500})
