"""Accuracy on the exact-score oracle: the order of convergence of every configuration, and the quality at 10 and
20 model calls against diffusers' ``DPMSolverMultistepScheduler`` on the same oracle, noise and configuration."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import sdekit
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from sdekit.testing import GaussianMixture, MixtureScoreModel, benchmark_mixture, mixture_frechet_distance

CONFIG = DDPMScheduler(clip_sample=False).config  # the benchmark's mixture reaches beyond [-1, 1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread (set before the module's other fixtures) avoids thread overheads that dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- convergence order ---------------------------------------------------------------------------------------

CONTINUOUS_VP = {"sde_params": {"beta_min": 0.1, "beta_max": 20.0}, "time_input": "continuous"}


def _small_mixture() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[-0.6, 0.2], [0.5, -0.3], [0.1, 0.7]]),
        stds=torch.tensor([0.12, 0.2, 0.08]),
        weights=torch.tensor([0.5, 0.3, 0.2]),
    )


def _solve(calls: int, **settings) -> torch.Tensor:
    """The probability-flow ODE from the same 64 prior draws to ``sampling_eps`` (no final denoising), float64."""
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, **CONTINUOUS_VP, denoise_final=False, **settings)
    oracle = MixtureScoreModel(_small_mixture(), scheduler.sde, "epsilon", "continuous")
    scheduler.set_timesteps(calls)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t).sample, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def exact_solution() -> torch.Tensor:
    """Order 3 multistep at 2000 calls: ~1e-7 from the exact ODE solution, far below the errors measured."""
    return _solve(2000, solver_order=3, lower_order_final=False)


CONFIGURATIONS = [
    dict(solver_order=order, algorithm_type=algorithm, method=method, solver_type=form)
    for order, algorithm, method, form in itertools.product(
        (1, 2, 3), ("dpmsolver++", "dpmsolver"), ("multistep", "singlestep"), ("midpoint", "taylor")
    )
    if order == 2 or form == "midpoint"  # the form only changes second-order steps
]


@pytest.mark.parametrize(
    "settings",
    CONFIGURATIONS,
    ids=["-".join(str(v) for v in c.values()) for c in CONFIGURATIONS],
)
def test_global_error_falls_with_the_order(settings: dict, exact_solution: torch.Tensor) -> None:
    """The global error falls as ``calls^-order``: from 100 to 200 calls the measured rates are 1.0 (order 1),
    1.66-1.83 (order 2) and 2.51-2.93 (order 3), still rising towards 2 and 3 there. The bounds sit between the
    orders, so that a solver one order short fails."""
    order = settings["solver_order"]
    # Singlestep order 3 spends 3k + 2 calls in k steps of order 3 and one of order 2 (DPM-Solver-fast); with other
    # counts its last step is first order, and the global order 2 (tested in test_dpm_solver_coefficients).
    calls = (101, 200) if settings["method"] == "singlestep" and order == 3 else (100, 200)
    errors = [float((_solve(n, lower_order_final=False, **settings) - exact_solution).abs().max()) for n in calls]
    rate = math.log(errors[0] / errors[1]) / math.log(calls[1] / calls[0])
    assert rate > {1: 0.8, 2: 1.45, 3: 2.2}[order], (errors, rate)


# -- quality at 10 and 20 calls, against diffusers -----------------------------------------------------------

SAMPLES = 4000


@pytest.fixture(scope="module")
def oracle() -> MixtureScoreModel:
    """The benchmark's oracle (benchmarks/quality_vs_nfe.py): an 8-component mixture in 16 dimensions, exact noise
    prediction on the DDPM linear table's timesteps."""
    return MixtureScoreModel(benchmark_mixture(), sdekit.get_sde("vp", num_train_timesteps=1000), "epsilon", "ddpm")


def _frechet(scheduler, oracle: MixtureScoreModel, calls: int) -> float:
    """A pipeline's loop from the same noise; the Frechet distance of the samples to the mixture's moments."""
    scheduler.set_timesteps(calls)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, 1, 4, 4, generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma
    oracle.num_calls = 0
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    assert oracle.num_calls == calls
    return mixture_frechet_distance(x, oracle.mixture, SAMPLES)


@pytest.mark.parametrize("calls", [10, 20])
@pytest.mark.parametrize("order", [2, 3])
def test_at_or_below_diffusers_dpm_solver_multistep(oracle: MixtureScoreModel, order: int, calls: int) -> None:
    """Measured (docs/plugins.md): order 2 at 10 calls 0.014 against diffusers' 0.073; the issue asks for at most
    1.2 times diffusers' at 10 calls (order 2), and at or below it for orders 2 and 3 at 10 and 20 calls."""
    peer = _frechet(DPMSolverMultistepScheduler.from_config(CONFIG, solver_order=order), oracle, calls)
    ours = _frechet(sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=order), oracle, calls)
    assert ours <= peer, (ours, peer)
    if order == 2 and calls == 10:
        assert ours <= 1.2 * peer, (ours, peer)
