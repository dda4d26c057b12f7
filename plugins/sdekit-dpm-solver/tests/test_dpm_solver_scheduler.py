"""The ``dpm-solver`` sampler as sdekit sees it: registered, conformant, DDIM at order 1, valid input only, the
levels and evaluations it plans, and any SDE whose kernel gives a log-SNR (one registered here at run time)."""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import sdekit
import torch
from diffusers import DDPMScheduler
from sdekit.grids import noise_to_signal, time_grid
from sdekit.testing import GaussianMixture, MixtureScoreModel, check_scheduler, frechet_distance

from sdekit_dpm_solver import DPMSolverScheduler
from sdekit_dpm_solver.coefficients import SINGLESTEP_NODES

CONFIG = DDPMScheduler(clip_sample=False).config


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread (set before the module's other fixtures) avoids thread overheads that dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _mixture() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[-0.6, 0.2], [0.5, -0.3], [0.1, 0.7]]),
        stds=torch.tensor([0.12, 0.2, 0.08]),
        weights=torch.tensor([0.5, 0.3, 0.2]),
    )


def _sample(scheduler, mixture: GaussianMixture, steps: int | None = None, timesteps=None, n: int = 256, seed: int = 0):
    """The loop of a pipeline on the exact oracle, in float64."""
    oracle = MixtureScoreModel(mixture, scheduler.sde, scheduler.config.prediction_type, scheduler.time_input)
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma
    oracle.num_calls = 0
    for t in scheduler.timesteps:
        x = scheduler.step(oracle(x, t).sample, t, x, generator=gen).prev_sample
    assert oracle.num_calls == len(scheduler.timesteps)
    return x


def test_registered_as_dpm_solver() -> None:
    assert sdekit.get_sampler_class("dpm-solver") is DPMSolverScheduler
    (info,) = [p for p in sdekit.list_plugins(kind="sampler") if p.name == "dpm-solver"]
    assert (info.distribution, info.status, info.api_version) == ("sdekit-dpm-solver", "ok", sdekit.API_VERSION)
    assert isinstance(sdekit.load_scheduler("dpm-solver", CONFIG), DPMSolverScheduler)


