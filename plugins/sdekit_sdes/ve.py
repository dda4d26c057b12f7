"""The variance-exploding SDE (score-SDE eq. 9 and appendix B; SMLD / NCSN as its discretization)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdekit.sde import SDE, TimeLike, broadcast_time, gaussian_log_prob, time_tensor

__all__ = ["VESDE"]


class VESDE(SDE):
    """``dx = sqrt(d sigma^2(t) / dt) dw`` with ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    The kernel is ``x_t = x_0 + sigma(t) z``: its std is ``sigma(t)`` itself, as in the score-SDE reference code.
    That treats the clean data as already carrying ``N(0, sigma_min^2)`` noise at ``t = 0`` (exactly,
    ``Var[x_t - x_0] = sigma(t)^2 - sigma_min^2`` for noise-free ``x_0``); the difference is below
    ``sigma_min^2 = 1e-4`` at the defaults and keeps ``sigma(t)`` equal to the noise level NCSN models are
    conditioned on.

    Args:
        sigma_min: smallest noise level, default 0.01.
        sigma_max: largest noise level and prior std, default 50.
        N: number of discretization steps, default 1000.
        sampling_eps: smallest sampling time, default 1e-5.
    """

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000, sampling_eps: float = 1e-5
    ) -> None:
        super().__init__(N=N, sampling_eps=sampling_eps)
        if not math.isfinite(sigma_min) or sigma_min <= 0:
            raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min!r}.")
        if not math.isfinite(sigma_max) or sigma_max <= sigma_min:
            raise ValueError(f"sigma_max must be finite and > sigma_min ({sigma_min!r}), got {sigma_max!r}.")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, N={self.N})"

    @classmethod
    def config_params(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """A scheduler configuration's noise range: ``sigma_min``, ``sigma_max`` and ``N = num_train_timesteps``
        (what diffusers' ``ScoreSdeVeScheduler`` saves)."""
        keys = {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "num_train_timesteps": "N"}
        return {name: config[key] for key, name in keys.items() if config.get(key) is not None}

    def default_time_input(self) -> str:
        """``sigma``: NCSN-style models are conditioned on the noise level itself."""
        return "sigma"

    def prior_std(self) -> float:
        """``sigma_max``: the prior is ``N(0, sigma_max^2 I)``."""
        return self.sigma_max

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """The noise level ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``."""
        return self.sigma_min * torch.exp(time_tensor(t) * self._log_ratio)

    def t_from_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """Inverse of :meth:`sigma`: ``t = log(sigma / sigma_min) / log(sigma_max / sigma_min)``."""
        return torch.log(time_tensor(sigma) / self.sigma_min) / self._log_ratio

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        tt = broadcast_time(t, x)
        # g(t) = sqrt(d sigma^2 / dt) = sigma(t) sqrt(2 log(sigma_max / sigma_min))
        diffusion = self.sigma(tt) * math.sqrt(2 * self._log_ratio)
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
        return self._standard_normal(shape, generator, device, dtype) * self.sigma_max

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, self.sigma_max)

    def discretize(self, x: torch.Tensor, t: TimeLike, dt: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """SMLD's step between noise levels (score-SDE eq. 45): ``f = 0``, ``G^2 = sigma(t)^2 - sigma(t-dt)^2``.

        Below ``t = 0`` the previous level is the clean data (``sigma = 0``), as in the reference code.
        """
        dt = self.T / self.N if dt is None else dt
        tt = broadcast_time(t, x)
        prev = tt - dt
        sigma_prev = torch.where(prev < 0, torch.zeros_like(prev), self.sigma(prev))
        G = torch.sqrt(self.sigma(tt) ** 2 - sigma_prev**2)
        return torch.zeros_like(x), G.to(x.dtype)
