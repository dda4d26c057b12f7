"""The ``pc`` sampler: predictor-corrector sampling (score-SDE) against the exact-score mixture oracle."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

import sdekit
from sdekit.testing import (
    GaussianMixture,
    MixtureScoreModel,
    frechet_distance,
    mixture_frechet_distance,
    mixture_frechet_floor,
)
from sdekit_pc import CORRECTORS, PREDICTORS, PCScheduler
from sdekit_pc.predictors import ancestral
from sdekit_sdes import VESDE, VPSDE

from conftest import float64_table

CONTINUOUS_VP = {"beta_min": 0.1, "beta_max": 20.0}


def _scheduler_and_oracle(
    kind: str, mixture: GaussianMixture, **overrides: object
) -> tuple[PCScheduler, MixtureScoreModel]:
    """``vp``: a DDPM table with an epsilon model on DDPM timesteps; ``subvp``: continuous sub-VP with a
    v-prediction model on continuous time; ``ve``: VE with a score model on sigma (an NCSN++ stand-in)."""
    if kind == "vp":
        scheduler = PCScheduler(**overrides)
        return scheduler, MixtureScoreModel(mixture, scheduler.sde, "epsilon", "ddpm")
    if kind == "subvp":
        scheduler = PCScheduler(
            sde="subvp",
            sde_params=CONTINUOUS_VP,
            prediction_type="v_prediction",
            time_input="continuous",
            **overrides,
        )
        return scheduler, MixtureScoreModel(mixture, scheduler.sde, "v_prediction", "continuous")
    scheduler = PCScheduler(sde="ve", prediction_type="score", **overrides)
    return scheduler, MixtureScoreModel(mixture, scheduler.sde, "score", "sigma")


def _sample(
    scheduler: PCScheduler,
    model: MixtureScoreModel,
    num_levels: int,
    batch: int,
    generator: torch.Generator | list[torch.Generator],
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The loop a diffusers pipeline runs; checks that the model is called once per entry of ``timesteps``."""
    scheduler.set_timesteps(num_levels)
    shape = (batch, *model.mixture.event_shape)
    x = randn_tensor(shape, generator=generator, dtype=dtype) * scheduler.init_noise_sigma
    calls = model.num_calls
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=generator).prev_sample
    assert model.num_calls - calls == len(scheduler.timesteps)
    return x


@pytest.fixture
def mixture_images() -> GaussianMixture:
    """Three components over 1 x 8 x 8 "images" (64 values per sample) with diagonal covariances."""
    gen = torch.Generator().manual_seed(0)
    return GaussianMixture(
        means=torch.randn(3, 64, generator=gen, dtype=torch.float64),
        stds=0.1 + 0.4 * torch.rand(3, 64, generator=gen, dtype=torch.float64),
        weights=torch.tensor([0.5, 0.3, 0.2]),
        event_shape=(1, 8, 8),
    )


# -- quality against the oracle --------------------------------------------------------------------------------

N_SAMPLES = 20000


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_frechet_distance_falls_with_levels_and_reaches_the_floor(kind: str, mixture_2d: GaussianMixture) -> None:
    """PC (reverse diffusion + Langevin at the paper's snr 0.16) converges to the data for VP (DDPM table), sub-VP
    and VE.

    On 2-d data the Langevin step uses the batch-averaged norms: with two values per sample, a sample's own
    ``||z|| / ||score||`` is heavy-tailed (the score vanishes at the modes), see the per-sample tests below.
    """
    gen = torch.Generator().manual_seed(3)
    floor = mixture_frechet_floor(mixture_2d, N_SAMPLES, generator=gen)
    distances = []
    for levels in (5, 10, 500):
        scheduler, oracle = _scheduler_and_oracle(
            kind, mixture_2d, predictor="reverse_diffusion", snr=0.16, norm="batch"
        )
        distances.append(mixture_frechet_distance(_sample(scheduler, oracle, levels, N_SAMPLES, gen), mixture_2d))
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] <= 1.5 * floor, (distances, floor)


