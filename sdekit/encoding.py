"""Encoding data to latents and decoding them back through the probability-flow ODE, and latent interpolation.

The probability-flow ODE (Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations", ICLR 2021, eq. 13) ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` is deterministic and invertible:
:func:`encode` integrates it from the data end ``sampling_eps`` up to ``T`` and :func:`decode` from ``T`` back
down, so ``decode(encode(x))`` returns ``x`` up to the solver's error.

Two solvers:

* adaptive (``num_inference_steps=None``, the default): an adaptive Runge-Kutta solver (``dopri5``) with
  tolerances ``rtol`` / ``atol`` on the ODE in the scaled variables ``y = x / alpha``, ``s = sigma / alpha``
  (:mod:`sdekit.scaled_flow`), with per-sample error control (:mod:`sdekit.batched_ode`): a sample's latent does
  not depend on the rest of the batch.
* fixed steps (``num_inference_steps=K``): ``K`` first-order steps on ``K + 1`` times evenly spaced in ``t``
  between ``sampling_eps`` and ``T`` (:func:`sdekit.sampling.time_grid`). Each step from ``t`` to ``s`` splits the
  model output at ``(x_t, t)`` into ``(x0_hat, eps_hat)`` (:func:`sdekit.parametrization.split_model_output`) and
  sets ``x_s = alpha_s x0_hat + sigma_s eps_hat``. For VP-type SDEs this is DDIM with ``eta = 0`` when decoding
  and its inversion when encoding (Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021,
  eqs. 12-14; the encoder evaluates the model at the lower end of each step, as DDIM inversion does). For every
  other affine kernel ``x_t = alpha(t) x_0 + sigma(t) eps`` (VE, sub-VP, plugins) the same update is the Euler
  step of the ODE written in ``y = x / alpha`` and ``s = sigma / alpha`` (``dy/ds = eps_hat``, DDIM eq. 14), so
  the one rule covers them all; for VE (``alpha = 1``) it is Euler in ``sigma``. Encoding and decoding are then
  not exact inverses: the reconstruction error falls like ``1 / K`` (DDIM paper, Table 2).

The model is called through :func:`sdekit.models.model_prediction` with its time in the scheduler's units
(``scheduler.time_input``) and its output read as the scheduler's ``prediction_type``. Nothing of the scheduler's
own ``step`` is used, so options such as DDPM's ``clip_sample`` / ``thresholding`` are *not* applied: clipping
would break the ODE's invertibility.
"""

from __future__ import annotations

from typing import Any

import torch

from .batched_ode import solve
from .models import model_device_dtype
from .ode import check_solver_options, model_output_fn, ode_scheduler
from .parametrization import split_model_output
from .sampling import time_grid
from .scaled_flow import ScaledFlow
from .sde import SDE, compute_dtype

__all__ = ["decode", "encode", "slerp"]


def _check_options(rtol: float, atol: float, method: str, num_inference_steps: int | None) -> None:
    check_solver_options(rtol, atol, method)
    if num_inference_steps is not None and (
        isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be None (adaptive) or an int >= 1, got {num_inference_steps!r}.")


def _check_input(x: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, ...) with at least one sample.")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or Inf.")


def _transport(
    model: Any,
    x: torch.Tensor,
    scheduler: Any,
    upward: bool,
    rtol: float,
    atol: float,
    method: str,
    num_inference_steps: int | None,
    what: str,
) -> torch.Tensor:
    """Carry ``x`` along the probability-flow ODE from ``sampling_eps`` to ``T`` (``upward``) or back."""
    _check_options(rtol, atol, method, num_inference_steps)
    _check_input(x, "x" if upward else "z")
    scheduler = ode_scheduler(scheduler)
    sde: SDE = scheduler.sde
    prediction_type: str = scheduler.config.prediction_type
    out_dtype = x.dtype
    device, _ = model_device_dtype(model, x)
    x = x.to(device=device, dtype=compute_dtype(x.dtype))
    predict = model_output_fn(model, scheduler, x)

    if num_inference_steps is None:
        z = _adaptive(sde, predict, prediction_type, x, upward, rtol, atol, method, what)
    else:
        z = _fixed(sde, predict, prediction_type, x, upward, num_inference_steps, what)
    if not bool(torch.isfinite(z).all()):
        raise FloatingPointError(f"{what}: the result holds NaN or Inf; check the model's outputs.")
    return z.to(out_dtype)


