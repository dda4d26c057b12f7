"""Encoding data to latents and decoding them back through the probability-flow ODE, and latent interpolation.

The probability-flow ODE (Song et al., "Score-Based Generative Modeling through Stochastic Differential
Equations", ICLR 2021, eq. 13) ``dx/dt = f(x, t) - g(t)^2 score(x, t) / 2`` is deterministic and invertible:
:func:`encode` integrates it from the data end ``sampling_eps`` up to ``T`` and :func:`decode` from ``T`` back
down, so ``decode(encode(x))`` returns ``x`` up to the solver's error.

Two solvers:

* adaptive (``num_inference_steps=None``, the default): a torchdiffeq Runge-Kutta solver (``dopri5``) with
  tolerances ``rtol`` / ``atol``. The whole batch is one ODE state and the error control measures it with one
  norm, so the step sizes, and within the tolerances the latents, depend on the batch's composition (slightly:
  changes are of the order of the tolerances). Encode each sample alone if bit-for-bit batch independence matters.
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

from .models import model_prediction
from .ode import check_solver_options, ode_scheduler
from .parametrization import model_output_to, split_model_output, to_model_time
from .sampling import time_grid
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
    time_input: str = scheduler.time_input
    out_dtype = x.dtype
    x = x.to(compute_dtype(x.dtype))

    def predict(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model output at ``(xs, t)``, ``t`` one float64-or-compute-dtype value per sample."""
        return model_prediction(model, xs, to_model_time(sde, t, time_input), expect_shape=True)

    if num_inference_steps is None:
        z = _adaptive(sde, predict, prediction_type, x, upward, rtol, atol, method, what)
    else:
        z = _fixed(sde, predict, prediction_type, x, upward, num_inference_steps, what)
    if not bool(torch.isfinite(z).all()):
        raise FloatingPointError(f"{what}: the result holds NaN or Inf; check the model's outputs.")
    return z.to(out_dtype)


def _adaptive(sde, predict, prediction_type, x, upward, rtol, atol, method, what) -> torch.Tensor:  # noqa: ANN001
    def score_fn(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model_output_to(sde, predict(xs, t), xs, t, prediction_type, "score")

    flow = sde.reverse(score_fn, probability_flow=True)  # drift f - g^2 score / 2: eq. 13

    def drift(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # The solver's initial step-size probe may look past the end of the span; keep the model inside.
        t = t.clamp(sde.sampling_eps, sde.T).to(state.dtype)
        try:
            velocity = flow.sde(state, t.expand(state.shape[0]))[0]
        except NotImplementedError as error:
            raise ValueError(
                f"{type(sde).__name__} does not define its drift and diffusion (sde.sde), so it has no "
                f"probability-flow ODE for {what} to integrate."
            ) from error
        # The solver syncs with the host at every step anyway; without this a NaN would make it shrink the step
        # until it fails with an unrelated message.
        if not bool(torch.isfinite(velocity).all()):
            raise FloatingPointError(
                f"{what}: the probability-flow drift holds NaN or Inf at t={float(t):.6g} (integrating from "
                f"{sde.sampling_eps if upward else sde.T:g} to {sde.T if upward else sde.sampling_eps:g}); check "
                "the model's outputs (prediction_type, time_input)."
            )
        return velocity

    # Imported here: torchdiffeq pulls in scipy, which would slow down `import sdekit` for everyone.
    from torchdiffeq import odeint

    ends = [sde.sampling_eps, sde.T] if upward else [sde.T, sde.sampling_eps]
    span = torch.tensor(ends, dtype=torch.float64, device=x.device)
    # step_t: the last step ends exactly at the end of the span instead of stepping past it and interpolating.
    with torch.no_grad():
        return odeint(drift, x, span, rtol=rtol, atol=atol, method=method, options={"step_t": span[1:]})[-1]


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
        x: data, batch first, shape ``(B, ...)``; computed in its compute dtype (float32 for half types) and
            returned in its dtype.
        scheduler: an sdekit scheduler, or a configuration mapping (built as ``load_scheduler("pf-ode", config)``);
            its SDE, ``prediction_type`` and model time input are used. Its ``clip_sample`` is not applied.
        rtol, atol: the adaptive solver's tolerances (default 1e-5 each); unused with ``num_inference_steps``.
        method: a torchdiffeq adaptive solver (:data:`sdekit.ode.ADAPTIVE_METHODS`), default ``dopri5``.
        num_inference_steps: ``None`` (default) for the adaptive solve; an int ``K`` for ``K`` fixed first-order
            steps (DDIM inversion for VP-type SDEs; see the module docstring). The batch is one ODE state for the
            adaptive solver, so a sample's latent varies within the tolerances with the rest of the batch.

    Returns:
        The latents, shape and dtype of ``x``.

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
