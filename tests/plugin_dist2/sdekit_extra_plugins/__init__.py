"""A second sdekit test distribution: registers ``twin``, a name sdekit-testplugins registers too, and
``noise-levels``, a variance-exploding SDE under a name the core has never heard of."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from sdekit.sde import SDE, TimeLike, broadcast_time, gaussian_log_prob, time_tensor


class TwinSDE(SDE):
    """``dx = sigma dw``, like sdekit-testplugins' ``twin``, but ``sigma`` is a required argument.

    Args:
        sigma: the constant diffusion coefficient (required).
        N: number of discretization steps, default 100.
        sampling_eps: smallest sampling time, default 1e-3.
    """

    def __init__(self, sigma: float, N: int = 100, sampling_eps: float = 1e-3) -> None:
        super().__init__(N=N, sampling_eps=sampling_eps)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}.")
        self.scale = float(sigma)

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.full_like(broadcast_time(t, x), self.scale).to(x.dtype)

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), self.scale * torch.sqrt(t.clamp(min=0))

    def prior_sampling(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        z = randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
        return z * (self.scale * math.sqrt(self.T))

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.scale * math.sqrt(self.T))


class NoiseLevelSDE(SDE):
    """A variance-exploding SDE written from scratch (not a subclass of sdekit's ``VESDE``), registered under a
    name the core has never heard of: ``x_t = x_0 + s(t) z`` with geometric noise levels
    ``s(t) = s_min (s_max / s_min)^t`` (score-SDE eq. 9).

    It declares its own conventions: it is built from a scheduler configuration's ``sigma_min`` / ``sigma_max`` /
    ``num_train_timesteps``, its models take the noise level as their timestep, and its prior is
    ``N(0, sigma_max^2)``.

    Args:
        sigma_min: smallest noise level, default 0.01.
        sigma_max: largest noise level, default 50.
        N: number of noise levels, default 1000.
        sampling_eps: smallest sampling time, default 1e-5.
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000, sampling_eps: float = 1e-5
    ) -> None:
        super().__init__(N=N, sampling_eps=sampling_eps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min!r} and {sigma_max!r}.")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    @classmethod
    def config_params(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The noise range and level count of the scheduler configuration."""
        return {"sigma_min": config["sigma_min"], "sigma_max": config["sigma_max"], "N": config["num_train_timesteps"]}

    def default_time_input(self) -> str:
        """Models take the noise level."""
        return "sigma"

    def prior_std(self) -> float:
        """The largest noise level."""
        return self.sigma_max

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """``s_min (s_max / s_min)^t``."""
        return self.sigma_min * torch.exp(time_tensor(t) * math.log(self.sigma_max / self.sigma_min))

    def t_from_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """``log(s / s_min) / log(s_max / s_min)``."""
        return torch.log(time_tensor(sigma) / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        tt = broadcast_time(t, x)
        diffusion = self.sigma(tt) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), diffusion.to(x.dtype)

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), self.sigma(t)

    def prior_sampling(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype) * self.sigma_max

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.sigma_max)

    def discretize(self, x: torch.Tensor, t: TimeLike, dt: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SMLD's chain between consecutive noise levels (score-SDE eq. 45); the clean data below ``t = 0``."""
        dt = self.T / self.N if dt is None else dt
        tt = broadcast_time(t, x)
        before = tt - dt
        sigma_before = torch.where(before < 0, torch.zeros_like(before), self.sigma(before))
        return torch.zeros_like(x), torch.sqrt(self.sigma(tt) ** 2 - sigma_before**2).to(x.dtype)
