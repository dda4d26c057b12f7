"""Adaptive Runge-Kutta for a batch of independent ODEs, each sample with its own step sizes.

The likelihood and the encoder integrate one probability-flow ODE per sample. Solving the batch as one state
(torchdiffeq's ``odeint`` with one error norm and one step size) couples the samples: a hard sample shrinks
everyone's steps and changes their results within the tolerances. :func:`solve` keeps one time, one step size
and one accept/reject decision per sample, while every stage still evaluates the right-hand side once for the
whole batch of samples that have not reached the end:

* ``dopri5`` (Dormand & Prince, "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 6, 1980) and
  ``bosh3`` (Bogacki & Shampine, "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2, 1989) run batched
  here, with the step-size control of torchdiffeq's solvers of the same names (its defaults: Hairer, Norsett &
  Wanner's initial step, Solving ODEs I, sec. II.4; the max-over-tensors RMS error norm; safety 0.9, growth at
  most 10x, shrink at most 5x on a rejected step, no shrink on an accepted one), so that a sample's solve takes
  the steps it would take alone;
* every other method of :data:`sdekit.ode.ADAPTIVE_METHODS` runs through torchdiffeq's ``odeint``, one sample at a
  time.

Either way a sample's result does not depend on what else is in the batch, and the host is consulted once per
step (which samples are still running, and whether any value went non-finite), as any adaptive solver must.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

State = tuple[torch.Tensor, ...]
Rhs = Callable[[torch.Tensor, State, torch.Tensor], State]
"""``rhs(t, state, index)``: the derivative of ``state`` at times ``t`` (one per row), for the samples ``index``
(int64, positions in the full batch) that the rows of ``t`` and ``state`` hold."""

__all__ = ["BATCHED_METHODS", "BatchedSolution", "solve"]


@dataclass(frozen=True)
class _Tableau:
    """An explicit embedded Runge-Kutta pair; ``b`` advances the solution, ``b - b_low`` estimates its error."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_low: tuple[float, ...]
    order: int  # of the solution that advances


# Dormand-Prince 5(4): seven stages, the last one evaluated at the new point (first-same-as-last).
_DOPRI5 = _Tableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    order=5,
)

# Bogacki-Shampine 3(2): four stages, first-same-as-last.
_BOSH3 = _Tableau(
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    order=3,
)

_TABLEAUS = {"dopri5": _DOPRI5, "bosh3": _BOSH3}
BATCHED_METHODS = tuple(_TABLEAUS)
"""The methods :func:`solve` runs batched with per-sample step sizes; the others run one sample at a time."""

_SAFETY, _GROW, _SHRINK = 0.9, 10.0, 0.2


@dataclass
class BatchedSolution:
    """Output of :func:`solve`.

    Args:
        state: the state at the end of the span, one row per sample, like the initial state.
        nfe: right-hand-side evaluations of each sample's solve, int64 ``(B,)``.
        calls: calls of the right-hand side (each on the samples still running).
    """

    state: State
    nfe: torch.Tensor
    calls: int


def _norm(parts: State) -> torch.Tensor:
    """Per-sample error norm: the largest over the state's tensors of the root mean square of each row."""
    return torch.stack([p.reshape(p.shape[0], -1).pow(2).mean(1).sqrt() for p in parts]).amax(0)


def _combine(base: State, h: torch.Tensor, weights: tuple[float, ...], stages: list[State]) -> State:
    """``base + h * sum_j weights[j] * stages[j]`` for every tensor of the state (``h`` one value per row)."""
    out = []
    for n, y in enumerate(base):
        acc = torch.zeros_like(y)
        for w, k in zip(weights, stages, strict=False):
            if w != 0.0:
                acc = acc + w * k[n]
        out.append(y + h.reshape((-1,) + (1,) * (y.ndim - 1)).to(y.dtype) * acc)
    return tuple(out)


def _check_finite(
    evaluations: list[tuple[State, torch.Tensor]], index: torch.Tensor, to_time: Callable, what: str
) -> None:
    """Raise FloatingPointError naming the first time at which a row went non-finite.

    ``evaluations`` are ``(values, tau)`` pairs in the order they were computed; one host sync checks them all.
    """
    bad = torch.stack(
        [
            torch.stack([~torch.isfinite(p.reshape(p.shape[0], -1)).all(1) for p in parts]).any(0)
            for parts, _ in evaluations
        ]
    )
    if bool(bad.any()):
        row = int(bad.any(0).nonzero()[0, 0])
        first = int(bad[:, row].nonzero()[0, 0])
        reached = float(to_time(evaluations[first][1][row]))
        raise FloatingPointError(
            f"{what}: the ODE of sample {int(index[row])} holds NaN or Inf at t={reached:.6g}; check the model's "
            "outputs (prediction_type, time_input)."
        )


