"""Test SDE plugins: a real constant-diffusion SDE and variants the registry must reject or shadow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor

from sdekit.sde import SDE, TimeLike, broadcast_time, gaussian_log_prob


class ConstantVESDE(SDE):
    """``dx = sigma dw``: Brownian motion, so ``x_t = x_0 + sigma sqrt(t) z`` and the prior is ``N(0, sigma^2 T)``.

    Args:
        sigma: the constant diffusion coefficient, default 1.
        N: number of discretization steps, default 100.
        sampling_eps: smallest sampling time, default 1e-3.
    """

    sdekit_api_version = 2

    def __init__(self, sigma: float = 1.0, N: int = 100, sampling_eps: float = 1e-3) -> None:
        super().__init__(N=N, sampling_eps=sampling_eps)
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}.")
        self.scale = float(sigma)

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        tt = broadcast_time(t, x)
        return torch.zeros_like(x), torch.full_like(tt, self.scale).to(x.dtype)

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


class FutureSDE(ConstantVESDE):
    """Targets an sdekit plugin API this sdekit does not implement."""

    sdekit_api_version = 3


class ShadowVPSDE(ConstantVESDE):
    """Registered as ``vp``, a name sdekit's built-ins already use."""


class NotAnSDE:
    """Has only part of the SDE protocol."""

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.ones_like(x)


class UndeclaredSDE:
    """The math of the SDE protocol without what an SDE declares about itself (how it is built from a scheduler
    configuration, its model time, prior std, table, noise levels): not a subclass of sdekit's ``SDE``."""

    N, T, sampling_eps = 100, 1.0, 1e-3

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.ones_like(x)

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), torch.sqrt(t)

    def marginal_prob(self, x0: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, torch.sqrt(torch.as_tensor(t))

    def prior_sampling(self, shape: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
        return randn_tensor(tuple(shape), generator=generator)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, 1.0)

    def discretize(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.full_like(x, math.sqrt(self.T / self.N))

    def reverse(self, score_fn: object, probability_flow: bool = False) -> None:
        raise NotImplementedError
