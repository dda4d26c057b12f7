"""The ``pf-ode`` sampler and ``sample_ode`` integrate the probability-flow ODE and give back the mixture."""

from __future__ import annotations

import pytest
import torch

import sdekit.scheduler
from sdekit import load_scheduler
from sdekit.ode import sample_ode
from sdekit.parametrization import model_output_to
from sdekit.sampling import sample_probability_flow
from sdekit.testing import (
    GaussianMixture,
    MixtureScoreModel,
    epsilon_oracle,
    mixture_frechet_distance,
    mixture_frechet_floor,
    score_oracle,
)
from sdekit_pf_ode import ProbabilityFlowScheduler
from sdekit_sdes import VPSDE

# VP on diffusers' DDPM table (epsilon model on DDPM timesteps), continuous sub-VP, VE (score model fed sigma).
SETUPS = {
    "vp": {},
    "subvp": {"sde": "subvp", "sde_params": {"beta_min": 0.1, "beta_max": 20.0}},
    "ve": {"sde": "ve", "prediction_type": "score"},
}
CONTINUOUS = {
    "vp-continuous": {"sde_params": {"beta_min": 0.1, "beta_max": 20.0}},
    "subvp": SETUPS["subvp"],
    "ve": SETUPS["ve"],
}
# The Frechet distance of one sample set scatters widely around its mean (its 95% quantile is ~3x the mean for
# an exact sampler), so quality is the mean over CHUNKS chunks, against the same statistic for the data.
CHUNKS, CHUNK = 200, 100


def _scheduler_and_oracle(
    config: dict, mixture: GaussianMixture, **overrides: object
) -> tuple[ProbabilityFlowScheduler, MixtureScoreModel]:
    scheduler = load_scheduler("pf-ode", **config, **overrides)
    make = score_oracle if scheduler.config.sde == "ve" else epsilon_oracle
    return scheduler, make(mixture, scheduler.sde)


def _prior(scheduler: ProbabilityFlowScheduler, n: int, seed: int) -> torch.Tensor:
    return scheduler.sde.prior_sampling((n, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(scheduler: ProbabilityFlowScheduler, model: MixtureScoreModel, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x).prev_sample
    return x


def _chunked_fd(mixture: GaussianMixture, x: torch.Tensor) -> float:
    return mixture_frechet_distance(x, mixture, CHUNK)


def _floor(mixture: GaussianMixture) -> float:
    return mixture_frechet_floor(mixture, CHUNKS * CHUNK, CHUNK, generator=torch.Generator().manual_seed(1234))


@pytest.mark.parametrize("solver", ["euler", "heun", "ab2"])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_frechet_distance_falls_as_steps_grow(setup: str, solver: str, mixture_2d: GaussianMixture) -> None:
    """On each solver's default grid (Karras's for VP and VE, uniform for sub-VP, whose noise range is wider)."""
    scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d, solver=solver)
    x_T = _prior(scheduler, CHUNKS * CHUNK, seed=1)
    fds = [_chunked_fd(mixture_2d, _run(scheduler, oracle, x_T, steps)) for steps in (3, 10, 20)]
    assert fds[0] > fds[1] > fds[2], fds
    assert fds[0] > 2 * _floor(mixture_2d), fds  # the quality criterion below is not met at every budget


@pytest.mark.parametrize("setup", list(SETUPS))
def test_generous_budget_gives_back_the_mixture(setup: str, mixture_2d: GaussianMixture) -> None:
    scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d, solver="heun")
    x = _run(scheduler, oracle, _prior(scheduler, CHUNKS * CHUNK, seed=2), 500)
    fd, floor = _chunked_fd(mixture_2d, x), _floor(mixture_2d)
    assert fd <= 1.5 * floor, (fd, floor)


@pytest.mark.parametrize("setup", list(CONTINUOUS))
def test_heun_converges_with_order_two_and_euler_with_order_one(setup: str, mixture_2d: GaussianMixture) -> None:
    """Median per-sample error against a tight dopri5 solution, as the step size halves (32, 64, 128 intervals).

    The median: a sample that starts next to the boundary between two modes' basins may land in the other mode
    until the step is very small, which would dominate a maximum or a mean.
    """
    scheduler, oracle = _scheduler_and_oracle(CONTINUOUS[setup], mixture_2d, denoise_final=False)
    x_T = _prior(scheduler, 64, seed=3)
    exact = sample_ode(scheduler.sde, score_fn=oracle.score_fn, x_T=x_T, rtol=1e-9, atol=1e-9).samples
    for solver, low, high in (("euler", 1.7, 2.4), ("heun", 3.3, 4.8), ("ab2", 3.3, 4.8)):
        scheduler = load_scheduler("pf-ode", **CONTINUOUS[setup], solver=solver, denoise_final=False)
        errors = [
            float((_run(scheduler, oracle, x_T, intervals) - exact).norm(dim=1).median()) for intervals in (32, 64, 128)
        ]
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert all(low < r < high for r in ratios), (solver, errors, ratios)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_many_steps_agree_with_sample_ode_and_sample_probability_flow(setup: str, mixture_2d: GaussianMixture) -> None:
    scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d, denoise_final=False)
    x_T = _prior(scheduler, 64, seed=4)
    x = _run(scheduler, oracle, x_T, 500)
    prediction_type = scheduler.config.prediction_type
    adaptive = sample_ode(scheduler.sde, model=oracle, prediction_type=prediction_type, x_T=x_T, rtol=1e-6, atol=1e-6)
    fixed = sample_probability_flow(scheduler.sde, oracle.score_fn, x_T=x_T, num_steps=499, method="heun")
    torch.testing.assert_close(x, adaptive.samples, rtol=0, atol=1e-2)
    torch.testing.assert_close(x, fixed, rtol=0, atol=1e-2)