def _batched(rhs: Rhs, y0: State, t0: float, t1: float, rtol: float, atol: float, tab: _Tableau, what: str, clock):  # noqa: ANN001, ANN202
    device = y0[0].device
    batch = y0[0].shape[0]
    length, direction = abs(t1 - t0), math.copysign(1.0, t1 - t0)
    nfe = torch.zeros(batch, dtype=torch.int64, device=device)
    calls = 0

    def to_time(tau: torch.Tensor) -> torch.Tensor:
        return t0 + direction * tau

    def reported(tau: torch.Tensor) -> torch.Tensor:
        return clock(to_time(tau)) if clock is not None else to_time(tau)

    def g(tau: torch.Tensor, y: State, index: torch.Tensor) -> State:
        # Integrate in tau = |t - t0| >= 0 so that one code path serves both directions.
        nonlocal calls
        calls += 1
        nfe.index_add_(0, index, torch.ones_like(index))
        # The initial step-size probe may look past the end of the span; keep the right-hand side inside it.
        out = rhs(to_time(tau.clamp(0.0, length)), y, index)
        return tuple(direction * k for k in out)

    everyone = torch.arange(batch, device=device)
    tau = torch.zeros(batch, dtype=torch.float64, device=device)
    y = tuple(p.clone() for p in y0)
    k_first = g(tau, y, everyone)
    _check_finite([(k_first, tau)], everyone, reported, what)

    # Initial step (Hairer, Norsett & Wanner, sec. II.4), per sample, as torchdiffeq selects it.
    scale = tuple(atol + rtol * p.abs() for p in y)
    d0 = _norm(tuple(p / s for p, s in zip(y, scale, strict=True)))
    d1 = _norm(tuple(k / s for k, s in zip(k_first, scale, strict=True)))
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).double()
    h0 = h0.clamp(max=length)  # the probe below stays inside the span
    probe = g(h0, _combine(y, h0, (1.0,), [k_first]), everyone)
    d2 = _norm(tuple((f - k) / s for f, k, s in zip(probe, k_first, scale, strict=True))).double() / h0
    dmax = torch.maximum(d1.double(), d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / tab.order))
    h = torch.minimum(100 * h0, h1)
    # A non-finite probe (a right-hand side that breaks somewhere in the span): start small; the steps will find
    # and report where it breaks.
    h = torch.where(torch.isfinite(h), h, 1e-3 * h0)

    exponent = 1.0 / tab.order
    while True:
        running = tau < length
        index = running.nonzero().squeeze(1)  # the one host sync per step: which samples still run
        if index.numel() == 0:
            break
        tau_r, h_r = tau[index], h[index]
        y_r = tuple(p[index] for p in y)
        step = torch.minimum(h_r, length - tau_r)
        if bool((step <= 1e-15 * max(length, 1.0)).any()):
            row = int((step <= 1e-15 * max(length, 1.0)).nonzero()[0, 0])
            raise FloatingPointError(
                f"{what}: the step size of sample {int(index[row])} underflowed at "
                f"t={float(reported(tau_r[row])):.6g}; the ODE is too stiff for rtol={rtol:g}, atol={atol:g}."
            )
        stages = [tuple(k[index] for k in k_first)]
        stage_times = [tau_r]
        for c, a in zip(tab.c[1:], tab.a[1:], strict=True):
            stage_times.append(tau_r + c * step)
            stages.append(g(stage_times[-1], _combine(y_r, step, a, stages), index))
        y_new = _combine(y_r, step, tab.b, stages)
        _check_finite([*zip(stages, stage_times, strict=True), (y_new, tau_r + step)], index, reported, what)
        zero = tuple(torch.zeros_like(p) for p in y_r)
        err = _combine(zero, step, tuple(hi - lo for hi, lo in zip(tab.b, tab.b_low, strict=True)), stages)
        tol = tuple(atol + rtol * torch.maximum(p.abs(), q.abs()) for p, q in zip(y_r, y_new, strict=True))
        ratio = _norm(tuple(e / s for e, s in zip(err, tol, strict=True))).double()
        accept = ratio <= 1.0
        # Next step size: safety * ratio^(-1/order), at most 10x larger, at most 5x smaller after a rejection and
        # never smaller after an acceptance.
        factor = (_SAFETY / ratio.clamp(min=1e-300) ** exponent).clamp(max=_GROW)
        factor = torch.where(accept, factor.clamp(min=1.0), factor.clamp(min=_SHRINK))
        factor = torch.where(ratio == 0, torch.full_like(factor, _GROW), factor)
        landed = step >= length - tau_r
        tau[index] = torch.where(accept, torch.where(landed, torch.full_like(tau_r, length), tau_r + step), tau_r)
        h[index] = step * factor
        rows = accept.reshape(-1)
        for n in range(len(y)):
            view = (-1,) + (1,) * (y[n].ndim - 1)
            y[n][index] = torch.where(rows.reshape(view), y_new[n], y_r[n])
            k_first[n][index] = torch.where(rows.reshape(view), stages[-1][n], k_first[n][index])
    return y, nfe, calls