def test_langevin_corrector_beats_predictor_only(mixture_2d: GaussianMixture) -> None:
    """The score-SDE paper's Table 1 claim at equal noise levels: SMLD (VE) ancestral sampling, 10 levels.

    Many samples at few levels, so the error is the sampler's bias, not Monte Carlo noise (over seeds the
    corrector's distance is 0.64 to 0.79 times the predictor's alone).
    """
    batch = 20000
    data = mixture_2d.sample(batch, torch.Generator().manual_seed(4), dtype=torch.float64)
    distances = {}
    for corrector in ("langevin", "none"):
        scheduler, oracle = _scheduler_and_oracle(
            "ve", mixture_2d, predictor="ancestral", corrector=corrector, norm="batch"
        )
        x = _sample(scheduler, oracle, 10, batch, torch.Generator().manual_seed(5))
        distances[corrector] = frechet_distance(x, data)
    assert distances["langevin"] < 0.85 * distances["none"], distances


def test_langevin_corrector_with_per_sample_norms_beats_predictor_only(mixture_images: GaussianMixture) -> None:
    """The same claim with reverse diffusion and per-sample norms (the default) on 64-value images, snr 0.3.

    Over seeds the corrector's distance is 0.40 to 0.61 times the predictor's alone.
    """
    batch = 2000
    data = mixture_images.sample(batch, torch.Generator().manual_seed(6), dtype=torch.float64)
    distances = {}
    for corrector in ("langevin", "none"):
        scheduler, oracle = _scheduler_and_oracle(
            "ve", mixture_images, predictor="reverse_diffusion", corrector=corrector, snr=0.3
        )
        x = _sample(scheduler, oracle, 20, batch, torch.Generator().manual_seed(7))
        distances[corrector] = frechet_distance(x, data)
    assert distances["langevin"] < 0.75 * distances["none"], distances


# -- every predictor and corrector ----------------------------------------------------------------------------

COMBINATIONS = [
    (kind, predictor, corrector)
    for kind in ("vp", "subvp", "ve")
    for predictor in PREDICTORS
    for corrector in CORRECTORS
    if not (predictor == "none" and corrector == "none")
]


@pytest.mark.parametrize("kind,predictor,corrector", COMBINATIONS)
def test_every_predictor_and_corrector_runs(
    kind: str, predictor: str, corrector: str, mixture_images: GaussianMixture
) -> None:
    scheduler, oracle = _scheduler_and_oracle(
        kind, mixture_images, predictor=predictor, corrector=corrector, corrector_steps=2
    )
    x = _sample(scheduler, oracle, 6, 16, torch.Generator().manual_seed(0), dtype=torch.float32)
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and torch.isfinite(x).all()
    # Every level is listed once per evaluation: the corrector's, then the predictor's.
    per_level = (0 if corrector == "none" else 2) + (0 if predictor == "none" else 1)
    assert len(scheduler.timesteps) == 6 * per_level
    levels = scheduler.timesteps.reshape(6, per_level)
    assert torch.all(levels == levels[:, :1]) and torch.all(levels[1:, 0] < levels[:-1, 0])


@pytest.mark.parametrize("variance_type,ancestral_variance", [("fixed_small", None), ("fixed_large", "beta")])
def test_ancestral_vp_is_ddpm(variance_type: str, ancestral_variance: str | None, mixture_2d: GaussianMixture) -> None:
    """On a DDPM table the ancestral predictor is DDPMScheduler step for step, at 10, 50 and 1000 steps on DDPM's
    own timesteps: with the default variance (beta_tilde) its default ``fixed_small``, with ``beta`` its
    ``fixed_large``."""
    reference = float64_table(diffusers.DDPMScheduler(variance_type=variance_type, clip_sample=False))
    chosen = {} if ancestral_variance is None else {"ancestral_variance": ancestral_variance}
    ours = PCScheduler.from_config(reference.config, predictor="ancestral", corrector="none", **chosen)
    oracle = MixtureScoreModel(mixture_2d, ours.sde)
    start = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (10, 50, 1000):
        reference.set_timesteps(steps)
        # DDPM's own (leading) grid, passed to ours as explicit timesteps.
        ours.set_timesteps(timesteps=reference.timesteps)
        assert torch.equal(ours.timesteps, reference.timesteps.to(torch.float32))
        results = []
        for scheduler in (reference, ours):
            gen, x = torch.Generator().manual_seed(1), start
            for t in scheduler.timesteps:
                x = scheduler.step(oracle(x, t).sample, t, x, generator=gen).prev_sample
            results.append(x)
        torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["vp", "subvp", "ve"])