@pytest.mark.parametrize(
    "config",
    [{}, {"method": "singlestep", "solver_order": 3, "algorithm_type": "dpmsolver"}, {"sde": "ve"}],
    ids=["default", "singlestep-3-noise", "ve"],
)
def test_conformance_kit(config: dict) -> None:
    report = check_scheduler("dpm-solver", **config)
    assert "oracle" in report.passed and "pipelines" in report.passed and not report.notes


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("method", ["multistep", "singlestep"])
def test_order_1_is_ddim_on_a_ddpm_table(algorithm_type: str, method: str) -> None:
    """Given the same levels, DPM-Solver-1 and the built-in ddim (eta = 0) step identically in float64."""
    levels = [999, 850, 600, 420, 250, 120, 40, 7, 0]
    dpm = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=1, algorithm_type=algorithm_type, method=method)
    ddim = sdekit.load_scheduler("ddim", CONFIG, eta=0.0)
    ours, theirs = _sample(dpm, _mixture(), timesteps=levels), _sample(ddim, _mixture(), timesteps=levels)
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize("algorithm_type", ["dpmsolver++", "dpmsolver"])
def test_order_1_is_ddim_on_its_own_grid(algorithm_type: str) -> None:
    """On a continuous VP SDE, DPM-Solver-1's default log-SNR levels handed to ddim give ddim's samples."""
    settings = {"sde_params": {"beta_min": 0.1, "beta_max": 20.0}, "time_input": "continuous"}
    dpm = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=1, algorithm_type=algorithm_type, **settings)
    ours = _sample(dpm, _mixture(), steps=7)
    ddim = sdekit.load_scheduler("ddim", CONFIG, eta=0.0, **settings)
    theirs = _sample(ddim, _mixture(), timesteps=dpm.eval_times)
    assert (ours - theirs).abs().max() < 1e-6


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"solver_order": 0}, "solver_order must be 1, 2 or 3, got 0."),
        ({"solver_order": 4}, "solver_order must be 1, 2 or 3, got 4."),
        ({"solver_order": 2.0}, "solver_order must be 1, 2 or 3, got 2.0."),
        ({"solver_order": True}, "solver_order must be 1, 2 or 3, got True."),
        ({"algorithm_type": "dpmsolver+"}, "algorithm_type must be one of 'dpmsolver++', 'dpmsolver'; got"),
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type must be one of"),
        ({"method": "multi-step"}, "method must be one of 'multistep', 'singlestep'; got 'multi-step'"),
        ({"solver_type": "heun"}, "solver_type must be one of 'midpoint', 'taylor'; got 'heun'"),
        ({"lower_order_final": "yes"}, "lower_order_final must be True or False, got 'yes'."),
        ({"denoise_final": 1}, "denoise_final must be True or False, got 1."),
        ({"time_grid": "cosine"}, "time_grid must be one of 'uniform', 'logsnr', 'karras'; got 'cosine'."),
    ],
)
def test_bad_settings_raise_value_error_at_construction(settings: dict, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        sdekit.load_scheduler("dpm-solver", CONFIG, **settings)
    assert message in str(excinfo.value)


def test_a_close_typo_is_named() -> None:
    with pytest.raises(ValueError, match="Did you mean 'singlestep'"):
        DPMSolverScheduler(method="singlestepp")


def _model_times(scheduler, times: list[float]) -> torch.Tensor:
    return scheduler.model_timesteps(torch.tensor(times, dtype=torch.float64))


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
@pytest.mark.parametrize("denoise_final", [True, False])
@pytest.mark.parametrize("calls", [1, 2, 3, 7, 10])
def test_set_timesteps_spends_exactly_the_calls_asked_for(method: str, denoise_final: bool, calls: int) -> None:
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3, method=method, denoise_final=denoise_final)
    scheduler.set_timesteps(calls)
    assert len(scheduler.timesteps) == calls
    assert bool(torch.all(scheduler.timesteps[1:] < scheduler.timesteps[:-1]))
    assert float(scheduler.timesteps[0]) == 999.0


def test_multistep_levels_are_the_log_snr_grid() -> None:
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG)
    scheduler.set_timesteps(6)
    grid = time_grid(scheduler.sde, 7, "logsnr")
    assert scheduler.eval_times == grid[:-1]
    torch.testing.assert_close(scheduler.timesteps, _model_times(scheduler, grid[:-1]))
    karras = sdekit.load_scheduler("dpm-solver", CONFIG, time_grid="karras", rho=5.0)
    karras.set_timesteps(6)
    assert karras.eval_times == time_grid(karras.sde, 7, "karras", 5.0)[:-1]


@pytest.mark.parametrize("order", [2, 3])
def test_singlestep_stages_sit_at_their_log_snr_fractions(order: int) -> None:
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, method="singlestep", solver_order=order,
                                      denoise_final=False)  # fmt: skip
    calls = 2 * order + 1  # two full steps, then a first-order one (DPM-Solver-fast's split of the calls)
    scheduler.set_timesteps(calls)
    grid = torch.tensor(time_grid(scheduler.sde, 4, "logsnr"), dtype=torch.float64)
    lam = -torch.log(noise_to_signal(scheduler.sde, torch.tensor(scheduler.eval_times, dtype=torch.float64)))
    ends = -torch.log(noise_to_signal(scheduler.sde, grid))
    expected = [ends[k] + f * (ends[k + 1] - ends[k]) for k in range(2) for f in SINGLESTEP_NODES[order]]
    torch.testing.assert_close(lam, torch.stack([*expected, ends[2]]), rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
def test_fewer_calls_than_the_order_fall_back_to_a_lower_order(method: str) -> None:
    """Order 3 with 1 or 2 calls is order 1 or 2 with as many: the lower order is used where history (multistep) or
    calls (singlestep) are missing, and at the end of a short multistep run."""
    mixture = _mixture()
    for calls in (1, 2):
        for denoise_final in (True, False):
            settings = {"method": method, "denoise_final": denoise_final}
            high = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3, **settings)
            low = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=calls, **settings)
            assert torch.equal(_sample(high, mixture, calls), _sample(low, mixture, calls))
    # More calls: the order matters.
    high = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3, method=method)
    low = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=2, method=method)
    assert not torch.equal(_sample(high, mixture, 8), _sample(low, mixture, 8))