def _one_at_a_time(rhs: Rhs, y0: State, t0: float, t1: float, rtol: float, atol: float, method: str, what: str, clock):  # noqa: ANN001, ANN202
    # Imported here: torchdiffeq pulls in scipy, which would slow down `import sdekit` for everyone.
    from torchdiffeq import odeint

    device = y0[0].device
    batch = y0[0].shape[0]
    nfe = torch.zeros(batch, dtype=torch.int64, device=device)
    lo, hi = min(t0, t1), max(t0, t1)
    span = torch.tensor([t0, t1], dtype=torch.float64, device=device)
    finals: list[State] = []
    calls = 0
    for i in range(batch):
        index = torch.tensor([i], device=device)

        def one(t: torch.Tensor, state: State, index: torch.Tensor = index) -> State:
            nonlocal calls
            calls += 1
            nfe[index] += 1
            out = rhs(t.clamp(lo, hi).reshape(1), state, index)
            _check_finite([(out, t.reshape(1))], index, clock or (lambda time: time), what)
            return out

        # step_t: the last step ends exactly at t1 instead of stepping past it and interpolating.
        solution = odeint(
            one,
            tuple(p[i : i + 1] for p in y0),
            span,
            rtol=rtol,
            atol=atol,
            method=method,
            options={"step_t": span[1:]},
        )
        finals.append(tuple(s[-1] for s in solution))
    return tuple(torch.cat(parts) for parts in zip(*finals, strict=True)), nfe, calls


def solve(
    rhs: Rhs,
    state0: State,
    t0: float,
    t1: float,
    *,
    rtol: float,
    atol: float,
    method: str = "dopri5",
    what: str = "solve",
    clock: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BatchedSolution:
    """Integrate ``d state / dt = rhs(t, state, index)`` from ``t0`` to ``t1`` for every sample (row) of ``state0``.

    Each sample has its own step sizes and error control (see the module docstring), so its result does not
    depend on the other rows. Runs without autograd; ``rhs`` may enable it for what it computes itself.

    Args:
        rhs: the right-hand side: ``rhs(t, state, index)`` with ``t`` float64 ``(n,)``, ``state`` a tuple of
            tensors of ``n`` rows and ``index`` the int64 positions of those rows in the batch; returns a tuple
            like ``state``.
        state0: the initial state, a tuple of tensors whose first dimension is the batch.
        t0, t1: the span; ``t1 < t0`` integrates backwards.
        rtol, atol: the tolerances of each sample's error control.
        method: ``dopri5`` or ``bosh3`` (batched here) or another torchdiffeq adaptive method (one sample at a time).
        what: the caller's name for error messages.
        clock: maps the integration variable to the time that error messages name (default: itself).

    Returns:
        :class:`BatchedSolution`: the final state, each sample's number of evaluations, the number of calls.

    Raises:
        FloatingPointError: NaN or Inf in the state or the right-hand side (naming the sample and the time), or a
            step size that underflowed.
    """
    with torch.no_grad():
        if method in _TABLEAUS:
            state, nfe, calls = _batched(rhs, state0, float(t0), float(t1), rtol, atol, _TABLEAUS[method], what, clock)
        else:
            state, nfe, calls = _one_at_a_time(rhs, state0, float(t0), float(t1), rtol, atol, method, what, clock)
    return BatchedSolution(state=state, nfe=nfe, calls=calls)
