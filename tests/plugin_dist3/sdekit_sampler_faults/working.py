"""A working sampler written on sdekit's public extension API, and the same sampler declaring an older plugin API."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from sdekit import SDEScheduler


class FlowStepScheduler(SDEScheduler):
    """Deterministic first-order steps ``x_s = alpha_s x0 + sigma_s eps`` between the levels, the last one onto the
    clean data (DDIM with ``eta = 0`` on any SDE).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`.
    """

    sdekit_api_version = 2

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
        self._here: list[tuple[float, float]] = []
        self._next: list[tuple[float, float]] = []

    def plan_evaluations(self, times: list[float]) -> list[float]:
        """One evaluation per level."""
        self._here = [self.kernel_coeffs(t) for t in times]
        self._next = [*self._here[1:], (1.0, 0.0)]
        return list(times)

    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step (eta = 0) to the next level."""
        x0, eps = self.x0_and_eps(model_output, sample, *self._here[index], use_clipped_model_output)
        alpha, sigma = self._next[index]
        return alpha * x0 + sigma * eps, x0


class OldAPIScheduler(FlowStepScheduler):
    """Declares the plugin API of an older sdekit."""

    sdekit_api_version = 1