def test_lower_order_final_changes_only_short_multistep_runs() -> None:
    mixture = _mixture()
    runs = {}
    for flag in (True, False):
        scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3, lower_order_final=flag,
                                          denoise_final=False)  # fmt: skip
        runs[flag] = (_sample(scheduler, mixture, 6), _sample(scheduler, mixture, 16))
    assert not torch.equal(runs[True][0], runs[False][0])
    assert torch.equal(runs[True][1], runs[False][1])


def test_set_begin_index() -> None:
    """Multistep starts part-way with the history it has (order 1 first); singlestep only at a step's start."""
    mixture = _mixture()
    multistep = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3)
    multistep.set_timesteps(8)
    multistep.set_begin_index(3)
    oracle = MixtureScoreModel(mixture, multistep.sde)
    x = torch.randn(16, 2, dtype=torch.float64)
    for t in multistep.timesteps[3:]:
        x = multistep.step(oracle(x, t).sample, t, x).prev_sample
    assert bool(torch.isfinite(x).all())
    singlestep = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3, method="singlestep")
    singlestep.set_timesteps(7)
    singlestep.set_begin_index(1)
    t = singlestep.timesteps[1]
    with pytest.raises(ValueError, match="intermediate stage of the singlestep step that starts at evaluation 0"):
        singlestep.step(oracle(x, t).sample, t, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_keeps_the_sample_dtype(dtype: torch.dtype) -> None:
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=3)
    scheduler.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4).to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(0.1 * x, t, x).prev_sample
        assert x.dtype == dtype


def test_clip_sample_bounds_the_x0_estimate_in_both_forms() -> None:
    for algorithm_type in ("dpmsolver++", "dpmsolver"):
        scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, clip_sample=True, algorithm_type=algorithm_type)
        scheduler.set_timesteps(5)
        x = torch.randn(4, 1, 4, 4) * 3
        for t in scheduler.timesteps:
            out = scheduler.step(torch.randn_like(x), t, x)
            x = out.prev_sample
            assert out.pred_original_sample.abs().max() <= 1.0
        assert x.abs().max() <= 1.0 + 1e-6  # the last step lands on the clipped x_0 estimate


def test_levels_must_have_a_finite_log_snr_rising_towards_the_data() -> None:
    scheduler = sdekit.load_scheduler("dpm-solver", CONFIG)
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 500, 999])
    with pytest.raises(ValueError, match="the log-SNR must rise from each level to the next"):
        scheduler.plan_evaluations([0.2, 0.5])
    # A continuous VP SDE is noise-free at t = 0: it can be the end, not a level to evaluate at.
    continuous = {"sde_params": {"beta_min": 0.1, "beta_max": 20.0}, "sampling_eps": 0.0}
    at_zero = sdekit.load_scheduler("dpm-solver", CONFIG, **continuous, denoise_final=True)
    with pytest.raises(ValueError, match=r"alpha=1.0, sigma=0.0 at t=0.0; DPM-Solver needs alpha > 0 and sigma > 0"):
        at_zero.set_timesteps(timesteps=[999.0, 500.0, 0.0])
    ends_at_zero = sdekit.load_scheduler("dpm-solver", CONFIG, **continuous, denoise_final=False)
    ends_at_zero.set_timesteps(timesteps=[999.0, 500.0, 0.0])
    assert len(ends_at_zero.timesteps) == 2


