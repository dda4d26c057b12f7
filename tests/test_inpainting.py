"""Inpainting and colorization (score-SDE section 5, appendix I.2 / I.3) with every built-in sampler, on exact
oracles: the known values come back exactly, the hidden ones land in the component the known ones select."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, ScoreSdeVeScheduler
from diffusers.configuration_utils import register_to_config

import sdekit
from sdekit.inpainting import COLOR_BASIS, couple_colors, decouple_colors
from sdekit.scheduler import SDEScheduler
from sdekit.testing import MixtureScoreModel, mixture_frechet_distance, mixture_frechet_floor
from sdekit.testing.conditional import (
    color_mixture,
    decoupled_mixture,
    half_mask_mixture,
    masked_conditional,
)

from conftest import oracle_scheduler

NUM = 600  # samples per run: a rate of 0.985 has a standard error of 0.005
STEPS = 50


def _inpaint_rate(name: str, resample_steps: int, **options: object) -> tuple[float, torch.Tensor, torch.Tensor]:
    mixture, mask = half_mask_mixture()
    data = mixture.sample(NUM, torch.Generator().manual_seed(1))
    scheduler = oracle_scheduler(name, mixture, STEPS, **options)
    model = MixtureScoreModel(mixture, scheduler.sde)
    out = sdekit.inpaint(
        model,
        scheduler,
        data,
        mask,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(2),
        resample_steps=resample_steps,
        show_progress=False,
    )
    exact = masked_conditional(mixture, data, mask)
    assert float(exact.weights.max(dim=1).values.min()) > 0.99  # the known half decides the component
    return float((exact.landed(out) == exact.selected()).float().mean()), out, data


@pytest.mark.parametrize(
    ("name", "options"),
    [("pc", {}), ("ddim", {"eta": 1.0}), ("analytic-dpm", {"eta": 1.0})],
    ids=["pc", "ddim-eta1", "analytic-dpm-eta1"],
)
def test_stochastic_samplers_inpaint_into_the_selected_component(name: str, options: dict) -> None:
    rate, out, data = _inpaint_rate(name, 0, **options)
    assert torch.equal(out[..., :2], data[..., :2])  # the known half comes back exactly
    assert rate >= 0.95, rate


@pytest.mark.parametrize(("name", "options"), [("ddim", {"eta": 0.0}), ("pf-ode", {})], ids=["ddim-eta0", "pf-ode"])
def test_deterministic_samplers_reach_the_selected_component_with_resampling(name: str, options: dict) -> None:
    plain, _, _ = _inpaint_rate(name, 0, **options)
    resampled, out, data = _inpaint_rate(name, 1, **options)
    assert torch.equal(out[..., :2], data[..., :2])
    assert resampled >= 0.95, (plain, resampled)
    assert resampled > plain + 0.02, (plain, resampled)  # the oracle is hard for plain replacement


def test_ve_predictor_corrector_inpaints_with_score_outputs_on_sigma() -> None:
    """VE (alpha = 1, sigma up to 50), a score model taking sigma: the kernel levels come from the SDE."""
    mixture, mask = half_mask_mixture()
    data = mixture.sample(NUM, torch.Generator().manual_seed(1))
    scheduler = sdekit.load_scheduler("pc", ScoreSdeVeScheduler(sigma_max=20.0).config, norm="batch")
    model = MixtureScoreModel(mixture, scheduler.sde, prediction_type="score", time_input="sigma")
    out = sdekit.inpaint(
        model,
        scheduler,
        data,
        mask,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(2),
        show_progress=False,
    )
    exact = masked_conditional(mixture, data, mask)
    assert torch.equal(out[..., :2], data[..., :2])
    assert float((exact.landed(out) == exact.selected()).float().mean()) >= 0.95


def test_the_loop_object_in_a_hand_written_loop_matches_inpaint() -> None:
    mixture, mask = half_mask_mixture()
    data = mixture.sample(8, torch.Generator().manual_seed(1))
    scheduler = sdekit.load_scheduler("pf-ode", DDPMScheduler().config)
    model = MixtureScoreModel(mixture, scheduler.sde)
    expected = sdekit.inpaint(
        model,
        scheduler,
        data,
        mask,
        num_inference_steps=6,
        generator=torch.Generator().manual_seed(3),
        resample_steps=2,
        show_progress=False,
    )

    generator = torch.Generator().manual_seed(3)
    scheduler.set_timesteps(6)
    inpainting = sdekit.Inpainting(scheduler, data, mask, generator=generator, resample_steps=2)
    x = torch.randn(data.shape, generator=generator) * scheduler.init_noise_sigma
    x = inpainting.start(x)
    calls = 0
    for t in inpainting.timesteps():
        x = scheduler.step(model(x, t).sample, t, x, generator=generator).prev_sample
        x = inpainting(x)
        calls += 1
    assert torch.equal(x, expected)
    assert calls == inpainting.num_evaluations == 11 + 2 * 11  # 5 Heun intervals + the x_0 estimate, all resampled


@pytest.mark.parametrize("name", ["pc", "pf-ode", "ddim"])
def test_after_each_step_the_known_values_are_the_image_noised_to_the_next_level(name: str) -> None:
    mixture, mask = half_mask_mixture()
    image = mixture.sample(2000, torch.Generator().manual_seed(1))
    scheduler = sdekit.load_scheduler(name, DDPMScheduler().config)
    model = MixtureScoreModel(mixture, scheduler.sde)
    scheduler.set_timesteps(4)
    inpainting = sdekit.Inpainting(scheduler, image, mask, generator=torch.Generator().manual_seed(0))
    x = inpainting.start(torch.randn(image.shape, generator=torch.Generator().manual_seed(2)))
    levels = [scheduler.kernel_coeffs(t) for t in scheduler.eval_times]
    for index, t in enumerate(scheduler.timesteps):
        (alpha, sigma) = levels[index]
        z = (x[..., :2] - alpha * image[..., :2]) / sigma  # must be standard normal
        assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03, (index, float(z.std()))
        x = inpainting(scheduler.step(model(x, t).sample, t, x).prev_sample)
    assert torch.equal(x[..., :2], image[..., :2])


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("pc", {}, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]),  # corrector + predictor of a level, twice
        ("ddim", {}, [0, 0, 1, 1, 2, 2]),
        ("pf-ode", {}, [0, 1, 0, 1, 1, 2, 1, 2, 2, 2]),  # Heun's two evaluations, twice; the x_0 estimate twice
    ],
)
def test_resampling_repeats_whole_steps(name: str, options: dict, pattern: list[int]) -> None:
    """A repeated step is every evaluation that takes the sample from one noise level to the next."""
    mixture, mask = half_mask_mixture()
    data = mixture.sample(4, torch.Generator().manual_seed(1))
    scheduler = sdekit.load_scheduler(name, DDPMScheduler().config, **options)
    model = MixtureScoreModel(mixture, scheduler.sde)
    scheduler.set_timesteps(3)
    levels = sorted(set(scheduler.timesteps.tolist()), reverse=True)
    inpainting = sdekit.Inpainting(scheduler, data, mask, generator=torch.Generator().manual_seed(0), resample_steps=1)
    x = inpainting.start(torch.randn(data.shape))
    seen = []
    for t in inpainting.timesteps():
        seen.append(levels.index(float(t)))
        x = inpainting(scheduler.step(model(x, t).sample, t, x).prev_sample)
    assert seen == pattern
    assert scheduler.step_index == len(scheduler.timesteps)


class _TwoStepFlow(SDEScheduler):
    """A multistep sampler written against the public API: the probability-flow ODE ``dy/ds = eps`` in
    ``y = x / alpha``, ``s = sigma / alpha`` by the two-step Adams-Bashforth rule, keeping the earlier evaluations'
    ``eps`` in a list it appends to in place (as diffusers' multistep solvers keep theirs).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`.
    """

    seen: list[tuple[int, int]] = []  # (evaluation, history length it found): outside the scheduler's state

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        sde: str = "vp",
        sde_params: dict | None = None,
        sampling_eps: float | None = None,
        prediction_type: str = "epsilon",
        time_input: str | None = None,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        check_finite: bool = False,
    ) -> None:
        self.setup()
        self.history: list[tuple[torch.Tensor, float]] = []

    def plan_evaluations(self, times: list[float]) -> list[float]:
        self._levels = [self.kernel_coeffs(t) for t in times] + [(1.0, 0.0)]
        self.history = []
        return times

    def update(self, index, model_output, sample, generator, use_clipped_model_output, eta):  # noqa: ANN001, ANN201
        (alpha, sigma), (alpha_next, sigma_next) = self._levels[index], self._levels[index + 1]
        x0, eps = self.x0_and_eps(model_output, sample, alpha, sigma, False)
        type(self).seen.append((index, len(self.history)))
        h = sigma_next / alpha_next - sigma / alpha
        slope = eps
        if self.history:
            previous, h_previous = self.history[-1]
            slope = eps + 0.5 * h / h_previous * (eps - previous)  # Adams-Bashforth 2 with unequal steps
        self.history.append((eps, h))
        return alpha_next * (sample / alpha + h * slope), x0


def test_resampling_restores_a_multistep_samplers_history() -> None:
    mixture, mask = half_mask_mixture()
    data = mixture.sample(NUM, torch.Generator().manual_seed(1))
    scheduler = _TwoStepFlow()
    model = MixtureScoreModel(mixture, scheduler.sde)
    exact = masked_conditional(mixture, data, mask)
    rates = {}
    for resample_steps in (0, 1):
        _TwoStepFlow.seen = []
        out = sdekit.inpaint(
            model,
            scheduler,
            data,
            mask,
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(2),
            resample_steps=resample_steps,
            show_progress=False,
        )
        rates[resample_steps] = float((exact.landed(out) == exact.selected()).float().mean())
        # Every pass over evaluation k finds the k earlier steps' history, as on the first pass.
        assert all(found == index for index, found in _TwoStepFlow.seen)
        assert len(_TwoStepFlow.seen) == STEPS * (1 + resample_steps)
    assert rates[1] >= 0.95 and rates[1] > rates[0], rates


def test_resampling_without_a_mask_keeps_the_data_distribution() -> None:
    """Nothing known: jumping back with the forward kernel and re-denoising must still sample the data."""
    mixture, _ = half_mask_mixture()
    scheduler = sdekit.load_scheduler("pf-ode", DDPMScheduler().config)
    model = MixtureScoreModel(mixture, scheduler.sde)
    image = torch.zeros(2000, 1, 4, 4)
    out = sdekit.inpaint(
        model,
        scheduler,
        image,
        torch.zeros(1, 1, 4, 4),
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
        resample_steps=2,
        show_progress=False,
    )
    floor = mixture_frechet_floor(mixture, 2000, generator=torch.Generator().manual_seed(1))
    assert mixture_frechet_distance(out.reshape(2000, -1), mixture) < 2.0 * floor


# -- colorization --------------------------------------------------------------------------------------------


def test_the_colour_basis_is_orthonormal_with_gray_first() -> None:
    torch.testing.assert_close(COLOR_BASIS @ COLOR_BASIS.T, torch.eye(3, dtype=torch.float64))
    rgb = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(decouple_colors(rgb)[:, :1], 3**0.5 * rgb.mean(1, keepdim=True))
    torch.testing.assert_close(couple_colors(decouple_colors(rgb)), rgb)


def test_colorize_keeps_the_gray_channel_and_finds_the_colours() -> None:
    mixture = color_mixture()
    data = mixture.sample(NUM, torch.Generator().manual_seed(1))
    gray = data.mean(1, keepdim=True)
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config, eta=1.0)
    model = MixtureScoreModel(mixture, scheduler.sde)
    out = sdekit.colorize(
        model,
        scheduler,
        gray,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(3),
        resample_steps=2,
        show_progress=False,
    )
    assert out.shape == data.shape and out.dtype == gray.dtype
    torch.testing.assert_close(out.mean(1, keepdim=True), gray, rtol=0, atol=1e-6)
    # The colours are the ones the gray image selects under the exact conditional.
    mask = torch.zeros(1, 3, 4, 4)
    mask[:, 0] = 1
    exact = masked_conditional(decoupled_mixture(mixture), decouple_colors(data.double()), mask)
    assert float((exact.landed(decouple_colors(out.double())) == exact.selected()).float().mean()) >= 0.95
    assert float((out.std(dim=(2, 3)).mean())) > 0.05  # colours vary: not the gray image repeated


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture
def oracle() -> tuple[MixtureScoreModel, SDEScheduler, torch.Tensor, torch.Tensor]:
    mixture, mask = half_mask_mixture()
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config)
    return MixtureScoreModel(mixture, scheduler.sde), scheduler, mixture.sample(2), mask


def test_an_image_of_the_wrong_size_names_both_sizes(oracle) -> None:  # noqa: ANN001
    model, scheduler, _, _ = oracle
    with pytest.raises(ValueError, match=r"image has size \(1, 8, 8\).*model takes \(1, 4, 4\)"):
        sdekit.inpaint(model, scheduler, torch.zeros(2, 1, 8, 8), torch.ones(1, 1, 8, 8), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"image has size \(3, 4, 4\).*model takes \(1, 4, 4\)"):
        sdekit.inpaint(model, scheduler, torch.zeros(2, 3, 4, 4), torch.ones(1, 1, 4, 4), num_inference_steps=2)


def test_a_mask_of_the_wrong_size_names_both_sizes(oracle) -> None:  # noqa: ANN001
    model, scheduler, image, _ = oracle
    with pytest.raises(ValueError, match=r"mask has size \(1, 1, 4, 2\) but the image has size \(2, 1, 4, 4\)"):
        sdekit.inpaint(model, scheduler, image, torch.ones(1, 1, 4, 2), num_inference_steps=2)
    with pytest.raises(ValueError, match=r"mask has size \(4, 4\)"):
        sdekit.Inpainting(scheduler, image, torch.ones(4, 4))


def test_a_mask_that_is_not_binary_is_refused(oracle) -> None:  # noqa: ANN001
    model, scheduler, image, mask = oracle
    with pytest.raises(ValueError, match=r"mask must be binary.*holds 0.5"):
        sdekit.inpaint(model, scheduler, image, mask * 0.5, num_inference_steps=2)
    sdekit.Inpainting(scheduler, image, mask.bool())  # a boolean mask is fine


def test_colorize_needs_one_gray_channel_and_an_rgb_model(oracle) -> None:  # noqa: ANN001
    model, scheduler, _, _ = oracle  # a one-channel model
    with pytest.raises(ValueError, match=r"gray has size \(1, 4, 4\).*takes \(1, 4, 4\).*RGB model"):
        sdekit.colorize(model, scheduler, torch.zeros(2, 1, 4, 4), num_inference_steps=2)
    rgb = MixtureScoreModel(color_mixture(), scheduler.sde)
    with pytest.raises(ValueError, match=r"gray has size \(3, 4, 4\).*needs one gray channel.*\(1, 4, 4\)"):
        sdekit.colorize(rgb, scheduler, torch.zeros(2, 3, 4, 4), num_inference_steps=2)


def test_other_mistakes_say_what_to_change(oracle) -> None:  # noqa: ANN001
    model, scheduler, image, mask = oracle
    with pytest.raises(ValueError, match="resample_steps must be an integer >= 0"):
        sdekit.Inpainting(scheduler, image, mask, resample_steps=-1)
    with pytest.raises(ValueError, match="needs an sdekit scheduler.*sdekit.load_scheduler"):
        sdekit.inpaint(model, DDPMScheduler(), image, mask, num_inference_steps=2)
    scheduler.set_timesteps(3)
    inpainting = sdekit.Inpainting(scheduler, image, mask)
    x = inpainting.start(torch.randn(image.shape))
    t = scheduler.timesteps[0]
    x = inpainting(scheduler.step(model(x, t).sample, t, x).prev_sample)
    with pytest.raises(ValueError, match="once after every scheduler.step"):
        inpainting(x)
    # Resampling repeats evaluations, which a loop over scheduler.timesteps cannot do.
    scheduler.set_timesteps(3)
    inpainting = sdekit.Inpainting(scheduler, image, mask, resample_steps=1)
    x = inpainting.start(torch.randn(image.shape))
    with pytest.raises(ValueError, match=r"iterate over Inpainting.timesteps\(\), not scheduler.timesteps"):
        for t in scheduler.timesteps:
            x = inpainting(scheduler.step(model(x, t).sample, t, x).prev_sample)
    scheduler.set_timesteps(3)
    inpainting = sdekit.Inpainting(scheduler, image, mask, resample_steps=1)
    inpainting.start(torch.randn(image.shape))
    with pytest.raises(ValueError, match="call the Inpainting object on the new sample"):
        for t in inpainting.timesteps():
            x = scheduler.step(model(x, t).sample, t, x).prev_sample