def test_ancestral_step_is_the_exact_posterior_for_every_sde(kind: str) -> None:
    """With data at one point ``m`` the score is exact and Tweedie's ``x_0`` is ``m`` itself, so a step drawn from
    the posterior ``q(x_{i+1} | x_i, x_0)`` (``beta_tilde``) carries the exact marginal ``N(alpha_i m, sigma_i^2)``
    to the exact marginal one level down, for VP, sub-VP and VE alike. Checked in closed form (the step is affine
    and the marginals Gaussian), over a coarse grid whose steps are far from one training step.

    Keeping the marginals does not single the posterior out (DDIM's steps keep them too), so the step's weight on
    ``x_i`` is checked against the posterior's own, ``k sigma_{i+1}^2 / sigma_i^2`` with ``k = alpha_i /
    alpha_{i+1}``, for both variances (they share the mean). The forward step's variance (``beta``) adds too much
    noise, so the marginal check can fail."""
    scheduler = PCScheduler(sde=kind, predictor="ancestral", corrector="none")
    times = [scheduler.sde.T, 0.7, 0.4, 0.15, 0.05]
    alphas, sigmas = (c.tolist() for c in scheduler.sde.marginal_coeffs(torch.tensor(times, dtype=torch.float64)))
    m = 0.8
    for variance in ("beta_tilde", "beta"):
        updates = ancestral(alphas[:-1], sigmas[:-1], alphas[1:], sigmas[1:], variance)
        mean, var = alphas[0] * m, sigmas[0] ** 2
        for update, alpha, sigma, alpha_next, sigma_next in zip(updates, alphas, sigmas, alphas[1:], sigmas[1:]):
            # x -> c_x x + c_s s(x) + c_z z with s(x) = -(x - alpha m) / sigma^2.
            slope = update.sample_coeff - update.score_coeff / sigma**2
            assert slope == pytest.approx((alpha / alpha_next) * sigma_next**2 / sigma**2, rel=1e-12)
            mean = slope * mean + update.score_coeff * alpha * m / sigma**2
            var = slope**2 * var + update.noise_coeff**2
            assert mean == pytest.approx(alpha_next * m, rel=1e-12)
            if variance == "beta_tilde":
                assert var == pytest.approx(sigma_next**2, rel=1e-12)
            else:
                assert var > (1 + 1e-6) * sigma_next**2


def test_ancestral_refuses_a_step_on_which_the_noise_rises() -> None:
    """A step whose noise-to-signal ratio goes up has no forward transition: a clear error, not a NaN."""
    with pytest.raises(ValueError, match="needs sigma/alpha not to rise from one level to the next"):
        ancestral([0.9], [0.3], [0.8], [0.6], "beta_tilde")


@pytest.mark.parametrize("kind,predictor", [("ve", "reverse_diffusion"), ("ve", "ancestral"), ("vp", "ancestral")])
def test_last_step_goes_to_the_clean_data(kind: str, predictor: str, mixture_2d: GaussianMixture) -> None:
    """The last predictor step ends at the data (sigma = 0), so without its noise it is the x_0 estimate."""
    scheduler, oracle = _scheduler_and_oracle(kind, mixture_2d, predictor=predictor)
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 2, generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = scheduler.step(oracle(x, t).sample, t, x, generator=gen)
        x = out.prev_sample
    torch.testing.assert_close(out.prev_sample, out.pred_original_sample, rtol=1e-9, atol=1e-9)


