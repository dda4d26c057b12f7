"""A diffusers scheduler class that lacks ``step``: it breaks the sampler protocol."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin


class NoStepScheduler(SchedulerMixin, ConfigMixin):
    """Plans levels and scales inputs, but has no ``step``.

    Args:
        num_train_timesteps: default 1000.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """``num_inference_steps`` evenly spaced levels."""
        self.timesteps = torch.linspace(self.config.num_train_timesteps - 1, 0, num_inference_steps, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        """The model takes the sample unscaled."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Not a real kernel: only here to complete the rest of the protocol."""
        return original_samples + noise