@pytest.mark.parametrize("kind", ["subvp", "ve"])
def test_other_builtin_sdes_sample_their_data(kind: str) -> None:
    settings = {"sde": kind} if kind == "subvp" else {"sde": "ve", "prediction_type": "score"}
    mixture = _mixture()
    reference = mixture.sample(2000, torch.Generator().manual_seed(7), dtype=torch.float64)
    distances = {}
    for order in (1, 2, 3):
        scheduler = sdekit.load_scheduler("dpm-solver", CONFIG, solver_order=order, **settings)
        distances[order] = frechet_distance(_sample(scheduler, mixture, 10, n=2000), reference)
    # At 10 calls the higher orders come far closer to the data than DDIM (order 1) does.
    assert distances[2] < 0.5 * distances[1] and distances[3] < 0.5 * distances[1], distances


COSINE_SDE = '''
import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from sdekit.sde import SDE, broadcast_time, gaussian_log_prob


class CosineSDE(SDE):
    """A VP-type SDE with the cosine schedule (Nichol & Dhariwal 2021), written from scratch: alpha(t) =
    cos(pi/2 (0.98 t + 0.008) / 1.008) / cos(pi/2 0.008 / 1.008), sigma = sqrt(1 - alpha^2)."""

    def __init__(self, N: int = 1000, sampling_eps: float = 1e-3) -> None:
        super().__init__(N=N, sampling_eps=sampling_eps)

    def _angle(self, t):
        return 0.5 * math.pi * (0.98 * t + 0.008) / 1.008

    def marginal_coeffs(self, t):
        alpha = torch.cos(self._angle(t)) / math.cos(self._angle(0.0))
        return alpha, torch.sqrt(1 - alpha**2)

    def sde(self, x, t):
        tt = broadcast_time(t, x)
        f = -torch.tan(self._angle(tt)) * 0.5 * math.pi * 0.98 / 1.008  # d log alpha / dt
        return f * x, torch.sqrt(-2 * f).to(x.dtype)

    def prior_std(self):
        return 1.0

    def prior_sampling(self, shape, generator=None, device=None, dtype=torch.float32):
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return gaussian_log_prob(z, 1.0)
'''


@pytest.fixture
def cosine_sde(tmp_path: Path) -> Iterator[str]:
    """An SDE plugin ``cosine-vp`` the core has never seen, installed (metadata and module) for one test."""
    (tmp_path / "dpm_solver_test_cosine.py").write_text(textwrap.dedent(COSINE_SDE))
    dist_info = tmp_path / "dpm_solver_test_cosine-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpm-solver-test-cosine\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[sdekit.sdes]\ncosine-vp = dpm_solver_test_cosine:CosineSDE\n")
    sys.path.insert(0, str(tmp_path))
    sdekit.refresh_plugins()
    try:
        yield "cosine-vp"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("dpm_solver_test_cosine", None)
        sdekit.refresh_plugins()
        shutil.rmtree(dist_info)


def test_any_registered_sde_with_a_log_snr(cosine_sde: str) -> None:
    mixture = _mixture()
    reference = mixture.sample(2000, torch.Generator().manual_seed(7), dtype=torch.float64)
    distances = {}
    for order in (1, 2, 3):
        scheduler = sdekit.load_scheduler("dpm-solver", sde=cosine_sde, solver_order=order)
        assert type(scheduler.sde).__name__ == "CosineSDE" and scheduler.time_input == "continuous"
        distances[order] = frechet_distance(_sample(scheduler, mixture, 10, n=2000), reference)
    floor = frechet_distance(mixture.sample(2000, torch.Generator().manual_seed(8), dtype=torch.float64), reference)
    assert distances[2] < 0.5 * distances[1] and distances[3] < 0.5 * distances[1], distances
    assert distances[3] < 3 * floor + 0.002, (distances, floor)
    assert math.isfinite(distances[1])
