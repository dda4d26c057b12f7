"""Exact log-likelihood of data through the probability-flow ODE (score-SDE eq. 13, appendix D.2).

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021): the
probability-flow ODE ``dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2`` (eq. 13) carries ``p_t`` to ``p_T``
deterministically, so by the instantaneous change of variables (eq. 39)

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div_x f~(x(t), t) dt.

:func:`likelihood` integrates the state and the divergence integral jointly from the data end ``sampling_eps`` to
``T`` in the scaled variables of :mod:`sdekit.scaled_flow` (``y = x / alpha``, ``s = sigma / alpha``), with an
adaptive Runge-Kutta solver that gives every sample its own step sizes (:mod:`sdekit.batched_ode`), and adds the
prior term ``sde.prior_logp(x(T))``.

Per-sample error control: one error norm and one step size for a batched state (torchdiffeq's ``odeint``) would
couple the samples (a hard sample would shrink everyone's steps and change their results within the tolerances).
Here a sample's result is the same (bit for bit on the same device) alone and in any batch, while each stage of
the solver still calls the model once for all samples that are still running.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batched_ode import solve
from .models import model_device_dtype
from .ode import check_solver_options, model_output_fn, ode_scheduler
from .parametrization import check_choice
from .scaled_flow import ScaledFlow
from .sde import SDE, compute_dtype

TRACE_METHODS = ("exact", "hutchinson")
"""Divergence estimators :func:`likelihood` accepts."""

PROBE_NOISES = ("rademacher", "gaussian")
"""Probe distributions of the Skilling-Hutchinson estimator."""

__all__ = ["PROBE_NOISES", "TRACE_METHODS", "LikelihoodResult", "likelihood"]

GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


@dataclass
class LikelihoodResult:
    """Output of :func:`likelihood`; every field has one entry per sample.

    Args:
        nll: negative log-likelihood in nats, shape ``(B,)``; with ``dequantize=True`` the dequantized bound on the
            8-bit data's negative log-probability (see :func:`likelihood`).
        bpd: bits per dimension, ``nll / (D ln 2)`` with ``D`` the values per sample, shape ``(B,)``.
        nfe: number of model evaluations of each sample's solve, int64 ``(B,)``; the model is called on all the
            samples still running at once, so the number of calls is ``nfe.max()``.
        z: the latent ``x(T)`` each sample reached, shape and compute dtype of the (dequantized) input, on the model's
            device.
    """

    nll: torch.Tensor
    bpd: torch.Tensor
    nfe: torch.Tensor
    z: torch.Tensor


def _draw(
    kind: str, shape: torch.Size, generator: GeneratorLike, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Noise of ``shape`` (batch first): ``uniform`` on [0, 1), ``rademacher`` or ``gaussian``.

    With a list of generators, sample ``i`` is drawn from ``generator[i]`` alone, so its noise does not depend on
    the rest of the batch.
    """

    def one(sub_shape: tuple[int, ...], gen: torch.Generator | None) -> torch.Tensor:
        where = gen.device if gen is not None else device
        if kind == "uniform":
            out = torch.rand(sub_shape, generator=gen, device=where, dtype=torch.float64)
        elif kind == "gaussian":
            out = torch.randn(sub_shape, generator=gen, device=where, dtype=torch.float64)
        else:
            out = torch.randint(0, 2, sub_shape, generator=gen, device=where).to(torch.float64) * 2 - 1
        return out.to(device=device, dtype=dtype)

    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; give one per sample.")
        return torch.cat([one((1,) + tuple(shape[1:]), g) for g in generator])
    return one(tuple(shape), generator)


