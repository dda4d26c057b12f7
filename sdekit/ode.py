"""Sampling with an adaptive solver of the probability-flow ODE (score-SDE eq. 13).

Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021), section 4.3:
``dx = [f(x, t) - g(t)^2 score(x, t) / 2] dt`` is integrated from ``T`` down to ``sampling_eps`` with an
adaptive Runge-Kutta solver (the paper uses RK45; here torchdiffeq's ``dopri5`` by default), so the number of
score evaluations is chosen by the error tolerances, not in advance. That is why this is a function and not a
diffusers scheduler; the fixed-step solvers of the same ODE are the ``pf-ode`` sampler plugin.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .models import model_device_dtype, model_prediction
from .parametrization import PREDICTION_TYPES, TIME_INPUTS, check_choice, model_output_to, to_model_time
from .sampling import check_finite
from .sde import SDE, ScoreFn, TimeLike, compute_dtype

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
"""The adaptive solvers of torchdiffeq that :func:`sample_ode` accepts."""

__all__ = [
    "ADAPTIVE_METHODS",
    "ODEResult",
    "check_solver_options",
    "model_output_fn",
    "model_score_fn",
    "ode_scheduler",
    "sample_ode",
]


def check_solver_options(rtol: float, atol: float, method: str) -> None:
    """Raise ``ValueError`` unless ``rtol`` and ``atol`` are numbers > 0 and ``method`` is one of
    :data:`ADAPTIVE_METHODS` (the options of every adaptive probability-flow solve in sdekit)."""
    check_choice("method", method, ADAPTIVE_METHODS)
    for name, tol in (("rtol", rtol), ("atol", atol)):
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"{name} must be a number > 0, got {tol!r}.")


def ode_scheduler(scheduler: Any) -> Any:
    """``scheduler`` if it is an sdekit scheduler (with ``.sde``, ``.time_input`` and ``.config``), else the
    ``pf-ode`` scheduler built from the configuration mapping given: what the likelihood and the encoder read the
    SDE, the prediction type and the model time from."""
    if hasattr(scheduler, "sde") and hasattr(scheduler, "time_input") and hasattr(scheduler, "config"):
        return scheduler
    if isinstance(scheduler, Mapping):
        from .registry import load_scheduler

        return load_scheduler("pf-ode", scheduler)
    raise TypeError(
        "scheduler must be an sdekit scheduler (with .sde, .time_input and .config) or a configuration mapping one "
        f"accepts; got {type(scheduler).__name__}."
    )


@dataclass
class ODEResult:
    """Output of :func:`sample_ode`.

    Args:
        samples: the samples, in the requested dtype.
        nfe: number of score (model) evaluations the solver made, including the one for ``denoise``.
    """

    samples: torch.Tensor
    nfe: int


def model_output_fn(
    model: Any, scheduler: Any, like: torch.Tensor
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``predict(x, t)``: ``model``'s raw output at continuous times ``t`` (one per sample), as ``scheduler`` reads it.

    The model gets ``t`` in the scheduler's units (``scheduler.time_input``) and ``x`` in its own dtype (e.g.
    float16 for a half model, while the ODE runs in float32); its output comes back in ``x``'s dtype, checked to
    have ``x``'s shape. ``like`` is a tensor of the data, for models that declare no dtype.
    """
    _, model_dtype = model_device_dtype(model, like)
    sde: SDE = scheduler.sde
    time_input: str = scheduler.time_input

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = model_prediction(model, x.to(model_dtype), to_model_time(sde, t, time_input), expect_shape=True)
        return output.to(x.dtype)

    return predict


