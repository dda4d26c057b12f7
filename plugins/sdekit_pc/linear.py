"""Coefficients of linear-drift SDEs, read off the SDE's own functions with probe tensors.

The predictor-corrector samplers here need ``f(x, t)``, ``g(t)`` and one step of the SDE's discretization as
plain numbers, so that ``step()`` applies them without calling the SDE. That works when the drift is linear in
``x``, ``f(x, t) = a(t) x``, and the diffusion does not depend on ``x`` (VE: ``a = 0``; VP and sub-VP:
``a = -beta(t) / 2``; score-SDE eqs. 9, 11 and 17). Each helper evaluates the SDE on two different probe
tensors, at many times at once (one per probe row), and raises ``ValueError`` if the results are not of that
form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sdekit.sde import SDE, linear_coefficients

__all__ = ["linear_discretization", "linear_sde"]

Coefficients = tuple[list[float], list[float]]


def _linear_coefficients(
    evaluate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sde: SDE,
    times: Sequence[float],
    what: str,
) -> Coefficients:
    """``(a, b)``, one value per time, such that ``evaluate(x, t) == (a x, b)``
    (:func:`sdekit.sde.linear_coefficients`).

    Raises ``ValueError`` if the drift is not linear in ``x``, or ``b`` depends on ``x`` or is not isotropic.
    """
    try:
        return linear_coefficients(evaluate, times)
    except ValueError as err:
        raise ValueError(
            f"the pc sampler supports SDEs whose drift is linear in x (f(x, t) = a(t) x) and whose diffusion is one "
            f"number per time, independent of x; {type(sde).__name__}.{what} is {err}. Use a sampler that calls the "
            "SDE directly, e.g. sdekit.sample_reverse_sde."
        ) from None


def linear_sde(sde: SDE, times: Sequence[float]) -> Coefficients:
    """``(a, g)`` per time, with ``sde.sde(x, t) == (a x, g)``: the drift per unit of ``x`` and the diffusion.

    Args:
        sde: an SDE with a linear drift and an ``x``-independent, isotropic diffusion.
        times: the times.

    Raises:
        ValueError: the SDE is not of that form.
    """
    return _linear_coefficients(sde.sde, sde, times, "sde")


def linear_discretization(sde: SDE, times: Sequence[float], dt: float | Sequence[float] | None = None) -> Coefficients:
    """``(a_i, G_i)`` per time, with ``sde.discretize(x, t_i, dt_i) == (a_i x, G_i)``: a step of the SDE's own chain.

    Args:
        sde: an SDE whose discretization is linear in ``x`` with an ``x``-independent, isotropic ``G``.
        times: the times the steps end at (each step runs forward from ``t_i - dt_i`` to ``t_i``).
        dt: the step length, one for all times or one per time; ``None`` (default) takes the SDE's own (``T / N``).
            Per-time steps go to ``discretize`` as one tensor (one row per time) when the SDE's ``discretize``
            takes a tensor ``dt`` (the built-in ones do); otherwise it is called once per distinct step.

    Raises:
        ValueError: the discretization is not of that form.
    """
    if dt is None or isinstance(dt, (int, float)):
        return _linear_coefficients(lambda x, t: sde.discretize(x, t, dt), sde, times, "discretize")
    steps = [float(d) for d in dt]
    if len(steps) != len(times):
        raise ValueError(f"dt must be one number or one per time; got {len(steps)} steps for {len(times)} times.")
    column = torch.tensor(steps, dtype=torch.float64)[:, None]
    try:
        return _linear_coefficients(lambda x, t: sde.discretize(x, t, column), sde, times, "discretize")
    except (TypeError, ValueError, RuntimeError):  # a discretize that takes only a number: one call per step
        pass
    # Steps that agree to 12 significant digits (those of a uniform grid differ by float rounding only) share one
    # call, with the first one's step.
    groups: dict[str, list[int]] = {}
    for i, step in enumerate(steps):
        groups.setdefault(f"{step:.12g}", []).append(i)
    drifts, scales = [0.0] * len(times), [0.0] * len(times)
    for members in groups.values():
        a, g = linear_discretization(sde, [times[i] for i in members], steps[members[0]])
        for i, a_i, g_i in zip(members, a, g):
            drifts[i], scales[i] = a_i, g_i
    return drifts, scales