@pytest.mark.parametrize("solver", ["euler", "heun", "ab2"])
def test_denoise_final_is_tweedie_at_the_last_level(solver: str, mixture_2d: GaussianMixture) -> None:
    """With denoise_final the n-th level steps straight to the data end: the x_0 estimate (Tweedie's formula) at the
    state the ODE has reached there, with no evaluation at sampling_eps; without it, the same n + 1 points, the ODE
    integrated on to sampling_eps."""
    for setup in ("vp", "ve"):
        scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d, solver=solver, denoise_final=False)
        denoising, _ = _scheduler_and_oracle(SETUPS[setup], mixture_2d, solver=solver, denoise_final=True)
        x_T = _prior(scheduler, 32, seed=5)
        scheduler.set_timesteps(20)
        denoising.set_timesteps(20)
        # The denoising run visits the same levels, less Heun's last evaluation (its corrector at sampling_eps).
        assert torch.equal(denoising.timesteps, scheduler.timesteps[: len(denoising.timesteps)])
        assert len(scheduler.timesteps) == len(denoising.timesteps) + (solver == "heun")
        assert min(denoising.eval_times) > scheduler.sde.sampling_eps
        x, states = x_T, []
        for t in scheduler.timesteps:
            states.append(x)
            x = scheduler.step(oracle(x, t).sample, t, x).prev_sample
        # The state at the 20th level: the input of the last evaluation there (Heun: its predictor).
        last = len(denoising.timesteps) - 1
        x_last, t_last = states[last], denoising.timesteps[last]
        tweedie = model_output_to(
            scheduler.sde,
            oracle(x_last, t_last).sample,
            x_last,
            denoising.eval_times[last],
            scheduler.config.prediction_type,
            "sample",
        )
        torch.testing.assert_close(_run(denoising, oracle, x_T, 20), tweedie, rtol=0, atol=1e-10)


def test_sample_ode_denoise_is_tweedie_at_sampling_eps(mixture_2d: GaussianMixture) -> None:
    for setup in ("vp", "ve"):
        scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d)
        x_T = _prior(scheduler, 32, seed=5)
        eps = scheduler.sde.sampling_eps
        plain = sample_ode(scheduler.sde, score_fn=oracle.score_fn, x_T=x_T)
        denoised = sample_ode(scheduler.sde, score_fn=oracle.score_fn, x_T=x_T, denoise=True)
        assert denoised.nfe == plain.nfe + 1
        expected = model_output_to(
            scheduler.sde, oracle.score_fn(plain.samples, eps), plain.samples, eps, "score", "sample"
        )
        torch.testing.assert_close(denoised.samples, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("denoise_final", [True, False])
@pytest.mark.parametrize("solver", ["euler", "heun", "ab2"])
def test_one_model_call_per_timestep(solver: str, denoise_final: bool, mixture_2d: GaussianMixture) -> None:
    scheduler, oracle = _scheduler_and_oracle(
        {}, mixture_2d, solver=solver, denoise_final=denoise_final, time_grid="uniform"
    )
    assert scheduler.order == (2 if solver == "heun" else 1)
    for steps in (1, 2, 3, 8):
        oracle.num_calls = 0
        _run(scheduler, oracle, _prior(scheduler, 4, seed=6), steps)
        # n steps between n + 1 points; Heun's last step to the data end is Euler's (one evaluation).
        expected = 2 * steps - denoise_final if solver == "heun" else steps
        assert oracle.num_calls == len(scheduler.timesteps) == expected
        # Evaluation `order * k` is at noise level k: pipelines slice timesteps[t_start * order:].
        starts = scheduler.timesteps[:: scheduler.order]
        torch.testing.assert_close(starts, torch.linspace(999, 0, steps + 1)[: len(starts)])


def test_sampling_is_deterministic_and_ignores_the_generator(mixture_2d: GaussianMixture) -> None:
    scheduler, oracle = _scheduler_and_oracle({}, mixture_2d)
    x_T = _prior(scheduler, 16, seed=7)
    runs = []
    for seed in (0, 1):
        scheduler.set_timesteps(10)
        x, gen = x_T, torch.Generator().manual_seed(seed)
        for t in scheduler.timesteps:
            x = scheduler.step(oracle(x, t).sample, t, x, generator=gen).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_img2img_start_at_an_even_evaluation(mixture_2d: GaussianMixture) -> None:
    """Starting part-way (as diffusers' img2img pipelines do) runs the remaining intervals; an odd start is refused."""
    scheduler, oracle = _scheduler_and_oracle({}, mixture_2d, solver="heun")
    x = _prior(scheduler, 8, seed=8)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2 * scheduler.order)
    timesteps = scheduler.timesteps[2 * scheduler.order :]
    oracle.num_calls = 0
    for t in timesteps:
        x = scheduler.step(oracle(x, t).sample, t, x).prev_sample
    assert oracle.num_calls == len(timesteps) and torch.isfinite(x).all()
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(3)
    t = scheduler.timesteps[3]
    with pytest.raises(ValueError, match="even index"):
        scheduler.step(oracle(x, t).sample, t, x)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_sample_ode_counts_evaluations_and_gives_back_the_mixture(setup: str, mixture_2d: GaussianMixture) -> None:
    scheduler, oracle = _scheduler_and_oracle(SETUPS[setup], mixture_2d)
    gen = torch.Generator().manual_seed(9)
    result = sample_ode(
        scheduler.sde,
        (CHUNKS * CHUNK, 2),
        model=oracle,
        prediction_type=scheduler.config.prediction_type,
        generator=gen,
        dtype=torch.float64,
    )
    assert result.nfe == oracle.num_calls > 10
    fd, floor = _chunked_fd(mixture_2d, result.samples), _floor(mixture_2d)
    assert fd <= 1.5 * floor, (fd, floor)


