"""Test sampler plugins: a real Euler probability-flow scheduler and a class that is not a scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class EulerFlowOutput(BaseOutput):
    """``prev_sample``: the sample at the next (lower) noise level; ``pred_original_sample``: the x0 estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class EulerFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps of the probability-flow ODE ``dx / dsigma = epsilon`` of ``x = x0 + sigma epsilon``.

    The model is called with ``timestep = sigma`` and predicts epsilon; noise levels are geometric from
    ``sigma_max`` down to ``sigma_min``, and the last step goes to sigma = 0.

    Args:
        num_train_timesteps: default number of steps, default 1000.
        sigma_min: smallest noise level, default 0.01.
        sigma_max: largest noise level and initial noise std, default 1.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, sigma_min: float = 0.01, sigma_max: float = 1.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}.")
        self.init_noise_sigma = sigma_max
        self.set_timesteps(num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Use ``num_inference_steps`` geometric noise levels."""
        levels = torch.linspace(math.log(self.config.sigma_max), math.log(self.config.sigma_min), num_inference_steps)
        self.sigmas = torch.cat([levels.exp(), torch.zeros(1)]).to(device)
        self.timesteps = self.sigmas[:-1]
        self.num_inference_steps = num_inference_steps
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The model takes the sample unscaled."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> EulerFlowOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step from the current noise level to the next; ``generator`` is accepted, as pipelines pass
        one, and unused (the step is deterministic)."""
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        self._step_index += 1
        prev_sample = sample + (sigma_next - sigma) * model_output
        pred_original_sample = sample - sigma * model_output
        if not return_dict:
            return prev_sample, pred_original_sample
        return EulerFlowOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x0 + sigma noise`` with ``timesteps`` the per-sample noise levels."""
        sigma = timesteps.to(original_samples).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + sigma * noise


class NotAScheduler:
    """Has the scheduler methods but is not a diffusers SchedulerMixin / ConfigMixin."""

    def set_timesteps(self, num_inference_steps: int) -> None:
        self.num_inference_steps = num_inference_steps

    def step(self, model_output: torch.Tensor, timestep: float, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def scale_model_input(self, sample: torch.Tensor, timestep: float) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return original_samples + noise