# -- the corrector step, by hand ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("corrector,norm", [("langevin", "per_sample"), ("langevin", "batch"), ("ald", "per_sample")])
def test_corrector_step_matches_the_formula(
    kind: str, corrector: str, norm: str, mixture_images: GaussianMixture
) -> None:
    """x + eps s + sqrt(2 eps) z with eps = 2 alpha (snr ||z|| / ||s||)^2 (langevin) or 2 alpha (snr sigma)^2 (ald).

    alpha is 1 for VE, and for VP 1 - b of the grid's actual step from this level down to the next one,
    b = 1 - alpha_bar(t_i) / alpha_bar(t_{i+1}) (the reference code's 1 - beta_i, whose step is one training level).
    """
    snr = 0.3
    scheduler, oracle = _scheduler_and_oracle(
        kind, mixture_images, predictor="none", corrector=corrector, snr=snr, norm=norm, denoise_final=False
    )
    # sigma = 1 then 0.5 / DDPM timesteps 700 then 500
    scheduler.set_timesteps(timesteps=[1.0, 0.5] if kind == "ve" else [700.0, 500.0])
    t_model = scheduler.timesteps[0]
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model_output = oracle(x, t_model).sample
    stepped = scheduler.step(model_output, t_model, x, generator=torch.Generator().manual_seed(1)).prev_sample

    t = scheduler.eval_times[0]
    sde = scheduler.sde
    _, sigma = sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64))
    # The oracle returns the score (VE) or epsilon = -sigma score (VP).
    score = model_output if kind == "ve" else -model_output / sigma
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if kind == "ve":
        alpha = 1.0
    else:
        alpha = float(sde.alpha_bar(t) / sde.alpha_bar(scheduler.eval_times[1]))
        assert alpha < 0.5  # two hundred training levels: far from the reference code's 1 - beta_700 = 0.986
    if corrector == "ald":
        eps = 2 * alpha * (snr * float(sigma)) ** 2
    else:
        z_norms = torch.stack([z[i].norm() for i in range(8)])
        s_norms = torch.stack([score[i].norm() for i in range(8)])
        if norm == "batch":
            z_norms, s_norms = z_norms.mean().expand(8), s_norms.mean().expand(8)
        eps = (2 * alpha * (snr * z_norms / s_norms) ** 2).reshape(8, 1, 1, 1)
    expected = x + eps * score + (2 * eps) ** 0.5 * z
    torch.testing.assert_close(stepped, expected, rtol=1e-9, atol=1e-9)


# -- batches and seeds ----------------------------------------------------------------------------------------


def test_per_sample_norms_keep_a_sample_independent_of_its_batch_mates(mixture_images: GaussianMixture) -> None:
    def run(norm: str, seeds: list[int]) -> torch.Tensor:
        scheduler, oracle = _scheduler_and_oracle("ve", mixture_images, norm=norm, corrector_steps=2)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return _sample(scheduler, oracle, 8, len(seeds), generators)

    seeds = [10, 11, 12, 13]
    batched = run("per_sample", seeds)
    alone = torch.cat([run("per_sample", [seed]) for seed in seeds[:2]])
    torch.testing.assert_close(alone, batched[:2], rtol=1e-9, atol=1e-9)
    # The reference code's batch-averaged norms couple the samples.
    batch_norms = run("batch", seeds)
    assert not torch.allclose(batch_norms, batched, atol=1e-3)
    assert not torch.allclose(run("batch", seeds[:1]), batch_norms[:1], atol=1e-3)


def test_same_seed_same_samples(mixture_2d: GaussianMixture) -> None:
    def run(seed: int) -> torch.Tensor:
        scheduler, oracle = _scheduler_and_oracle("vp", mixture_2d, corrector_steps=2)
        return _sample(scheduler, oracle, 10, 32, torch.Generator().manual_seed(seed), dtype=torch.float32)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


