"""Exact log-likelihood of data through the probability-flow ODE (score-SDE eq. 13, appendix D.2).

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021): the
probability-flow ODE ``dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2`` (eq. 13) carries ``p_t`` to ``p_T``
deterministically, so by the instantaneous change of variables (eq. 39)

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div_x f~(x(t), t) dt.

:func:`likelihood` integrates ``x`` and the divergence integral jointly from the data end ``sampling_eps`` to
``T`` with an adaptive torchdiffeq solver and adds the prior term ``sde.prior_logp(x(T))``.

Per-sample error control: torchdiffeq measures the error of the whole state with one norm and takes one step size
for it, so a batched state would couple the samples (a hard sample would shrink everyone's steps and change their
results within the tolerances). Here every sample is integrated as its own ODE, with its own step sizes; a
sample's result is therefore the same (bit for bit on the same device) alone and in any batch. The cost is one
solve, and model calls of batch size 1, per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .models import model_prediction
from .ode import check_solver_options, ode_scheduler
from .parametrization import check_choice, model_output_to, to_model_time
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
        nfe: number of model evaluations of each sample's solve (each a call with batch size 1), int64 ``(B,)``;
            the total number of model calls is ``nfe.sum()``.
        z: the latent ``x(T)`` each sample reached, shape and dtype of the (dequantized) input.
    """

    nll: torch.Tensor
    bpd: torch.Tensor
    nfe: torch.Tensor
    z: torch.Tensor


