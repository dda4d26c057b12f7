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

from sdekit.sde import SDE

__all__ = ["linear_discretization", "linear_sde"]

_PROBE_VALUES = ((1.0, 1.0), (-2.5, 0.75))

Coefficients = tuple[list[float], list[float]]


def _linear_coefficients(
    evaluate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    sde: SDE,
    times: Sequence[float],
    what: str,
) -> Coefficients:
    """``(a, b)``, one value per time, such that ``evaluate(x, t) == (a x, b)`` on both probes.

    Raises ``ValueError`` if the drift is not linear in ``x``, or ``b`` depends on ``x`` or is not isotropic.
    """
    t = torch.as_tensor(list(times), dtype=torch.float64)
    n = t.numel()
    probes = [torch.tensor(values, dtype=torch.float64).expand(n, 2) for values in _PROBE_VALUES]
    results = [evaluate(probe, t) for probe in probes]
    a = results[0][0].to(torch.float64)[:, 0]
    scales = [torch.broadcast_to(torch.as_tensor(b, dtype=torch.float64), (n, 2)) for _, b in results]
    b = scales[0][:, 0]
    linear = all(
        torch.allclose(drift.to(torch.float64), a[:, None] * probe, rtol=1e-6, atol=1e-12)
        for (drift, _), probe in zip(results, probes)
    )
    isotropic = all(torch.allclose(scale, b[:, None].expand(n, 2), rtol=1e-9, atol=0.0) for scale in scales)
    if not (linear and isotropic):
        raise ValueError(
            f"the pc sampler supports SDEs whose drift is linear in x (f(x, t) = a(t) x) and whose diffusion is one "
            f"number per time, independent of x; {type(sde).__name__}.{what} is not of that form (checked on two "
            "probe tensors). Use a sampler that calls the SDE directly, e.g. sdekit.sample_reverse_sde."
        )
    return a.tolist(), b.tolist()


def linear_sde(sde: SDE, times: Sequence[float]) -> Coefficients:
    """``(a, g)`` per time, with ``sde.sde(x, t) == (a x, g)``: the drift per unit of ``x`` and the diffusion.

    Args:
        sde: an SDE with a linear drift and an ``x``-independent, isotropic diffusion.
        times: the times.

    Raises:
        ValueError: the SDE is not of that form.
    """
    return _linear_coefficients(sde.sde, sde, times, "sde")


def linear_discretization(sde: SDE, times: Sequence[float], dt: float | None = None) -> Coefficients:
    """``(a_i, G_i)`` per time, with ``sde.discretize(x, t, dt) == (a_i x, G_i)``: a step of the SDE's own chain.

    Args:
        sde: an SDE whose discretization is linear in ``x`` with an ``x``-independent, isotropic ``G``.
        times: the times the steps end at (each step runs forward from ``t - dt`` to ``t``).
        dt: the step length; ``None`` (default) takes the SDE's own (``T / N``).

    Raises:
        ValueError: the discretization is not of that form.
    """
    return _linear_coefficients(lambda x, t: sde.discretize(x, t, dt), sde, times, "discretize")