def test_sample_ode_keeps_the_dtype_of_x_T(mixture_2d: GaussianMixture) -> None:
    sde = VPSDE()
    oracle = MixtureScoreModel(mixture_2d, sde, time_input="continuous")
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(10)).to(torch.bfloat16)
    result = sample_ode(sde, model=oracle, time_input="continuous", x_T=x_T)
    reference = sample_ode(sde, score_fn=oracle.score_fn, x_T=x_T.to(torch.float32))
    assert result.samples.dtype == torch.bfloat16
    torch.testing.assert_close(result.samples.float(), reference.samples, rtol=0, atol=0.05)


class _CubicDriftSDE(VPSDE):
    """A VP SDE with a (made-up) nonlinear drift: not something the scaled ODE form applies to."""

    def sde(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        drift, diffusion = super().sde(x, t)
        return drift - x**3, diffusion


def test_bad_input(mixture_2d: GaussianMixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="solver must be one of 'euler', 'heun', 'ab2'; got 'rk4'"):
        ProbabilityFlowScheduler(solver="rk4")
    with pytest.raises(ValueError, match="denoise_final"):
        ProbabilityFlowScheduler(denoise_final="yes")
    scheduler = ProbabilityFlowScheduler(denoise_final=False)
    with pytest.raises(ValueError, match="timesteps of 1 level leave no interval"):
        scheduler.set_timesteps(timesteps=[500])
    # With sampling_eps = 0 the ODE cannot be integrated down to it (sigma = 0), though denoise_final (which stops
    # at the last noisy level) can.
    continuous = {"sde_params": {"beta_min": 0.1, "beta_max": 20.0}, "sampling_eps": 0.0}
    ProbabilityFlowScheduler(**continuous).set_timesteps(10)
    with pytest.raises(ValueError, match="sigma > 0"):
        ProbabilityFlowScheduler(**continuous, denoise_final=False).set_timesteps(10)
    with pytest.raises(ValueError, match="time_grid='logsnr' needs a positive noise level at sampling_eps=0.0"):
        ProbabilityFlowScheduler(**continuous, time_grid="logsnr").set_timesteps(10)
    monkeypatch.setattr(sdekit.scheduler, "get_sde", lambda name, **params: _CubicDriftSDE())
    with pytest.raises(ValueError, match="linear drift"):
        ProbabilityFlowScheduler()
    monkeypatch.undo()

    sde = VPSDE()
    oracle = MixtureScoreModel(mixture_2d, sde)
    with pytest.raises(ValueError, match="exactly one of model"):
        sample_ode(sde, (4, 2))
    with pytest.raises(ValueError, match="exactly one of model"):
        sample_ode(sde, (4, 2), model=oracle, score_fn=oracle.score_fn)
    with pytest.raises(ValueError, match="describe a model"):
        sample_ode(sde, (4, 2), score_fn=oracle.score_fn, prediction_type="epsilon")
    with pytest.raises(ValueError, match="exactly one of shape"):
        sample_ode(sde, (4, 2), score_fn=oracle.score_fn, x_T=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="method must be one of 'dopri5'.*'adaptive_heun'"):
        sample_ode(sde, (4, 2), score_fn=oracle.score_fn, method="euler")
    with pytest.raises(ValueError, match="rtol must be a number > 0"):
        sample_ode(sde, (4, 2), score_fn=oracle.score_fn, rtol=0)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        sample_ode(sde, (4, 2), model=oracle, prediction_type="eps")
    with pytest.raises(FloatingPointError, match="sample_ode"):
        sample_ode(sde, (4, 2), score_fn=lambda x, t: torch.full_like(x, float("nan")), method="bosh3")