def _dequantize(
    x: torch.Tensor, data_range: tuple[float, float], generator: GeneratorLike
) -> tuple[torch.Tensor, float]:
    """Uniformly dequantized ``x`` and the per-dimension offset ``ln(256 / (hi - lo))`` in nats."""
    lo, hi = float(data_range[0]), float(data_range[1])
    if not hi > lo:
        raise ValueError(f"data_range must be (low, high) with high > low, got {data_range!r}.")
    slack = 1e-5 * (hi - lo)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo - slack or x_max > hi + slack:
        raise ValueError(
            f"dequantize=True expects 8-bit data in [{lo:g}, {hi:g}] (data_range); the data spans "
            f"[{x_min:.6g}, {x_max:.6g}]. Scale it, or pass data_range=(0, 1) for data in [0, 1]."
        )
    levels = torch.round((x.to(torch.float64) - lo) / (hi - lo) * 255).clamp(0, 255)
    u = _draw("uniform", x.shape, generator, x.device, torch.float64)
    y = lo + (hi - lo) * (levels + u) / 256
    return y.to(x.dtype), math.log(256 / (hi - lo))


def likelihood(
    model: torch.nn.Module,
    x: torch.Tensor,
    scheduler: Any,
    *,
    trace: str = "hutchinson",
    noise: str = "rademacher",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    dequantize: bool | None = None,
    data_range: tuple[float, float] = (-1.0, 1.0),
    generator: GeneratorLike = None,
) -> LikelihoodResult:
    """Negative log-likelihood and bits/dim of ``x`` under the probability-flow ODE of ``model``.

    Integrates ``x`` together with the divergence integral from ``sampling_eps`` to ``T`` (score-SDE eqs. 13 and
    39, in the scaled variables of :mod:`sdekit.scaled_flow`) and returns ``nll = -(log p_T(x(T)) + D log(alpha_T /
    alpha_eps) + delta)`` with ``log p_T`` the SDE's ``prior_logp``. This is ``-log p_eps(x)``: the density of the
    model's marginal at ``sampling_eps`` (which is > 0 for continuous SDEs, and level 0 of a DDPM table), evaluated
    at the data.

    Each sample is integrated as its own ODE with its own adaptive step sizes (per-sample error control), so its
    result does not depend on the rest of the batch; see the module docstring.

    Args:
        model: called as ``model(x, timestep)`` through :func:`sdekit.models.model_prediction`; it must predict one
            value per input element and be differentiable in ``x``.
        x: data, batch first, any shape ``(B, ...)``; moved to the model's device and integrated in its compute
            dtype (float32 for half types); the model gets it in its own dtype.
        scheduler: an sdekit scheduler, or a configuration mapping one accepts (built as ``load_scheduler("pf-ode",
            config)``); its SDE, ``prediction_type``, model time input and ``sampling_eps`` are used.
        trace: ``hutchinson`` (default): the Skilling-Hutchinson estimate ``v^T J v`` of the velocity's Jacobian
            trace with one probe ``v``
            per sample drawn once per solve, one vector-Jacobian product per evaluation (unbiased for the
            divergence, hence for ``log p``; not for ``p``); ``exact``: the full Jacobian trace, ``D``
            vector-Jacobian products per evaluation (small ``D`` and tests).
        noise: the probe distribution, ``rademacher`` (default) or ``gaussian``.
        rtol, atol: the solver's tolerances on each sample's state ``(x / alpha, delta)``; default 1e-5 each.
        method: an adaptive solver of :data:`sdekit.ode.ADAPTIVE_METHODS`, default ``dopri5`` (batched with
            per-sample step sizes; see :mod:`sdekit.batched_ode`).
        dequantize: ``None``/``False`` (default): continuous data, ``bpd = nll / (D ln 2)``. ``True``: 8-bit data in
            ``data_range = (lo, hi)``, dequantized as score-SDE reports bits/dim: with levels
            ``k = round(255 (x - lo) / (hi - lo))`` and ``u ~ U[0, 1)^D``, ``y = lo + (hi - lo) (k + u) / 256`` and
            ``nll = -log p_eps(y) + D ln(256 / (hi - lo))`` (the change of variables to bins of width
            ``(hi - lo) / 256``), so ``bpd = -log2 p_eps(y) / D + log2(256 / (hi - lo))``: ``+ 7`` for ``[-1, 1]``,
            ``+ 8`` for ``[0, 1]``. In expectation over ``u`` this bounds the 8-bit data's ``-log2 P(k) / D``.
        data_range: with ``dequantize=True``, the range the 8-bit data is scaled to; default ``(-1, 1)``.
        generator: a ``torch.Generator`` or one per sample (then each sample's draws are independent of the batch)
            for the dequantization noise (drawn first) and the Hutchinson probes.

    Returns:
        :class:`LikelihoodResult` with ``nll``, ``bpd``, ``nfe`` and the latents ``z``.

    Raises:
        ValueError: a bad option; data outside ``data_range`` with ``dequantize=True``; an SDE without a
            probability-flow ODE; a model whose output shape differs from its input's.
        FloatingPointError: the ODE's right-hand side held NaN or Inf (the message names the sample and the time
            reached).
    """
    check_choice("trace", trace, TRACE_METHODS)
    check_choice("noise", noise, PROBE_NOISES)
    check_solver_options(rtol, atol, method)
    if not torch.is_tensor(x) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError("x must be a tensor of shape (B, ...) with at least one sample and one value per sample.")
    scheduler = ode_scheduler(scheduler)
    sde: SDE = scheduler.sde
    prediction_type: str = scheduler.config.prediction_type

    device, _ = model_device_dtype(model, x)
    x = x.to(device=device, dtype=compute_dtype(x.dtype))
    dims = math.prod(x.shape[1:])
    offset = 0.0
    if dequantize:
        x, offset = _dequantize(x, data_range, generator)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf.")
    probes = _draw(noise, x.shape, generator, x.device, x.dtype) if trace == "hutchinson" else None
    flow = ScaledFlow(sde, model_output_fn(model, scheduler, x), prediction_type, "likelihood")

    def rhs(s: torch.Tensor, state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``dy/ds`` and its divergence (eq. 39 in the scaled variables) for the samples ``index``."""
        with torch.enable_grad():
            y = state[0].detach().requires_grad_(True)
            velocity = flow.velocity(y, s)
            if probes is not None:
                # Skilling-Hutchinson: E_v[v^T J v] = tr J with E[v v^T] = I (score-SDE appendix D.2). The samples
                # are independent, so one vector-Jacobian product gives every sample's v_i^T J_i.
                probe = probes[index]
                (vjp,) = torch.autograd.grad(velocity, y, probe)
                div = (vjp * probe).flatten(1).sum(1)
            else:
                flat = velocity.flatten(1)
                div = sum(
                    torch.autograd.grad(flat[:, j].sum(), y, retain_graph=j + 1 < dims)[0].flatten(1)[:, j]
                    for j in range(dims)
                )
        return velocity.detach(), torch.as_tensor(div).detach()

    state0 = (x / flow.alpha_start, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    solution = solve(
        rhs, state0, flow.s_start, flow.s_end, rtol=rtol, atol=atol, method=method, what="likelihood", clock=flow.time
    )
    y_end, delta = solution.state
    z = flow.alpha_end * y_end
    # eq. 39 in y and s, plus the scaling x = alpha y (see sdekit.scaled_flow):
    # log p_eps(x) = log p_T(z) + D log(alpha_T / alpha_eps) + delta.
    nll = -(sde.prior_logp(z).to(x.dtype) + flow.log_scale_change(dims) + delta)
    nll_t = nll + dims * offset
    if not bool(torch.isfinite(nll_t).all()):
        raise FloatingPointError("likelihood: the result holds NaN or Inf (check the model and the prior_logp).")
    return LikelihoodResult(
        nll=nll_t,
        bpd=nll_t / (dims * math.log(2)),
        nfe=solution.nfe,
        z=z,
    )
