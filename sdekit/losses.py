"""Training objectives for score / diffusion models: continuous DSM, DDPM's L_simple and SMLD's loss.

Every objective draws a time per sample, noises the data with the SDE's kernel ``x_t = alpha(t) x_0 + sigma(t) z``
(``alpha``, ``sigma`` from :meth:`SDE.marginal_coeffs`), calls the model once and compares its output with the
known answer. They differ in how the time is drawn and how the error is weighted:

* ``dsm``: continuous denoising score matching for any SDE (Song et al., 2021, "Score-Based Generative Modeling
  through Stochastic Differential Equations", eq. 7): ``t ~ U(eps, T)`` and
  ``lambda(t) || s_theta(x_t, t) - grad log p_0t(x_t | x_0) ||^2`` with ``grad log p_0t = -z / sigma``.
  ``lambda(t) = sigma(t)^2`` (the paper's default) or ``g(t)^2`` (likelihood weighting: Song, Durkan, Murray &
  Ermon, 2021, "Maximum Likelihood Training of Score-Based Diffusion Models", Theorem 1).
* ``ddpm``: DDPM's ``L_simple`` (Ho, Jain & Abbeel, 2020, eq. 14) on the discrete schedule: an integer timestep
  ``i ~ U{0, ..., N-1}`` and the plain mean squared error between the model output and its target, as in
  diffusers' ``train_unconditional.py`` (targets ``epsilon``, ``v_prediction`` and ``sample``).
* ``smld``: SMLD's noise-conditional loss (Song & Ermon, 2019, "Generative Modeling by Estimating Gradients of the
  Data Distribution", eqs. 5-6 with ``lambda(sigma) = sigma^2``): ``sigma`` uniform over the VE SDE's ``N``
  geometric levels ``sigma_min (sigma_max / sigma_min)^(i / (N - 1))``.

The model's output is read through :mod:`sdekit.parametrization` (any ``prediction_type``); for ``dsm`` and
``smld`` the loss is the score-matching loss above whatever the model predicts, so an ``epsilon`` model with
``lambda = sigma^2`` minimises ``|| eps_theta - z ||^2`` (score-SDE, appendix; DDPM's L_simple in continuous time).
The model's time input is fixed by the objective and matches :func:`sdekit.parametrization.to_model_time`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor

from .models import model_prediction
from .parametrization import (
    PREDICTION_TYPES,
    check_choice,
    compose_model_output,
    from_model_time,
    split_model_output,
    to_model_time,
)
from .sde import SDE, VPTypeSDE, broadcast_time, compute_dtype

OBJECTIVES = ("dsm", "ddpm", "smld")
WEIGHTINGS = ("sigma2", "likelihood")
REDUCTIONS = ("mean", "sum")

__all__ = ["OBJECTIVES", "REDUCTIONS", "WEIGHTINGS", "DenoisingLoss", "LossOutput"]


class LossOutput(NamedTuple):
    """What a :class:`DenoisingLoss` returns: the batch mean and the per-sample losses (shape ``(B,)``)."""

    loss: torch.Tensor
    per_sample: torch.Tensor


class DenoisingLoss:
    """A denoising training objective: ``loss, per_sample = objective(model, x0, generator)``.

    ``model(x_t, timestep)`` is called like a diffusers ``UNet2DModel`` (its output's ``.sample``, first tuple
    entry, or the tensor itself is used) with ``timestep`` in the units of :attr:`time_input`: ``t (N - 1)`` for
    VP / sub-VP (``ddpm``; integers for ``kind="ddpm"``, as diffusers' training example feeds them) and ``sigma(t)``
    for VE (``sigma``). Write ``prediction_type`` and ``time_input`` into the scheduler config of the trained model.

    Per call, one draw from ``generator`` gives the times (``dsm``: ``eps + (T - eps) u`` with
    ``u = torch.rand(B)``; ``ddpm`` / ``smld``: ``torch.randint(0, N, (B,))``), a second the noise
    ``z = randn_tensor(x0.shape)``. Arithmetic runs in ``x0``'s compute dtype (at least float32) and so do the
    returned losses; the model gets ``x_t`` in ``x0``'s dtype.

    Args:
        sde: the forward SDE. ``ddpm`` needs a VP-type SDE (VP or sub-VP, usually on a DDPM table), ``smld`` the
            VE SDE; ``dsm`` takes any.
        kind: ``dsm`` (default), ``ddpm`` or ``smld``; see the module docstring.
        prediction_type: what the model returns: ``epsilon`` (default), ``v_prediction``, ``sample`` or ``score``
            (``score`` is not an ``L_simple`` target, so ``ddpm`` refuses it).
        weighting: ``sigma2`` (default; ``lambda(t) = sigma(t)^2``) or ``likelihood`` (``lambda(t) = g(t)^2``,
            ``dsm`` only).
        reduce: ``mean`` (default) or ``sum`` of the squared errors over each sample's dimensions (the score-SDE
            reference code's ``reduce_mean`` switch; its sum carries an extra factor 1/2, this one does not).
        eps: smallest time drawn by ``dsm``; default ``sde.sampling_eps``. ``sigma(eps)`` must be positive.

    Attributes:
        time_input: the model's time convention, the SDE's own :meth:`~sdekit.sde.SDE.default_time_input`
            (``sigma`` for VE, ``ddpm`` for VP and sub-VP).
        prediction_type, kind, weighting, reduce, eps: the validated arguments (``eps`` resolved).
    """

    def __init__(
        self,
        sde: SDE,
        kind: str = "dsm",
        prediction_type: str = "epsilon",
        weighting: str = "sigma2",
        reduce: str = "mean",
        eps: float | None = None,
    ) -> None:
        self.kind = check_choice("kind", kind, OBJECTIVES)
        self.prediction_type = check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.reduce = check_choice("reduce", reduce, REDUCTIONS)
        self.sde = sde
        name = type(sde).__name__
        if kind == "ddpm":
            if not isinstance(sde, VPTypeSDE):
                raise ValueError(
                    f"kind='ddpm' (DDPM's L_simple) needs a VP-type SDE (vp or subvp), got {name}; "
                    "use kind='smld' or kind='dsm' for a VE SDE."
                )
            if prediction_type == "score":
                raise ValueError(
                    "prediction_type='score' is not an L_simple target; kind='ddpm' allows 'epsilon', "
                    "'v_prediction' or 'sample' (kind='dsm' trains score models)."
                )
        if kind == "smld" and not (sde.is_variance_exploding() and sde.default_time_input() == "sigma"):
            raise ValueError(
                f"kind='smld' needs a variance-exploding SDE on noise levels (x_t = x_0 + sigma(t) z, a model "
                f"conditioned on sigma), such as ve; got {name}. Use kind='ddpm' or kind='dsm' for VP / sub-VP."
            )
        if weighting == "likelihood" and kind != "dsm":
            raise ValueError(f"weighting='likelihood' applies to kind='dsm' only, got kind={kind!r}.")
        # L_simple draws integer table levels, which only DDPM model time feeds as they are.
        self.time_input = "ddpm" if kind == "ddpm" else sde.default_time_input()
        self.eps = sde.sampling_eps if eps is None else float(eps)
        if not (0.0 <= self.eps < sde.T):
            raise ValueError(f"eps must lie in [0, {sde.T}), got {eps!r}.")
        if kind == "dsm":
            sigma_eps = float(sde.marginal_coeffs(torch.tensor(self.eps, dtype=torch.float64))[1])
            if not sigma_eps > 0:
                raise ValueError(
                    f"eps={self.eps!r} gives {name} a kernel std sigma(eps) = {sigma_eps}; the score target "
                    "-z / sigma needs sigma > 0, so pass a larger eps (e.g. 1e-3 for a continuous VP SDE)."
                )

    def __repr__(self) -> str:
        return (
            f"DenoisingLoss(sde={self.sde!r}, kind={self.kind!r}, prediction_type={self.prediction_type!r}, "
            f"time_input={self.time_input!r}, weighting={self.weighting!r}, reduce={self.reduce!r}, eps={self.eps})"
        )

    def sample_times(
        self, batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Continuous times ``t``, one per sample (float64), drawn as described in the class docstring.

        ``ddpm`` and ``smld`` give the grid times ``i / (N - 1)``: DDPM table entry ``i``, or the VE SDE's
        ``i``-th noise level.
        """
        device = torch.device("cpu") if device is None else torch.device(device)
        draw_device = generator.device if generator is not None else device
        if self.kind == "dsm":
            u = torch.rand(batch_size, generator=generator, device=draw_device, dtype=torch.float64)
            t = self.eps + (self.sde.T - self.eps) * u
        else:
            i = torch.randint(0, self.sde.N, (batch_size,), generator=generator, device=draw_device)
            t = from_model_time(self.sde, i.to(torch.float64), "ddpm")
        return t.to(device)

    def __call__(self, model: Any, x0: torch.Tensor, generator: torch.Generator | None = None) -> LossOutput:
        """Draw times and noise with ``generator`` and return :meth:`loss_at` of them."""
        if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.ndim < 1 or x0.shape[0] < 1:
            raise ValueError("x0 must be a floating-point tensor of shape (B, ...) with B >= 1.")
        t = self.sample_times(x0.shape[0], generator, x0.device)
        noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=compute_dtype(x0.dtype))
        return self.loss_at(model, x0, t, noise)

    def loss_at(self, model: Any, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> LossOutput:
        """The objective at given continuous times ``t`` (shape ``(B,)``) and noise ``z`` (shape of ``x0``)."""
        tt = broadcast_time(t.to(compute_dtype(x0.dtype)), x0)
        dtype = tt.dtype
        alpha, sigma = self.sde.marginal_coeffs(tt)
        x0c, z = x0.to(dtype), noise.to(dtype)
        x_t = alpha * x0c + sigma * z
        timestep = to_model_time(self.sde, tt.flatten(), self.time_input)
        if self.kind == "ddpm":
            timestep = timestep.round().long()
        output = model_prediction(model, x_t.to(x0.dtype), timestep, expect_shape=True)
        residual = output.to(dtype) - compose_model_output(x0c, z, alpha, sigma, self.prediction_type)
        if self.kind == "ddpm":
            # Ho et al. (2020), eq. 14: the unweighted squared error in the model's own output space.
            squared = residual**2
        else:
            # The output's error mapped to the noise, eps_theta - z: the parametrization is affine in the output,
            # so x_t drops out. Score-SDE eq. 7: lam ||s_theta + z / sigma||^2 = lam / sigma^2 ||eps_theta - z||^2.
            _, eps_error = split_model_output(residual, torch.zeros_like(x_t), alpha, sigma, self.prediction_type)
            squared = eps_error**2
            if self.weighting == "likelihood":
                # Song, Durkan, Murray & Ermon (2021), Theorem 1: lambda(t) = g(t)^2.
                g = self.sde.sde(x_t, tt.flatten())[1].to(dtype)
                squared = squared * (g / sigma) ** 2
        flat = squared.reshape(squared.shape[0], -1)
        per_sample = flat.mean(dim=1) if self.reduce == "mean" else flat.sum(dim=1)
        return LossOutput(per_sample.mean(), per_sample)
