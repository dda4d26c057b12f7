"""DDIM as an sdekit scheduler (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021).

With ``alpha_bar`` the squared mean coefficient of the VP kernel
``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``, one step from level ``t`` to level ``s`` is the DDIM
paper's eq. 12:

    x_s = sqrt(alpha_bar_s) x0_hat + sqrt(1 - alpha_bar_s - sigma^2) eps_hat + sigma z,

with ``x0_hat`` and ``eps_hat`` the model's estimates at ``x_t`` and, from eq. 16,

    sigma = eta sqrt((1 - alpha_bar_s) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_s).

``eta = 0`` is the deterministic DDIM sampler; ``eta = 1`` makes ``sigma^2`` the DDPM posterior variance
``beta_tilde`` (Ho et al. 2020, eq. 7), so over all training levels it is DDPM's ancestral sampler.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config

from sdekit.parametrization import check_choice, level_to_time, time_to_level
from sdekit.scheduler import SDEScheduler
from sdekit.sde import VPTypeSDE

__all__ = ["TIMESTEP_SPACINGS", "DDIMSDEScheduler"]

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
"""How ``set_timesteps(num_inference_steps)`` picks integer levels (diffusers' names; Lin et al. 2024, Table 2)."""


@dataclass(frozen=True)
class _StepCoeffs:
    """One step's kernel coefficients at the current level ``t`` and the target level ``s``."""

    alpha: float  # sqrt(alpha_bar_t)
    sigma: float  # sqrt(1 - alpha_bar_t)
    alpha_prev: float  # sqrt(alpha_bar_s)
    sigma_prev: float  # sqrt(1 - alpha_bar_s)
    ddpm_std: float  # the eta = 1 noise std of eq. 16


def _check_eta_value(eta: object) -> float:
    """``eta`` as a float if it is a finite number >= 0; else ``ValueError``."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(
            f"eta must be a finite number >= 0 (0 is deterministic DDIM, 1 is DDPM's ancestral sampling); got {eta!r}."
        )
    return float(eta)


class DDIMSDEScheduler(SDEScheduler):
    """DDIM sampling (Song, Meng & Ermon, ICLR 2021, eqs. 12 and 16) on a variance-preserving SDE.

    A drop-in replacement for diffusers' ``DDIMScheduler``: from the same config it visits the same integer
    ``timesteps`` and, in float64, gives the same samples (see ``docs/samplers/ddim.md``). With ``eta=1`` over all
    ``num_train_timesteps`` levels it is ``DDPMScheduler`` (``variance_type="fixed_small"``).

    As in diffusers, a step from timestep ``k`` lands on level ``k - num_train_timesteps // num_inference_steps``
    (the final one on the clean data, see ``set_alpha_to_one``); with ``timestep_spacing="linspace"``, or
    ``"trailing"`` when ``num_train_timesteps`` is not a multiple of ``num_inference_steps``, that is not exactly
    the next entry of ``timesteps``. With custom ``timesteps`` every step lands on the next entry.

    The noise levels are the SDE's ``alpha_bar`` at continuous time ``t = k / (num_train_timesteps - 1)``: on a
    DDPM table (the default) that is the table's entry ``k``; a continuous VP SDE (``sde_params`` with
    ``beta_min`` / ``beta_max``) works the same way.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`. ``sde`` must give a variance-preserving
            kernel (``alpha^2 + sigma^2 = 1``): ``vp``.
            ``sampling_eps`` is not used: the levels come from ``timestep_spacing``.
        eta: the noise scale of eq. 16, ``>= 0``; default 0.0 (deterministic). ``step(eta=...)`` overrides it for
            one call, as in diffusers (``DDIMPipeline`` passes its own ``eta``, default 0).
        timestep_spacing: ``leading`` (default), ``trailing`` or ``linspace``, as diffusers' ``DDIMScheduler``.
        set_alpha_to_one: the last step's target level: ``alpha_bar = 1`` (the clean data; default True) or
            the first table entry, ``alpha_bar(t=0)``.
        steps_offset: added to every ``leading`` timestep; default 0.
    """

    integer_timesteps = True

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
        eta: float = 0.0,
        timestep_spacing: str = "leading",
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
    ) -> None:
        _check_eta_value(eta)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}.")
        self.setup()
        self._check_variance_preserving()
        if self.time_input == "ddpm" and self.sde.N != num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} but the SDE has N={self.sde.N} levels; DDIM's integer "
                "timesteps index the model's training levels, so make them equal (e.g. trained_betas of length "
                "num_train_timesteps, or N in sde_params)."
            )
        self._jump: int | None = None
        self._steps: list[_StepCoeffs] = []

    def _check_variance_preserving(self) -> None:
        """DDIM's update (eq. 12) is written for kernels with ``alpha^2 + sigma^2 = 1``."""
        if not (isinstance(self.sde, VPTypeSDE) and self.sde.is_variance_preserving()):
            raise ValueError(
                f"sde={self.config.sde!r} ({type(self.sde).__name__}) is not variance preserving; DDIM "
                "(Song et al. 2021, eq. 12) needs a VP kernel x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps. "
                "Use sde='vp' (on a DDPM table or continuous), or the pc / pf-ode samplers for ve and subvp."
            )

    # -- timesteps ----------------------------------------------------------------------------------------

    def check_eta(self, eta: float | None) -> None:
        """DDIM takes any ``eta >= 0`` (``None`` uses the config's)."""
        if eta is not None:
            _check_eta_value(eta)

    def _spaced_levels(self, num_inference_steps: int) -> list[int]:
        """diffusers' ``DDIMScheduler`` integer timesteps for ``timestep_spacing``, descending."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}.")
        n_train = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(
                f"num_inference_steps must be between 1 and num_train_timesteps={n_train} (the model's training "
                f"levels), got {num_inference_steps}."
            )
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            levels = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1]
        elif spacing == "leading":
            levels = (np.arange(num_inference_steps) * (n_train // num_inference_steps))[::-1]
            levels = levels + self.config.steps_offset
            if levels[0] > n_train - 1:
                raise ValueError(
                    f"steps_offset={self.config.steps_offset} puts the first of {num_inference_steps} leading "
                    f"timesteps at {int(levels[0])}, past the last training level {n_train - 1}; lower steps_offset "
                    "or num_inference_steps."
                )
        else:
            levels = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)) - 1
        return [int(k) for k in levels]

    def spaced_times(self, num_inference_steps: int) -> list[float]:
        """diffusers' DDIMScheduler levels for ``timestep_spacing``; each step jumps ``N // num_inference_steps``."""
        n_train = self.config.num_train_timesteps
        levels = self._spaced_levels(num_inference_steps)
        self._jump = n_train // num_inference_steps
        return [level_to_time(k, n_train) for k in levels]

    def custom_times(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """Continuous times of user-given model timesteps (integers in ``[0, N - 1]`` for ``ddpm`` model time);
        each step lands on the next one, the last on the clean data (``set_alpha_to_one``) or ``alpha_bar(0)``."""
        times = super().custom_times(timesteps)
        if self.time_input == "ddpm":
            levels = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
            last = self.config.num_train_timesteps - 1
            if not bool(torch.all(levels == levels.round())) or levels[0] > last or levels[-1] < 0:
                raise ValueError(
                    f"timesteps must be integers in [0, {last}] (the model's training levels); got {levels.tolist()}."
                )
        self._jump = None
        return times

    # -- the update ---------------------------------------------------------------------------------------

    def _targets(self, times: list[float]) -> list[float | None]:
        """Continuous time each step lands on; ``None`` for the final level (see ``set_alpha_to_one``)."""
        if self._jump is None:
            return [*times[1:], None]
        n_train = self.config.num_train_timesteps
        targets: list[float | None] = []
        for t in times:
            k = time_to_level(t, n_train) - self._jump
            targets.append(level_to_time(k, n_train) if k >= 0 else None)
        return targets

    def plan_evaluations(self, times: list[float]) -> list[float]:
        self._steps = []
        for t, target in zip(times, self._targets(times)):
            alpha, sigma = self.kernel_coeffs(t)
            if target is not None:
                alpha_prev, sigma_prev = self.kernel_coeffs(target)
            elif self.config.set_alpha_to_one:
                alpha_prev, sigma_prev = 1.0, 0.0
            else:
                alpha_prev, sigma_prev = self.kernel_coeffs(0.0)
            # eq. 16 at eta = 1: (1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s), the DDPM beta_tilde; zero
            # from the clean data (a continuous VP's t = 0), where sigma_prev is 0 as well.
            ddpm_var = (sigma_prev / sigma) ** 2 * (1 - (alpha / alpha_prev) ** 2) if sigma > 0 else 0.0
            self._steps.append(_StepCoeffs(alpha, sigma, alpha_prev, sigma_prev, math.sqrt(max(ddpm_var, 0.0))))
        for index in range(len(self._steps)):
            self._noise_split(index, self.config.eta)
        return list(times)

    def _noise_split(self, index: int, eta: float) -> tuple[float, float]:
        """``(sigma, sqrt(1 - alpha_bar_s - sigma^2))`` of eq. 12 for step ``index`` at noise scale ``eta``."""
        c = self._steps[index]
        std = eta * c.ddpm_std
        direction_var = c.sigma_prev**2 - std**2
        if direction_var < -1e-12 * max(c.sigma_prev**2, 1e-300):
            largest = c.sigma_prev / c.ddpm_std
            raise ValueError(
                f"eta={eta!r} asks step {index} for noise std {std:.4g}, more than its target level's total std "
                f"{c.sigma_prev:.4g}; DDIM's eq. 12 needs eta <= {largest:.4g} there (any eta in [0, 1] works)."
            )
        return std, math.sqrt(max(direction_var, 0.0))

    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._steps[index]
        eta = self.config.eta if eta is None else eta
        std, direction = self._noise_split(index, eta)
        x0, eps = self.x0_and_eps(model_output, sample, c.alpha, c.sigma, use_clipped_model_output)
        # eq. 12 without its noise term; onto the clean data (direction 0) eps is left out, as it is undefined
        # where sigma_t is 0 too (a continuous VP's t = 0).
        prev_sample = c.alpha_prev * x0 if direction == 0 else torch.add(c.alpha_prev * x0, eps, alpha=direction)
        if eta > 0:
            # Drawn whenever eta > 0 (even when std is 0 at the last step), as diffusers' DDIMScheduler does,
            # so that a shared generator advances identically.
            prev_sample.add_(self.noise_like(sample, generator), alpha=std)
        return prev_sample, x0