# -- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"predictor": "langevin"}, "predictor must be one of 'reverse_diffusion', 'euler_maruyama', 'ancestral'"),
        ({"corrector": "euler"}, "corrector must be one of 'langevin', 'ald', 'none'"),
        ({"norm": "sample"}, "norm must be one of 'per_sample', 'batch'"),
        ({"snr": 0.0}, "snr must be a finite number > 0"),
        ({"snr": -0.1}, "snr must be a finite number > 0"),
        ({"snr": math.nan}, "snr must be a finite number > 0"),
        ({"corrector_steps": -1}, "corrector_steps must be an integer >= 0, got -1"),
        ({"corrector_steps": 1.5}, "corrector_steps must be an integer >= 0"),
        ({"predictor": "none", "corrector": "none"}, "evaluates nothing"),
        ({"predictor": "none", "corrector_steps": 0}, "evaluates nothing"),
    ],
)
def test_bad_configuration(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        PCScheduler(**overrides)


class _NonlinearVP(VPSDE):
    """A VP SDE with a cubic term in its drift, discretized by Euler-Maruyama."""

    def sde(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drift, diffusion = super().sde(x, t)
        return drift - x**3, diffusion

    def discretize(self, x: torch.Tensor, t: float | torch.Tensor, dt: float | None = None):
        return sdekit.SDE.discretize(self, x, t, dt)


class _StateDependentNoiseVE(VESDE):
    def sde(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drift, diffusion = super().sde(x, t)
        return drift, diffusion * (1 + x.abs())


@pytest.mark.parametrize(
    "sde,predictor",
    [
        (_NonlinearVP(), "reverse_diffusion"),
        (_NonlinearVP(), "euler_maruyama"),
        (_StateDependentNoiseVE(), "euler_maruyama"),
    ],
)
def test_non_linear_sdes_are_rejected_at_set_timesteps(sde: sdekit.SDE, predictor: str) -> None:
    scheduler = PCScheduler(predictor=predictor)
    scheduler.sde = sde
    with pytest.raises(ValueError, match="drift is linear in x"):
        scheduler.set_timesteps(10)


def test_score_sde_ve_config_maps_to_ve() -> None:
    config = diffusers.ScoreSdeVeScheduler(sigma_min=0.02, sigma_max=90.0, snr=0.2, correct_steps=3).config
    for scheduler in (PCScheduler.from_config(config), sdekit.load_scheduler("pc", config)):
        assert isinstance(scheduler, PCScheduler) and isinstance(scheduler.sde, VESDE)
        assert (scheduler.sde.sigma_min, scheduler.sde.sigma_max, scheduler.sde.N) == (0.02, 90.0, 2000)
        assert scheduler.config.snr == 0.2 and scheduler.config.corrector_steps == 3
        assert scheduler.config.prediction_type == "score" and scheduler.init_noise_sigma == pytest.approx(90.0)
        scheduler.set_timesteps(5)
        assert len(scheduler.timesteps) == 5 * 4
        assert float(scheduler.timesteps[0]) == pytest.approx(90.0, rel=1e-6)  # sigma(T), the model's input
    defaults = PCScheduler.from_config(diffusers.ScoreSdeVeScheduler().config)
    assert (defaults.config.snr, defaults.config.corrector_steps, defaults.sde.sigma_max) == (0.15, 1, 1348.0)


def test_ddpm_config_maps_to_the_discrete_vp_and_subvp_overrides_it() -> None:
    config = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").config
    vp = sdekit.load_scheduler("pc", config)
    subvp = sdekit.load_scheduler("pc", config, sde="subvp")
    assert type(vp.sde).__name__ == "VPSDE" and vp.sde.is_discrete
    assert type(subvp.sde).__name__ == "SubVPSDE" and subvp.sde.is_discrete
    torch.testing.assert_close(subvp.sde.alpha_bar(0.5), vp.sde.alpha_bar(0.5))
