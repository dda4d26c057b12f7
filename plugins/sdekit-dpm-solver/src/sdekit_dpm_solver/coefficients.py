"""The numbers of DPM-Solver's updates: phi functions, exponential-integrator weights and order schedules.

Everything here is plain Python arithmetic on floats (float64), computed once per ``set_timesteps`` so that a
scheduler's ``step()`` only combines tensors with precomputed weights.

With the kernel ``x_t = alpha_t x_0 + sigma_t eps`` and ``lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR), the
probability-flow ODE has the exact solution, from ``s`` to ``t`` with ``h = lambda_t - lambda_s``,

* in the noise-prediction form (Lu et al. 2022a, "DPM-Solver", Proposition 3.1):
  ``x_t = (alpha_t / alpha_s) x_s - sigma_t int_0^h e^(h - u) eps(lambda_s + u) du``;
* in the data-prediction form (Lu et al. 2022b, "DPM-Solver++", section 4.1):
  ``x_t = (sigma_t / sigma_s) x_s + alpha_t int_0^h e^(-(h - u)) x_0(lambda_s + u) du``.

A solver of order ``k`` replaces the prediction by the polynomial through ``k`` of its values (at past levels for the
multistep solvers, at intermediate levels for the singlestep ones) and integrates it exactly: the Taylor expansions
of DPM-Solver (section 3.2) and DPM-Solver++ (section 4.1), whose integrals are the phi functions
``h^(m+1) phi_(m+1)(+-h)``, ``phi_k(z) = int_0^1 e^((1 - v) z) v^(k-1) / (k-1)! dv``: exponential Adams (multistep)
and exponential Runge-Kutta (singlestep) methods, Hochbruck & Ostermann 2010, "Exponential integrators".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "LOWER_ORDER_FINAL_BELOW",
    "MAX_ORDER",
    "SINGLESTEP_NODES",
    "exponential_weights",
    "first_order_coefficients",
    "lagrange_values",
    "midpoint_weights",
    "multistep_orders",
    "phi",
    "singlestep_orders",
]

MAX_ORDER = 3
"""The highest order implemented (as in both papers)."""

SINGLESTEP_NODES: dict[int, tuple[float, ...]] = {1: (0.0,), 2: (0.0, 0.5), 3: (0.0, 1.0 / 3.0, 2.0 / 3.0)}
"""Where a singlestep solver of each order evaluates the model within a step, as fractions of the step's ``h`` in
``lambda``: DPM-Solver-2 with ``r_1 = 1/2`` and DPM-Solver-3 with ``r_1 = 1/3``, ``r_2 = 2/3`` (Lu et al. 2022a,
section 3.3; DPM-Solver++(2S), Lu et al. 2022b, Algorithm 1)."""

LOWER_ORDER_FINAL_BELOW = 15
"""Multistep runs of fewer steps than this lower the order of their last steps (``lower_order_final``), as the
reference implementation and diffusers' ``DPMSolverMultistepScheduler`` do for few-step runs."""

_SERIES_BELOW = 0.5  # |z| under which phi_k comes from its power series: the closed form cancels there


def phi(k: int, z: float) -> float:
    """``phi_k(z) = int_0^1 e^((1 - v) z) v^(k-1) / (k-1)! dv`` for ``k >= 1`` (``phi_1(z) = (e^z - 1) / z``).

    The power series ``sum_i z^i / (i + k)!`` near 0, else the recursion ``phi_(j+1)(z) = (phi_j(z) - 1/j!) / z``
    from ``phi_1 = expm1(z) / z``.
    """
    if k < 1:
        raise ValueError(f"phi_k needs k >= 1, got {k}.")
    if abs(z) < _SERIES_BELOW:
        term = 1.0 / math.factorial(k)
        total = 0.0
        i = 0
        while abs(term) > 1e-18 * abs(total) or i == 0:
            total += term
            i += 1
            term *= z / (i + k)
        return total
    value = math.expm1(z) / z
    for j in range(1, k):
        value = (value - 1.0 / math.factorial(j)) / z
    return value


def _basis_polynomials(nodes: Sequence[float]) -> list[list[float]]:
    """The monomial coefficients (lowest degree first) of each Lagrange basis polynomial through ``nodes``."""
    result = []
    for j, node in enumerate(nodes):
        coeffs = [1.0]
        for i, other in enumerate(nodes):
            if i == j:
                continue
            # multiply by (u - other) / (node - other)
            scale = 1.0 / (node - other)
            shifted = [0.0, *coeffs]
            coeffs = [(a - other * b) * scale for a, b in zip(shifted, [*coeffs, 0.0])]
        result.append(coeffs)
    return result


def lagrange_values(nodes: Sequence[float], u: float) -> list[float]:
    """The value at ``u`` of each Lagrange basis polynomial through ``nodes``: the weights that evaluate the
    interpolant of values at ``nodes`` at ``u``."""
    return [sum(b * u**m for m, b in enumerate(basis)) for basis in _basis_polynomials(nodes)]


