"""The variance-preserving and sub-VP SDEs (score-SDE eqs. 11 and 17), on a linear or a discrete DDPM schedule."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sdekit.sde import TimeLike, VPTypeSDE, broadcast_time, gaussian_log_prob

from .schedules import BetaSchedule, DiscreteBetaSchedule, LinearBetaSchedule, ddpm_betas

__all__ = ["VPSDE", "SubVPSDE"]


def _warn_table_length(table_length: int, num_train_timesteps: int) -> None:
    """Warn that ``trained_betas`` and ``num_train_timesteps`` disagree, and say what is done (diffusers' reading)."""
    if table_length > num_train_timesteps:
        what = f"its entries past {num_train_timesteps - 1} are unused"
    else:
        what = (
            f"timesteps {table_length}..{num_train_timesteps - 1} lie past the table's end and repeat its last beta "
            "(diffusers fails there with an index error)"
        )
    warnings.warn(
        f"trained_betas has {table_length} entries but num_train_timesteps={num_train_timesteps}. As in diffusers, "
        f"there are num_train_timesteps training timesteps and timestep k reads the table's entry k: {what}. "
        "Give trained_betas one entry per training timestep to silence this.",
        UserWarning,
        stacklevel=4,
    )


class _VPFamily(VPTypeSDE):
    """Shared set-up of VP and sub-VP: a schedule that is linear (``beta_min``, ``beta_max``) or a DDPM table.

    Pass either the continuous parameters, or the diffusers DDPM ones (``num_train_timesteps``, ``beta_start``,
    ``beta_end``, ``beta_schedule``, ``trained_betas``), not both. With a DDPM table, ``N`` is the number of
    training timesteps and ``alpha_bar(i / (N - 1))`` is the table's entry ``i``.
    """

    def __init__(
        self,
        beta_min: float | None = None,
        beta_max: float | None = None,
        N: int | None = None,
        sampling_eps: float | None = None,
        *,
        num_train_timesteps: int | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        beta_schedule: str | None = None,
        trained_betas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        ddpm = {
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
            "beta_schedule": beta_schedule,
            "trained_betas": trained_betas,
        }
        given = {k: v for k, v in ddpm.items() if v is not None}
        self.schedule: BetaSchedule
        if given:
            clash = [k for k, v in (("beta_min", beta_min), ("beta_max", beta_max), ("N", N)) if v is not None]
            if clash:
                raise ValueError(
                    f"{type(self).__name__}: pass either the continuous schedule (beta_min, beta_max, N) or a DDPM "
                    f"table ({', '.join(ddpm)}), not both; got {', '.join(clash)} with {', '.join(given)}."
                )
            betas = ddpm_betas(**given)
            if num_train_timesteps is not None and betas.numel() != num_train_timesteps:
                _warn_table_length(betas.numel(), num_train_timesteps)
            self.schedule = DiscreteBetaSchedule(betas, num_levels=num_train_timesteps)
            N = self.schedule.num_train_timesteps
            # t = 0 is the table's first (noisy) entry, the last level a DDPM sampler visits.
            sampling_eps = 0.0 if sampling_eps is None else sampling_eps
        else:
            self.schedule = LinearBetaSchedule(
                0.1 if beta_min is None else beta_min, 20.0 if beta_max is None else beta_max
            )
            N = 1000 if N is None else N
            sampling_eps = 1e-3 if sampling_eps is None else sampling_eps
        super().__init__(N=N, sampling_eps=sampling_eps)

    _TABLE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")

    @classmethod
    def config_params(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """A scheduler configuration's DDPM table (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``, ``trained_betas``): the SDE of a diffusers DDPM checkpoint."""
        return {key: config[key] for key in cls._TABLE_KEYS if key in config}

    def prior_std(self) -> float:
        """1: the prior is ``N(0, I)``."""
        return 1.0

    @property
    def is_discrete(self) -> bool:
        """Whether the schedule is a DDPM table."""
        return isinstance(self.schedule, DiscreteBetaSchedule)

    def __repr__(self) -> str:
        if isinstance(self.schedule, DiscreteBetaSchedule):
            return f"{type(self).__name__}(num_train_timesteps={self.N}, discrete table)"
        return (
            f"{type(self).__name__}(beta_min={self.schedule.beta_min}, beta_max={self.schedule.beta_max}, N={self.N})"
        )

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.beta(t)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.log_alpha_bar(t)

    def prior_sampling(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        return self._standard_normal(shape, generator, device, dtype)

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        return gaussian_log_prob(z, 1.0)


class VPSDE(_VPFamily):
    """``dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw`` (score-SDE eq. 11); DDPM is its discretization.

    Kernel: mean ``sqrt(alpha_bar(t)) x_0``, std ``sqrt(1 - alpha_bar(t))``; prior ``N(0, I)``. With the linear
    schedule, ``log sqrt(alpha_bar(t)) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``.

    Args:
        beta_min: ``beta(0)`` of the linear schedule, default 0.1.
        beta_max: ``beta(1)`` of the linear schedule, default 20.
        N: number of discretization steps, default 1000.
        sampling_eps: smallest sampling time; default 1e-3, or 0 on a DDPM table (its entry 0).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: a diffusers DDPM schedule
            instead (``beta_schedule`` in linear, scaled_linear, squaredcos_cap_v2, sigmoid).
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t))

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_abar = self.log_alpha_bar(t)
        # sqrt(1 - alpha_bar) through expm1 keeps precision at small t.
        return torch.exp(0.5 * log_abar), torch.sqrt(-torch.expm1(log_abar))

    def discretize(self, x: torch.Tensor, t: TimeLike, dt: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """DDPM's step (score-SDE eq. 47) from ``t - dt`` to ``t``: ``x_t = sqrt(1 - b) x + sqrt(b) z``.

        ``b = 1 - alpha_bar(t) / alpha_bar(t - dt)``, so on a DDPM table with ``dt = 1 / (N - 1)`` it is the
        table's ``beta_i``.
        """
        dt = self.T / self.N if dt is None else dt
        tt = broadcast_time(t, x)
        step_beta = -torch.expm1(self.log_alpha_bar(tt) - self.log_alpha_bar(tt - dt))
        f = (torch.sqrt(1 - step_beta) - 1) * x.to(tt.dtype)
        return f.to(x.dtype), torch.sqrt(step_beta).to(x.dtype)


class SubVPSDE(_VPFamily):
    """``dx = -beta(t) x / 2 dt + sqrt(beta(t) (1 - alpha_bar(t)^2)) dw`` (score-SDE eq. 17).

    Kernel: mean ``sqrt(alpha_bar(t)) x_0``, std ``1 - alpha_bar(t)`` (always below VP's); prior ``N(0, I)``.
    Same parameters as :class:`VPSDE`; discretized by Euler-Maruyama.
    """

    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(2 * self.log_alpha_bar(t)))

    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_abar = self.log_alpha_bar(t)
        return torch.exp(0.5 * log_abar), -torch.expm1(log_abar)