def _check_probability_flow(sde: SDE, like: torch.Tensor) -> None:
    """Raise ValueError if ``sde`` has no probability-flow ODE in the form of eq. 13 (``g`` independent of ``x``)."""
    t = torch.full((1,), 0.5 * (sde.sampling_eps + sde.T), dtype=like.dtype, device=like.device)
    probe = torch.zeros_like(like[:1])
    try:
        _, g0 = sde.sde(probe, t)
        _, g1 = sde.sde(probe + 1.0, t)
    except NotImplementedError as error:
        raise ValueError(
            f"{type(sde).__name__} does not define its drift and diffusion (sde.sde), so it has no probability-flow "
            "ODE to compute a likelihood with."
        ) from error
    if not torch.equal(torch.as_tensor(g0).expand_as(probe), torch.as_tensor(g1).expand_as(probe)):
        raise ValueError(
            f"{type(sde).__name__}'s diffusion depends on x; likelihood() needs the probability-flow ODE of score-SDE "
            "eq. 13 with a state-independent g(t)."
        )


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

    Integrates ``x`` together with ``delta(t) = int_eps^t div f~`` from ``sampling_eps`` to ``T`` (score-SDE
    eqs. 13 and 39) and returns ``nll = -(log p_T(x(T)) + delta(T))`` with ``log p_T`` the SDE's ``prior_logp``.
    This is ``-log p_eps(x)``: the density of the model's marginal at ``sampling_eps`` (which is > 0 for
    continuous SDEs, and level 0 of a DDPM table), evaluated at the data.

    Each sample is integrated as its own ODE with its own adaptive step sizes (per-sample error control), so its
    result does not depend on the rest of the batch; see the module docstring.

    Args:
        model: called as ``model(x, timestep)`` through :func:`sdekit.models.model_prediction`; it must predict one
            value per input element and be differentiable in ``x``.
        x: data, batch first, any shape ``(B, ...)``; integrated in its compute dtype (float32 for half types).
        scheduler: an sdekit scheduler, or a configuration mapping one accepts (built as ``load_scheduler("pf-ode",
            config)``); its SDE, ``prediction_type``, model time input and ``sampling_eps`` are used.
        trace: ``hutchinson`` (default): the Skilling-Hutchinson estimate ``v^T (d f~ / dx) v`` with one probe ``v``
            per sample drawn once per solve, one vector-Jacobian product per evaluation (unbiased for the
            divergence, hence for ``log p``; not for ``p``); ``exact``: the full Jacobian trace, ``D``
            vector-Jacobian products per evaluation (small ``D`` and tests).
        noise: the probe distribution, ``rademacher`` (default) or ``gaussian``.
        rtol, atol: the solver's tolerances on each sample's state ``(x, delta)``; default 1e-5 each.
        method: a torchdiffeq adaptive solver (:data:`sdekit.ode.ADAPTIVE_METHODS`), default ``dopri5``.
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
        FloatingPointError: the ODE's right-hand side held NaN or Inf (the message names the time reached).
    """
    check_choice("trace", trace, TRACE_METHODS)
    check_choice("noise", noise, PROBE_NOISES)
    check_solver_options(rtol, atol, method)
    if not torch.is_tensor(x) or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError("x must be a tensor of shape (B, ...) with at least one sample and one value per sample.")
    scheduler = ode_scheduler(scheduler)
    sde: SDE = scheduler.sde
    prediction_type: str = scheduler.config.prediction_type
    time_input: str = scheduler.time_input

    x = x.to(compute_dtype(x.dtype))
    dims = math.prod(x.shape[1:])
    offset = 0.0
    if dequantize:
        x, offset = _dequantize(x, data_range, generator)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or Inf.")
    _check_probability_flow(sde, x)
    probes = _draw(noise, x.shape, generator, x.device, x.dtype) if trace == "hutchinson" else None

    def score_fn(xs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = model_prediction(model, xs, to_model_time(sde, t, time_input), expect_shape=True)
        return model_output_to(sde, output, xs, t, prediction_type, "score")

    flow = sde.reverse(score_fn, probability_flow=True)  # drift f - g^2 score / 2: eq. 13
    # Imported here: torchdiffeq pulls in scipy, which would slow down `import sdekit` for everyone.
    from torchdiffeq import odeint

    span = torch.tensor([sde.sampling_eps, sde.T], dtype=torch.float64, device=x.device)
    # step_t: the last step ends exactly at T instead of stepping past it and interpolating.
    options = {"step_t": span[1:]}
    nll, nfes, latents = [], [], []
    for i in range(x.shape[0]):
        probe = probes[i : i + 1] if probes is not None else None
        nfe = 0

        def rhs(t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            nonlocal nfe
            nfe += 1
            # The initial step-size probe may look past T; keep the model inside [sampling_eps, T].
            t = t.clamp(sde.sampling_eps, sde.T)
            tb = t.to(state[0].dtype).expand(1)
            with torch.enable_grad():
                xs = state[0].detach().requires_grad_(True)
                velocity = flow.sde(xs, tb)[0]
                if probe is not None:
                    # Skilling-Hutchinson: E_v[v^T J v] = tr J with E[v v^T] = I (score-SDE appendix D.2).
                    (vjp,) = torch.autograd.grad(velocity, xs, probe)
                    div = (vjp * probe).sum()
                else:
                    flat = velocity.reshape(-1)
                    div = sum(
                        torch.autograd.grad(flat[j], xs, retain_graph=j + 1 < dims)[0].reshape(-1)[j]
                        for j in range(dims)
                    )
            velocity, div = velocity.detach(), torch.as_tensor(div).detach().reshape(1)
            # The solver syncs with the host at every step anyway; without this a NaN would make it shrink the step
            # until it fails with an unrelated message.
            if not (bool(torch.isfinite(velocity).all()) and bool(torch.isfinite(div).all())):
                raise FloatingPointError(
                    f"likelihood: the probability-flow ODE of sample {i} holds NaN or Inf at t={float(t):.6g} "
                    f"(integrating from {sde.sampling_eps:g} to {sde.T:g}); check the model's outputs "
                    f"(prediction_type={prediction_type!r}, time_input={time_input!r})."
                )
            return velocity, div

        state0 = (x[i : i + 1], torch.zeros(1, dtype=x.dtype, device=x.device))
        with torch.no_grad():
            z, delta = (s[-1] for s in odeint(rhs, state0, span, rtol=rtol, atol=atol, method=method, options=options))
        # eq. 39 integrated from eps to T: log p_eps(x) = log p_T(z) + delta.
        nll.append(-(sde.prior_logp(z).to(x.dtype) + delta))
        nfes.append(nfe)
        latents.append(z)
    nll_t = torch.cat(nll) + dims * offset
    if not bool(torch.isfinite(nll_t).all()):
        raise FloatingPointError("likelihood: the result holds NaN or Inf (check the model and the prior_logp).")
    return LikelihoodResult(
        nll=nll_t,
        bpd=nll_t / (dims * math.log(2)),
        nfe=torch.tensor(nfes, dtype=torch.int64),
        z=torch.cat(latents),
    )
