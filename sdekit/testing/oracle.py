"""Exact-score models: a :class:`GaussianMixture` behind the interface of a diffusers ``UNet2DModel``."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput

from ..parametrization import PREDICTION_TYPES, TIME_INPUTS, check_choice, convert_model_output, from_model_time
from ..sde import SDE, TimeLike, broadcast_time
from .mixture import GaussianMixture

__all__ = ["MixtureScoreModel", "epsilon_oracle", "score_oracle"]


class MixtureScoreModel(torch.nn.Module):
    """A model that returns the exact answer for data drawn from ``mixture`` and noised by ``sde``.

    Called like a ``UNet2DModel``: ``model(sample, timestep).sample``. ``timestep`` is in the model-time units
    of ``time_input`` (see :mod:`sdekit.parametrization`), a scalar or one per sample; the output is the exact
    score converted to ``prediction_type``. ``num_calls`` counts forward passes.

    Args:
        mixture: the data distribution.
        sde: the forward SDE the data is noised with.
        prediction_type: ``epsilon``, ``v_prediction``, ``sample`` or ``score``; default ``epsilon``.
        time_input: ``ddpm``, ``sigma`` or ``continuous``; default the SDE's own
            (:meth:`~sdekit.sde.SDE.default_time_input`: ``ddpm`` for VP and sub-VP, ``sigma`` for VE), as an
            sdekit scheduler configured for ``sde`` assumes.
    """

    def __init__(
        self, mixture: GaussianMixture, sde: SDE, prediction_type: str = "epsilon", time_input: str | None = None
    ) -> None:
        super().__init__()
        self.mixture = mixture
        self.sde = sde
        self.prediction_type = check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        time_input = sde.default_time_input() if time_input is None else time_input
        self.time_input = check_choice("time_input", time_input, TIME_INPUTS)
        self.num_calls = 0
        shape = mixture.event_shape
        channels = shape[0] if len(shape) == 3 else 1
        self.config = FrozenDict(
            sample_size=shape[-1] if len(shape) == 3 else None,
            in_channels=channels,
            out_channels=channels,
            prediction_type=prediction_type,
            time_input=time_input,
        )
        # Anchors .device / .dtype and follows .to(), as a real model's parameters would.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the model (where its outputs are placed)."""
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self._anchor.dtype

    def forward(
        self, sample: torch.Tensor, timestep: TimeLike, *args: object, return_dict: bool = True, **kwargs: object
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """The exact output for ``sample`` at model time ``timestep``; extra arguments (class labels...) are unused."""
        self.num_calls += 1
        t = from_model_time(self.sde, torch.as_tensor(timestep, device=sample.device), self.time_input)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        tt = broadcast_time(t.to(torch.float64), sample.to(torch.float64))
        alpha, sigma = self.sde.marginal_coeffs(tt)
        score = self.mixture.score(sample.to(torch.float64), alpha.flatten(), sigma.flatten())
        out = convert_model_output(score, sample.to(torch.float64), alpha, sigma, "score", self.prediction_type)
        out = out.to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def score_fn(self, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """The exact score at continuous time ``t``: a ``score_fn`` for :meth:`SDE.reverse`."""
        tt = broadcast_time(t, x.to(torch.float64))
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        alpha, sigma = self.sde.marginal_coeffs(tt.flatten())
        return self.mixture.score(x, alpha, sigma)


def epsilon_oracle(mixture: GaussianMixture, sde: SDE) -> MixtureScoreModel:
    """Epsilon prediction on DDPM timesteps ``t (N - 1)``: a stand-in for a DDPM ``UNet2DModel``."""
    return MixtureScoreModel(mixture, sde, prediction_type="epsilon", time_input="ddpm")


def score_oracle(mixture: GaussianMixture, sde: SDE) -> MixtureScoreModel:
    """Score output with the noise level ``sigma(t)`` as input: a stand-in for an NCSN++ (VE) model."""
    return MixtureScoreModel(mixture, sde, prediction_type="score", time_input="sigma")