def model_score_fn(
    model: torch.nn.Module, sde: SDE, prediction_type: str = "epsilon", time_input: str | None = None
) -> ScoreFn:
    """A ``score_fn(x, t)`` (continuous ``t``) from a diffusers-style model ``model(x, timestep)``.

    Args:
        model: called as ``model(x, timestep)`` with ``timestep`` one value per sample in the model's units; it
            returns a tensor, a tuple, or an object with ``.sample`` (e.g. a ``UNet2DModel``).
        sde: the SDE the model was trained with.
        prediction_type: what the model predicts: ``epsilon`` (default), ``v_prediction``, ``sample``, ``score``.
        time_input: the model's timestep units, ``ddpm``, ``sigma`` or ``continuous``; ``None`` (default) is the
            SDE's own :meth:`~sdekit.sde.SDE.default_time_input`, as in sdekit's schedulers.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    time_input = sde.default_time_input() if time_input is None else check_choice("time_input", time_input, TIME_INPUTS)

    def score_fn(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=compute_dtype(x.dtype))
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        output = model_prediction(model, x, to_model_time(sde, t, time_input))
        return model_output_to(sde, output, x, t, prediction_type, "score")

    return score_fn


def sample_ode(
    sde: SDE,
    shape: Sequence[int] | None = None,
    *,
    model: torch.nn.Module | None = None,
    score_fn: ScoreFn | None = None,
    x_T: torch.Tensor | None = None,
    prediction_type: str | None = None,
    time_input: str | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    denoise: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ODEResult:
    """Sample by integrating the probability-flow ODE (score-SDE eq. 13) from ``T`` to ``sampling_eps`` adaptively.

    Give the score through exactly one of ``model`` (a diffusers-style network, see :func:`model_score_fn`) and
    ``score_fn``; start from the prior (``shape``) or from a given ``x_T``. The solver's error control measures the
    whole batch at once (as the score-SDE reference code does), so the step sizes, and within the tolerances the
    samples, depend on the batch.

    Args:
        sde: the forward SDE; its ``sampling_eps`` is where the integration ends.
        shape: output shape, batch first, to draw ``x_T`` from the prior; or give ``x_T`` instead.
        model: a network called as ``model(x, timestep)``; its output is converted to the score.
        score_fn: ``score_fn(x, t)`` with continuous ``t`` (one value per sample), e.g. ``oracle.score_fn``.
        x_T: the starting point at ``t = T`` (deterministic decoding); integration runs in its dtype and device.
        prediction_type: with ``model``: ``epsilon`` (``None``, the default), ``v_prediction``, ``sample``,
            ``score``.
        time_input: with ``model``: ``ddpm``, ``sigma`` or ``continuous``; ``None`` (default) is the SDE's own
            :meth:`~sdekit.sde.SDE.default_time_input`.
        rtol, atol: the solver's relative and absolute tolerances, default 1e-5 each (the reference code's).
        method: a torchdiffeq adaptive solver: ``dopri5`` (default), ``dopri8``, ``bosh3``, ``fehlberg2``,
            ``adaptive_heun``.
        denoise: return the ``x_0`` estimate at ``sampling_eps`` (Tweedie's formula, one more evaluation; the
            reference code's ``denoise``) instead of the ODE's state there; default False.
        generator, device, dtype: for drawing ``x_T`` from the prior (defaults: none, CPU, float32). Half dtypes
            are integrated in float32 and returned in their own dtype.

    Returns:
        :class:`ODEResult` with the samples and the number of function evaluations ``nfe``.

    Raises:
        FloatingPointError: the samples hold NaN or Inf.
    """
    if (model is None) == (score_fn is None):
        raise ValueError("give exactly one of model (a network) and score_fn (a score function of (x, t)).")
    if score_fn is not None and (prediction_type is not None or time_input is not None):
        raise ValueError("prediction_type and time_input describe a model; score_fn already returns the score.")
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape (to draw x_T from the prior) and x_T.")
    check_solver_options(rtol, atol, method)
    if model is not None:
        score_fn = model_score_fn(model, sde, prediction_type or "epsilon", time_input)
    # Imported here: torchdiffeq pulls in scipy, which would slow down `import sdekit` for everyone.
    from torchdiffeq import odeint

    if x_T is None:
        x_T = sde.prior_sampling(shape, generator=generator, device=device, dtype=dtype)
    out_dtype = x_T.dtype
    x = x_T.to(compute_dtype(x_T.dtype))
    flow = sde.reverse(score_fn, probability_flow=True)
    nfe = 0

    def drift(t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        # The solver's initial step-size guess (Hairer, Norsett & Wanner, II.4) probes one unclipped step ahead,
        # possibly beyond sampling_eps; keep that probe's time inside [sampling_eps, T]. Every actual step stays
        # inside through step_t below.
        t = t.clamp(sde.sampling_eps, sde.T)
        velocity = flow.sde(state, t.expand(state.shape[0]))[0]
        # The solver syncs with the host at every step anyway; without this check a NaN score would make it
        # shrink the step until it fails with an unrelated message.
        if not bool(torch.isfinite(velocity).all()):
            raise FloatingPointError(
                f"sample_ode: the probability-flow drift at t={float(t):.6g} holds NaN or Inf; check the score "
                "model's outputs (prediction_type, time_input)."
            )
        return velocity

    span = torch.tensor([sde.T, sde.sampling_eps], dtype=torch.float64, device=x.device)
    # step_t: the last step ends exactly at sampling_eps; by default torchdiffeq steps past the end and
    # interpolates, which would evaluate the score below sampling_eps (where sigma may be 0).
    options = {"step_t": span[1:]}
    with torch.no_grad():
        x = odeint(drift, x, span, rtol=rtol, atol=atol, method=method, options=options)[-1]
        if denoise:
            t = torch.full((x.shape[0],), sde.sampling_eps, dtype=x.dtype, device=x.device)
            x = model_output_to(sde, score_fn(x, t), x, t, "score", "sample")
            nfe += 1
    return ODEResult(samples=check_finite(x, "sample_ode").to(out_dtype), nfe=nfe)
