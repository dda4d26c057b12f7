"""Noise-rate schedules ``beta(t)`` for VP-type SDEs: the continuous linear one and discrete DDPM tables.

Both give ``beta(t)`` and ``log alpha_bar(t) = -int_0^t beta(s) ds`` elementwise on a tensor ``t``.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")

__all__ = ["BETA_SCHEDULES", "BetaSchedule", "LinearBetaSchedule", "DiscreteBetaSchedule", "ddpm_betas"]


class BetaSchedule(abc.ABC):
    """``beta(t)`` on ``[0, 1]`` and its integral."""

    @abc.abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """The noise rate at ``t``."""

    @abc.abstractmethod
    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``-int_0^t beta(s) ds``."""


class LinearBetaSchedule(BetaSchedule):
    """``beta(t) = beta_min + t (beta_max - beta_min)`` (score-SDE, section 3.4 and appendix B)."""

    def __init__(self, beta_min: float, beta_max: float) -> None:
        if not math.isfinite(beta_min) or beta_min < 0:
            raise ValueError(f"beta_min must be a finite number >= 0, got {beta_min!r}.")
        if not math.isfinite(beta_max) or beta_max < beta_min or beta_max <= 0:
            raise ValueError(f"beta_max must be finite, > 0 and >= beta_min ({beta_min!r}), got {beta_max!r}.")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        # Times below 0 are clamped: alpha_bar(0) = 1 is the clean data.
        t = t.clamp(min=0)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)


def ddpm_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The discrete ``beta_1..beta_N`` of a diffusers DDPM-style config, exactly as diffusers builds them.

    They are built in float32, as ``DDPMScheduler`` does, so ``alpha_bar`` matches the table a checkpoint was
    trained with; the result is float64.
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}.")
    if trained_betas is not None:
        # As diffusers does, the table is trained_betas whatever num_train_timesteps says (see DiscreteBetaSchedule
        # for how a table of another length meets num_train_timesteps levels).
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
        if betas.numel() < 2:
            raise ValueError(f"trained_betas needs at least 2 entries, got {betas.numel()}.")
    else:
        if not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start!r}, beta_end={beta_end!r}."
            )
        n = num_train_timesteps
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            # Nichol & Dhariwal (2021), eq. 17, with beta capped at 0.999 as diffusers does.
            def f(u: float) -> float:
                return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float32)
        elif beta_schedule == "sigmoid":
            betas = torch.sigmoid(torch.linspace(-6, 6, n)) * (beta_end - beta_start) + beta_start
        else:
            raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}; got {beta_schedule!r}.")
        betas = betas.to(torch.float64)
    if not torch.all((betas > 0) & (betas < 1)):
        raise ValueError("every beta must lie in (0, 1); check trained_betas / beta_start / beta_end.")
    return betas


class DiscreteBetaSchedule(BetaSchedule):
    """A VP schedule that passes through a discrete DDPM table.

    With ``N`` levels, table entry ``i`` (0-based) sits at ``t_i = i / (N - 1)``, the score-SDE reference code's
    convention for DDPM checkpoints, and ``alpha_bar(t_i)`` is ``prod_{j <= i} (1 - beta_j)`` exactly. Between
    entries ``log alpha_bar`` is linear, so ``beta(t)`` is piecewise constant. A virtual entry
    ``alpha_bar = 1`` at ``t_{-1} = -1 / (N - 1)`` extends the table to the clean data, so the DDPM step into
    entry 0 has ``beta_0`` too.

    ``N`` is the table's length unless ``num_levels`` says otherwise. That happens when a diffusers config gives
    ``trained_betas`` of another length than ``num_train_timesteps``: diffusers then still counts
    ``num_train_timesteps`` training timesteps and reads timestep ``k`` from the table's entry ``k``. So does this
    schedule: entries past level ``N - 1`` are unused, and levels past the table's end (where diffusers fails with
    an index error) repeat the table's last beta. :attr:`betas` holds the ``N`` betas of the levels.
    """

    def __init__(self, betas: torch.Tensor, num_levels: int | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not torch.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must hold at least 2 values, each in (0, 1).")
        if num_levels is not None:
            if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
                raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}.")
            if num_levels < betas.numel():
                betas = betas[:num_levels]
            elif num_levels > betas.numel():
                betas = torch.cat([betas, betas[-1:].expand(num_levels - betas.numel())])
        self.betas = betas
        self.num_train_timesteps = betas.numel()
        log_table = torch.cumsum(torch.log1p(-betas), dim=0)
        # Entry k of the padded table is DDPM entry k - 1; entry 0 is the virtual clean-data entry.
        self._log_table = torch.cat([torch.zeros(1, dtype=torch.float64), log_table])
        self._cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The DDPM table ``alpha_bar_i``, float64, as diffusers' ``alphas_cumprod``."""
        return torch.exp(self._log_table[1:])

    def _table(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = self._log_table.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded-table index of each ``t``'s segment start, its fraction, and the table on ``t``'s device."""
        table = self._table(t)
        last = self.num_train_timesteps  # padded index of DDPM entry N - 1
        u = (t * (last - 1) + 1).clamp(0, last)  # padded fractional index
        k = u.floor().clamp(max=last - 1)
        return k.long(), u - k, table

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        k, frac, table = self._segment(t)
        lo, hi = table[k], table[k + 1]
        return lo + frac * (hi - lo)

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        k, _, table = self._segment(t)
        return (table[k] - table[k + 1]) * (self.num_train_timesteps - 1)