def _adaptive(sde, predict, prediction_type, x, upward, rtol, atol, method, what) -> torch.Tensor:  # noqa: ANN001
    flow = ScaledFlow(sde, predict, prediction_type, what)

    def rhs(s: torch.Tensor, state: tuple[torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor]:
        return (flow.velocity(state[0], s),)

    if upward:
        ends, scale_in, scale_out = (flow.s_start, flow.s_end), flow.alpha_start, flow.alpha_end
    else:
        ends, scale_in, scale_out = (flow.s_end, flow.s_start), flow.alpha_end, flow.alpha_start
    y = solve(rhs, (x / scale_in,), *ends, rtol=rtol, atol=atol, method=method, what=what, clock=flow.time).state[0]
    return scale_out * y


def _fixed(sde, predict, prediction_type, x, upward, steps, what) -> torch.Tensor:  # noqa: ANN001
    times = time_grid(sde, steps, device=x.device).to(x.dtype)  # T down to sampling_eps
    if upward:
        times = times.flip(0)
    view = (-1,) + (1,) * (x.ndim - 1)
    with torch.no_grad():
        for i in range(steps):
            t, s = times[i], times[i + 1]
            alpha_t, sigma_t = sde.marginal_coeffs(t.reshape(1))
            alpha_s, sigma_s = sde.marginal_coeffs(s.reshape(1))
            output = predict(x, t.expand(x.shape[0]))
            x0, eps = split_model_output(output, x, alpha_t.reshape(view), sigma_t.reshape(view), prediction_type)
            x = alpha_s.reshape(view) * x0 + sigma_s.reshape(view) * eps
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(
                    f"{what}: NaN or Inf after the step from t={float(t):.6g} to t={float(s):.6g} "
                    f"(step {i + 1} of {steps}); check the model's outputs (prediction_type, time_input)."
                )
    return x


def encode(
    model: Any,
    x: torch.Tensor,
    scheduler: Any,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    num_inference_steps: int | None = None,
) -> torch.Tensor:
    """Map data ``x`` (at the SDE's ``sampling_eps``) to latents at ``T`` through the probability-flow ODE.

    Args:
        model: called as ``model(x, timestep)`` through :func:`sdekit.models.model_prediction`; it must predict one
            value per input element.
        x: data, batch first, shape ``(B, ...)``; moved to the model's device, computed in its compute dtype
            (float32 for half types) and returned in its dtype; the model gets it in its own dtype.
        scheduler: an sdekit scheduler, or a configuration mapping (built as ``load_scheduler("pf-ode", config)``);
            its SDE, ``prediction_type`` and model time input are used. Its ``clip_sample`` is not applied.
        rtol, atol: the adaptive solver's tolerances (default 1e-5 each); unused with ``num_inference_steps``.
        method: an adaptive solver of :data:`sdekit.ode.ADAPTIVE_METHODS`, default ``dopri5`` (see
            :mod:`sdekit.batched_ode`).
        num_inference_steps: ``None`` (default) for the adaptive solve (each sample with its own step sizes); an
            int ``K`` for ``K`` fixed first-order steps (DDIM inversion for VP-type SDEs; see the module docstring).

    Returns:
        The latents, shape and dtype of ``x``, on the model's device.

    Raises:
        ValueError: a bad option; ``x`` not of shape ``(B, ...)`` or holding NaN/Inf; a model output of another
            shape than its input; an SDE without a probability-flow ODE.
        FloatingPointError: NaN or Inf during the solve (the message names the time reached).
    """
    return _transport(model, x, scheduler, True, rtol, atol, method, num_inference_steps, "encode")


def decode(
    model: Any,
    z: torch.Tensor,
    scheduler: Any,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    num_inference_steps: int | None = None,
) -> torch.Tensor:
    """Map latents ``z`` at ``T`` back to data at ``sampling_eps``: the inverse of :func:`encode`.

    The arguments are those of :func:`encode` (with fixed steps this is DDIM with ``eta = 0`` for VP-type SDEs).
    It returns the ODE's state at ``sampling_eps``, not a denoised ``x_0`` estimate, so that
    ``decode(encode(x)) ~ x``.
    """
    return _transport(model, z, scheduler, False, rtol, atol, method, num_inference_steps, "decode")


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical linear interpolation between latents, per sample (Shoemake 1985; as in the DDIM paper, sec. 5.3).

    Each sample is flattened and ``theta`` is the angle between ``z0[i]`` and ``z1[i]``;
    ``slerp = sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1``. ``alpha = 0`` gives ``z0``,
    ``alpha = 1`` gives ``z1``; values outside ``[0, 1]`` extrapolate along the same great circle. When the two
    norms are equal the result keeps that norm for every ``alpha`` (unlike linear interpolation, whose midpoint of
    two independent Gaussian latents has about ``1 / sqrt(2)`` of their norm, off the prior's typical set); for
    unequal norms the result's norm is not interpolated linearly. Nearly parallel pairs (``sin(theta) < 1e-6``)
    fall back to linear interpolation.

    Args:
        z0, z1: latents of the same shape ``(B, ...)``.
        alpha: a number, a 0-d tensor, or one value per sample (shape ``(B,)``).

    Returns:
        The interpolation, shape of ``z0``, dtype of ``z0`` (computed in float64).

    Raises:
        ValueError: mismatched shapes, a bad ``alpha``, NaN/Inf inputs, a zero latent, or an antipodal pair
            (``theta = pi``, where the great circle is not unique).
    """
    if not (torch.is_tensor(z0) and torch.is_tensor(z1)):
        raise ValueError("z0 and z1 must be tensors.")
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape; got {tuple(z0.shape)} and {tuple(z1.shape)}.")
    if z0.ndim < 1 or z0.shape[0] < 1:
        raise ValueError("z0 and z1 must have shape (B, ...) with at least one sample.")
    batch = z0.shape[0]
    a = torch.as_tensor(alpha, dtype=torch.float64, device=z0.device)
    if a.ndim == 0:
        a = a.expand(batch)
    if a.shape != (batch,):
        raise ValueError(
            f"alpha must be a number or have one value per sample, shape ({batch},); got {tuple(a.shape)}."
        )
    u, v = z0.reshape(batch, -1).to(torch.float64), z1.reshape(batch, -1).to(torch.float64)
    if not (bool(torch.isfinite(u).all()) and bool(torch.isfinite(v).all()) and bool(torch.isfinite(a).all())):
        raise ValueError("slerp: z0, z1 or alpha holds NaN or Inf.")
    nu, nv = u.norm(dim=1), v.norm(dim=1)
    if bool((nu == 0).any()) or bool((nv == 0).any()):
        raise ValueError("slerp: a latent is zero, so its direction (and the angle) is undefined.")
    cos = ((u * v).sum(dim=1) / (nu * nv)).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    if bool(((sin < 1e-6) & (cos < 0)).any()):
        raise ValueError("slerp: z0 and z1 are (nearly) antipodal; the great circle between them is not unique.")
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    w0 = torch.where(parallel, 1 - a, torch.sin((1 - a) * theta) / safe)
    w1 = torch.where(parallel, a, torch.sin(a * theta) / safe)
    out = w0[:, None] * u + w1[:, None] * v
    return out.reshape(z0.shape).to(z0.dtype)