def exponential_weights(
    h: float, nodes: Sequence[float], alpha_t: float, sigma_t: float, data_prediction: bool
) -> list[float]:
    """The weight of each prediction in a step of length ``h > 0`` in ``lambda``, from ``lambda_s`` to
    ``lambda_t = lambda_s + h``.

    ``nodes`` are where the predictions were made, as ``(lambda_j - lambda_s) / h`` (the first is 0; past levels are
    negative, intermediate ones in ``(0, 1)``). The step is ``x_t = base x_s + sum_j w_j m_j`` with ``base`` from
    :func:`first_order_coefficients` and ``m_j`` the data (``data_prediction``) or noise predictions: the exact
    integral of the interpolating polynomial, ``w_j = alpha_t h sum_m b_jm m! phi_(m+1)(-h)`` for data and
    ``w_j = -sigma_t h sum_m b_jm m! phi_(m+1)(h)`` for noise, ``b_jm`` the coefficients of the ``j``-th Lagrange
    basis polynomial (``int_0^1 e^((1 - v) z) v^m dv = m! phi_(m+1)(z)``).
    """
    if not h > 0 or not math.isfinite(h):
        raise ValueError(f"a step needs a finite h > 0 in lambda, got {h}.")
    z = -h if data_prediction else h
    integrals = [math.factorial(m) * phi(m + 1, z) for m in range(len(nodes))]
    scale = alpha_t * h if data_prediction else -sigma_t * h
    return [scale * sum(b * i for b, i in zip(basis, integrals)) for basis in _basis_polynomials(nodes)]


def midpoint_weights(nodes: Sequence[float], first_order_weight: float) -> list[float]:
    """The weights of a second-order step in the papers' own form: the first-order weight applied to the
    prediction interpolated (linearly, through the two ``nodes`` in units of ``h``) at the step's midpoint in
    ``lambda``, ``u = 1/2``.

    With a past level at ``-r`` this is DPM-Solver++(2M)'s ``(1 + 1/(2r)) m_0 - 1/(2r) m_(-1)`` (Lu et al. 2022b,
    Algorithm 2); with an intermediate one at ``r = 1/2`` it is the prediction there alone, DPM-Solver-2 and
    DPM-Solver++(2S) (2022a, Algorithm 1; 2022b, Algorithm 1). Second-order accurate like :func:`exponential_weights`
    on two nodes, from which it differs by ``O(h^3)`` per step.
    """
    if len(nodes) != 2:
        raise ValueError(f"the midpoint form is a second-order step on 2 nodes, got {len(nodes)}.")
    return [first_order_weight * value for value in lagrange_values(nodes, 0.5)]


def first_order_coefficients(
    alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float, data_prediction: bool
) -> tuple[float, float]:
    """``(base, weight)`` of the first-order step ``x_t = base x_s + weight m_s`` (DPM-Solver-1, which is DDIM).

    Written without ``h`` so that it holds up to the clean data (``sigma_t = 0``, ``lambda_t = inf``), where it is
    ``x_t = alpha_t x_0``: data form ``x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) x_0``,
    noise form ``x_t = (alpha_t / alpha_s) x_s + (sigma_t - alpha_t sigma_s / alpha_s) eps`` (DPM-Solver-1, Lu et al.
    2022a, eq. 3.7, and its data form in 2022b, section 4.1; both are DDIM, Song et al. 2021, eq. 12 at ``sigma = 0``).
    """
    if data_prediction:
        return sigma_t / sigma_s, alpha_t - alpha_s * sigma_t / sigma_s
    return alpha_t / alpha_s, sigma_t - alpha_t * sigma_s / alpha_s


def multistep_orders(num_steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each of ``num_steps`` multistep steps: at most the number of predictions made so far (so the
    first steps rise 1, 2, 3: there is no history yet), and with ``lower_order_final`` on a run of fewer than
    :data:`LOWER_ORDER_FINAL_BELOW` steps, at most the number of steps left (the last step first order)."""
    orders = []
    for i in range(num_steps):
        k = min(order, i + 1)
        if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
            k = min(k, num_steps - i)
        orders.append(k)
    return orders


def singlestep_orders(num_calls: int, order: int, denoise_final: bool = False) -> list[int]:
    """The order of each singlestep step for ``num_calls`` model evaluations in all.

    Without a final denoising step: DPM-Solver-fast's split (Lu et al. 2022a, section 3.4), as many steps of
    ``order`` as fit and the calls left over in lower-order steps at the end; with order 3, ``K = n // 3 + 1`` steps
    ending in orders 2, 1 / 1 / 2 for ``n mod 3`` = 0 / 1 / 2. With ``denoise_final`` the last call is a
    first-order step to the clean data, which ends the run as DPM-Solver-fast's last first-order step does: the
    other calls go to steps of ``order``, the remainder to one lower-order step before it.
    """
    if num_calls < 1:
        return []
    if denoise_final:
        rest = num_calls - 1
        return [order] * (rest // order) + ([rest % order] if rest % order else []) + [1]
    if order == 3:
        steps = num_calls // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[num_calls % 3]
        return [3] * (steps - len(tail)) + tail
    if order == 2:
        return [2] * (num_calls // 2) + [1] * (num_calls % 2)
    return [1] * num_calls
