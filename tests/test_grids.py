"""Time grids (``sdekit.grids``): their noise levels against closed forms, on every built-in SDE; the shared
``time_grid`` / ``rho`` option of the scheduler base; bad input."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config

import sdekit
from sdekit.grids import KARRAS_SPAN, TIME_GRIDS, noise_span, noise_to_signal, time_grid, time_of_noise_to_signal
from sdekit.scheduler import SDEScheduler, check_shared_parameters
from sdekit_sdes import VESDE, VPSDE, SubVPSDE

BETA_MIN, BETA_MAX = 0.1, 20.0
TABLE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def _karras(s_max: float, s_min: float, n: int, rho: float) -> torch.Tensor:
    """Karras et al. (2022), eq. 5, written out."""
    i = torch.arange(n, dtype=torch.float64)
    return (s_max ** (1 / rho) + i / (n - 1) * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def _logsnr(s_max: float, s_min: float, n: int) -> torch.Tensor:
    """Evenly spaced in lambda = -2 log s: a geometric sequence of noise levels."""
    return s_max * (s_min / s_max) ** (torch.arange(n, dtype=torch.float64) / (n - 1))


def _targets(kind: str, s_max: float, s_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    return _karras(s_max, s_min, n, rho) if kind == "karras" else _logsnr(s_max, s_min, n)


def _vp_integral_inverse(minus_log_alpha_bar: torch.Tensor) -> torch.Tensor:
    """t with beta_min t + (beta_max - beta_min) t^2 / 2 = -log alpha_bar (the linear schedule), solved exactly."""
    a, b = 0.5 * (BETA_MAX - BETA_MIN), BETA_MIN
    return (-b + torch.sqrt(b * b + 4 * a * minus_log_alpha_bar)) / (2 * a)


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
def test_ve_levels_are_the_closed_form(kind: str) -> None:
    """VE: s = sigma(t) = sigma_min (sigma_max / sigma_min)^t: t = log(s / sigma_min) / log(sigma_max / sigma_min)."""
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    times = torch.tensor(time_grid(sde, 12, kind, rho=5.0), dtype=torch.float64)
    expected_s = _targets(kind, 50.0, float(sde.sigma(sde.sampling_eps)), 12, rho=5.0)
    torch.testing.assert_close(sde.sigma(times), expected_s, rtol=1e-12, atol=0)
    expected_t = torch.log(expected_s / 0.01) / math.log(50.0 / 0.01)
    torch.testing.assert_close(times, expected_t, rtol=0, atol=1e-12)
    if kind == "logsnr":  # VE's log sigma is linear in t: uniform in log-SNR is uniform in t
        uniform = torch.tensor(time_grid(sde, 12, "uniform"), dtype=torch.float64)
        torch.testing.assert_close(times, uniform, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
@pytest.mark.parametrize("family", ["vp", "subvp"])
def test_continuous_vp_and_subvp_levels_are_the_closed_form(family: str, kind: str) -> None:
    """VP: s^2 = 1 / alpha_bar - 1; sub-VP: s = (1 - alpha_bar) / sqrt(alpha_bar), i.e. sqrt(alpha_bar) =
    (sqrt(s^2 + 4) - s) / 2; then t from the quadratic -log alpha_bar = beta_min t + (beta_max - beta_min) t^2 / 2."""
    sde = (VPSDE if family == "vp" else SubVPSDE)(beta_min=BETA_MIN, beta_max=BETA_MAX)

    def s_of(t: float) -> float:
        abar = math.exp(-(BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t * t))
        return math.sqrt(1 / abar - 1) if family == "vp" else (1 - abar) / math.sqrt(abar)

    n = 15
    s = _targets(kind, s_of(1.0), s_of(sde.sampling_eps), n)
    if family == "vp":
        minus_log_abar = torch.log1p(s**2)
    else:
        minus_log_abar = -2 * torch.log((torch.sqrt(s**2 + 4) - s) / 2)
    expected = _vp_integral_inverse(minus_log_abar)
    times = torch.tensor(time_grid(sde, n, kind), dtype=torch.float64)
    torch.testing.assert_close(times, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(noise_to_signal(sde, times), s, rtol=1e-9, atol=0)
    assert times[0] == 1.0 and times[-1] == sde.sampling_eps


@pytest.mark.parametrize("kind", ["logsnr", "karras"])
def test_ddpm_table_levels_are_the_closed_form(kind: str) -> None:
    """On diffusers' linear table: s_k = sqrt((1 - alpha_bar_k) / alpha_bar_k) at entry k, log alpha_bar linear
    between entries; each grid level's fractional table position interpolates the table's log alpha_bar (the
    cumulative product of diffusers' float32 betas, taken in float64)."""
    sde = VPSDE(**TABLE)
    log_abar = torch.cumsum(torch.log1p(-DDPMScheduler(**TABLE).betas.to(torch.float64)), dim=0)
    s_max, s_min = (float(torch.sqrt(torch.expm1(-log_abar[k]))) for k in (999, 0))
    n = 25
    s = _targets(kind, s_max, s_min, n)
    # Invert the piecewise-linear log alpha_bar: find the entry below, then the fraction.
    target = -torch.log1p(s**2)
    k = torch.searchsorted(-log_abar, -target).clamp(1, 999)
    frac = (target - log_abar[k - 1]) / (log_abar[k] - log_abar[k - 1])
    expected_levels = (k - 1) + frac
    times = torch.tensor(time_grid(sde, n, kind), dtype=torch.float64)
    torch.testing.assert_close(times * 999, expected_levels, rtol=0, atol=1e-9)
    torch.testing.assert_close(noise_to_signal(sde, times), s, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_every_grid_runs_from_t_to_sampling_eps_and_uniform_is_linspace(name: str) -> None:
    sde = sdekit.get_sde(name)
    for kind in TIME_GRIDS:
        for n in (1, 2, 3, 40):
            times = time_grid(sde, n, kind)
            assert len(times) == n and times[0] == sde.T
            assert n == 1 or times[-1] == sde.sampling_eps
            assert all(later < earlier for earlier, later in zip(times, times[1:])), (kind, n)
    linspace = torch.linspace(sde.T, sde.sampling_eps, 30, dtype=torch.float64).tolist()
    assert time_grid(sde, 30, "uniform") == linspace


def test_karras_rho_crowds_the_levels_towards_the_data_end() -> None:
    sde = VESDE()
    low, high = (
        noise_to_signal(sde, torch.tensor(time_grid(sde, 10, "karras", rho), dtype=torch.float64)) for rho in (1.0, 7.0)
    )
    # rho = 1 is evenly spaced in sigma; a larger rho puts each inner level at a smaller sigma.
    torch.testing.assert_close(low, torch.linspace(float(low[0]), float(low[-1]), 10, dtype=torch.float64))
    assert torch.all(high[1:-1] < low[1:-1])


class Plain(SDEScheduler):
    """A sampler without the time-grid option: Euler in (y, s), one evaluation per level.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`.
    """

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

    def plan_evaluations(self, times: list[float]) -> list[float]:
        return times

    def update(self, index, model_output, sample, generator, use_clipped_model_output, eta):  # noqa: ANN001, ANN201
        return sample, sample


SPAN_DEFAULTS = (("vp", "karras"), ("ve", "karras"), ("subvp", "uniform"))


def test_noise_span_against_its_closed_form_and_karras_range() -> None:
    """``s(T) / s(eps)``: VP on the DDPM table ``sqrt((1 - abar) / abar)`` at both ends, its sub-VP ``(1 - abar) /
    sqrt(abar)`` (about VP's squared), VE ``(sigma_max / sigma_min)^(T - eps)``; only sub-VP's lies beyond Karras
    et al.'s 80 / 0.002."""
    vp, subvp = (sdekit.get_sde(kind, **TABLE) for kind in ("vp", "subvp"))
    abar = torch.cumprod(1 - torch.linspace(TABLE["beta_start"], TABLE["beta_end"], 1000, dtype=torch.float64), 0)
    ends = abar[[-1, 0]]
    vp_span = torch.sqrt((1 - ends) / ends)
    subvp_span = (1 - ends) / torch.sqrt(ends)
    assert noise_span(vp) == pytest.approx(float(vp_span[0] / vp_span[1]), rel=1e-6)
    assert noise_span(subvp) == pytest.approx(float(subvp_span[0] / subvp_span[1]), rel=1e-6)
    ve = sdekit.get_sde("ve", sigma_min=0.01, sigma_max=50.0)  # sigma(t) = sigma_min (sigma_max / sigma_min)^t
    assert noise_span(ve) == pytest.approx(5000.0 ** (ve.T - ve.sampling_eps), rel=1e-9)
    assert noise_span(vp) < KARRAS_SPAN == 4e4 < noise_span(subvp)


def test_samplers_lay_their_levels_on_the_grid_and_keep_custom_timesteps() -> None:
    config = DDPMScheduler(**TABLE).config
    for name, grid in (("pc", "karras"), ("pf-ode", "logsnr"), ("pc", "uniform")):
        own = {"corrector": "none"} if name == "pc" else {"solver": "euler"}
        scheduler = sdekit.load_scheduler(name, config, time_grid=grid, rho=3.0, **own)
        scheduler.set_timesteps(8)
        # n levels of an (n + 1)-point grid: the last point, sampling_eps, is the data end and never evaluated.
        assert scheduler.eval_times == time_grid(scheduler.sde, 9, grid, rho=3.0)[:-1]
        assert scheduler.grid_end == time_grid(scheduler.sde, 9, grid, rho=3.0)[-1]
        scheduler.set_timesteps(timesteps=[900, 500, 100])
        assert scheduler.timesteps.tolist() == [900, 500, 100] and scheduler.grid_end is None
    # pc's default is the uniform grid; pf-ode's (time_grid=None) is Karras's where the SDE's noise range is within
    # the one Karras et al. tuned rho = 7 for (VP on the DDPM table, VE), uniform beyond it (sub-VP on the table).
    assert (
        sdekit.load_scheduler("pc").config.time_grid is None
        and sdekit.load_scheduler("pc").default_time_grid() == "uniform"
    )
    cases = [(solver, sde, grid) for solver in ("heun", "ab2", "euler") for sde, grid in SPAN_DEFAULTS]
    for solver, sde, grid in cases:
        scheduler = sdekit.load_scheduler("pf-ode", config, solver=solver, sde=sde)
        assert scheduler.config.time_grid is None and scheduler.default_time_grid() == grid
        scheduler.set_timesteps(6)
        assert scheduler.eval_times[:: scheduler.order] == time_grid(scheduler.sde, 7, grid)[:-1]
    # A config saved with a grid brings it back; samplers without the option ignore it; the default (None) moves
    # between pc and pf-ode as the sampler's own choice.
    ab2 = sdekit.load_scheduler("pf-ode", sdekit.load_scheduler("pc", config).config, solver="ab2")
    ab2.set_timesteps(4)
    assert ab2.config.time_grid is None and ab2.eval_times == time_grid(ab2.sde, 5, "karras")[:-1]
    # A sampler without the option keeps the uniform grid, even from a config that names another grid.
    karras = sdekit.load_scheduler("pc", config, time_grid="karras", rho=3.0).config
    plain = Plain.from_config(karras)
    assert not Plain.takes_time_grid() and plain.config.get("time_grid") == "karras"
    plain.set_timesteps(6)
    assert plain.eval_times == torch.linspace(1, 0, 6, dtype=torch.float64).tolist()
    pc = sdekit.load_scheduler("pc", config, time_grid="uniform")
    assert sdekit.load_scheduler("pc", pc.config).config.time_grid == "uniform"
    assert sdekit.load_scheduler("ddim", pc.config).config.get("time_grid", "uniform") == "uniform"


# -- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pc", "pf-ode"])
@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"time_grid": "cosine"}, "time_grid must be one of 'uniform', 'logsnr', 'karras'; got 'cosine'"),
        ({"time_grid": 7}, "time_grid must be one of 'uniform', 'logsnr', 'karras'; got 7"),
        ({"rho": 0.0}, "rho must be a finite number > 0 (Karras et al. use 7), got 0.0"),
        ({"rho": -7.0}, "rho must be a finite number > 0"),
        ({"rho": math.inf}, "rho must be a finite number > 0"),
        ({"rho": True}, "rho must be a finite number > 0"),
    ],
)
def test_bad_grid_settings_are_refused_at_construction(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sdekit.load_scheduler(name, **overrides)
    with pytest.raises(ValueError, match=message.split(";")[0].split(" (")[0]):
        time_grid(VESDE(), 5, overrides.get("time_grid", "karras"), overrides.get("rho", 7.0))


@pytest.mark.parametrize("grid", TIME_GRIDS)
def test_more_levels_than_a_table_has_are_refused_with_the_maximum(grid: str) -> None:
    """More levels than the table's entries would visit some entry's span twice over: the error states the most."""
    for name in ("pc", "pf-ode"):
        scheduler = sdekit.load_scheduler(name, DDPMScheduler(num_train_timesteps=50).config, time_grid=grid)
        scheduler.set_timesteps(50)
        with pytest.raises(ValueError, match="num_inference_steps=51 exceeds the 50 noise levels .* at most 50"):
            scheduler.set_timesteps(51)


def test_a_grid_needs_a_noise_level_that_grows() -> None:
    class Flat(VESDE):
        def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.ones_like(t), torch.full_like(t, 2.0)

    with pytest.raises(ValueError, match="does not grow from t=sampling_eps to T .* use time_grid='uniform'"):
        time_grid(Flat(), 5, "karras")
    assert len(time_grid(Flat(), 5, "uniform")) == 5
    with pytest.raises(ValueError, match=r"noise levels must lie in \[0.01"):
        time_of_noise_to_signal(VESDE(), torch.tensor([100.0]))
    continuous = VPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX, sampling_eps=0.0)
    with pytest.raises(ValueError, match="time_grid='logsnr' needs a positive noise level at sampling_eps=0.0"):
        time_grid(continuous, 5, "logsnr")
    assert time_grid(continuous, 5, "karras")[-1] == 0.0  # Karras's grid reaches s = 0 itself


def test_a_sampler_takes_the_whole_grid_option_or_none_of_it() -> None:
    base = sdekit.get_sampler_class("pc")
    signature = inspect.signature(base.__init__)
    params = list(signature.parameters.values())

    def variant(parameters: list[inspect.Parameter]) -> type:
        def __init__(self, *args: object, **kwargs: object) -> None:  # noqa: N807
            base.__init__(self, *args, **kwargs)

        __init__.__signature__ = signature.replace(parameters=parameters)
        return type("Variant", (base,), {"__init__": __init__, "__doc__": base.__doc__})

    check_shared_parameters(variant(params))
    check_shared_parameters(variant([p for p in params if p.name not in ("time_grid", "rho")]))
    with pytest.raises(TypeError, match=r"takes only part of the time-grid option; take all of \['time_grid', 'rho'\]"):
        check_shared_parameters(variant([p for p in params if p.name != "rho"]))
    wrong = [p.replace(annotation="int") if p.name == "rho" else p for p in params]
    with pytest.raises(TypeError, match="rho is annotated int; the time-grid option's annotation is float"):
        check_shared_parameters(variant(wrong))
