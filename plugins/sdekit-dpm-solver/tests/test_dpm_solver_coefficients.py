"""The numbers behind DPM-Solver's steps: phi functions, the exponential-integrator weights, the order schedules."""

from __future__ import annotations

import math

import pytest
import torch

from sdekit_dpm_solver.coefficients import (
    LOWER_ORDER_FINAL_BELOW,
    SINGLESTEP_NODES,
    exponential_weights,
    first_order_coefficients,
    lagrange_values,
    midpoint_weights,
    multistep_orders,
    phi,
    singlestep_orders,
)


def _quadrature(f, a: float, b: float, n: int = 4001) -> float:
    """Simpson's rule in float64 on ``n`` (odd) points."""
    u = torch.linspace(a, b, n, dtype=torch.float64)
    w = torch.ones(n, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return float((w * f(u)).sum() * (b - a) / (3 * (n - 1)))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("z", [-6.0, -1.0, -0.5000001, -0.4999999, -1e-3, 0.0, 1e-6, 0.3, 0.5, 2.0])
def test_phi_is_its_integral(k: int, z: float) -> None:
    # phi_k(z) = int_0^1 e^((1 - v) z) v^(k-1) / (k-1)! dv, both sides of the series / closed-form switch at 0.5.
    expected = _quadrature(lambda v: torch.exp((1 - v) * z) * v ** (k - 1) / math.factorial(k - 1), 0.0, 1.0)
    assert phi(k, z) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_phi_rejects_k_below_1() -> None:
    with pytest.raises(ValueError, match="k >= 1"):
        phi(0, 1.0)


def _exact_step(prediction, lam_s: float, h: float, alpha_t: float, sigma_t: float, data: bool) -> float:
    """The integral part of the exact step for a prediction given as a function of lambda."""
    if data:  # alpha_t int_0^h e^(-(h - u)) x0(lam_s + u) du
        return alpha_t * _quadrature(lambda u: torch.exp(-(h - u)) * prediction(lam_s + u), 0.0, h)
    return -sigma_t * _quadrature(lambda u: torch.exp(h - u) * prediction(lam_s + u), 0.0, h)


NODE_SETS = {
    "multistep 2": [0.0, -1.0],
    "multistep 3, uneven": [0.0, -0.7, -2.1],
    "singlestep 2": list(SINGLESTEP_NODES[2]),
    "singlestep 3": list(SINGLESTEP_NODES[3]),
}


@pytest.mark.parametrize("data", [True, False], ids=["data", "noise"])
@pytest.mark.parametrize("nodes", list(NODE_SETS.values()), ids=list(NODE_SETS))
@pytest.mark.parametrize("h", [0.05, 0.8, 3.0])
def test_weights_integrate_polynomials_below_the_order_exactly(data: bool, nodes: list[float], h: float) -> None:
    lam_s, alpha_t, sigma_t = -0.4, 0.9, 0.3
    for degree in range(len(nodes)):

        def prediction(lam, degree=degree):
            return (1.5 - 0.5 * (lam - 0.2)) ** degree + 0.3

        weights = exponential_weights(h, nodes, alpha_t, sigma_t, data)
        values = [float(prediction(torch.tensor(lam_s + c * h, dtype=torch.float64))) for c in nodes]
        ours = sum(w * v for w, v in zip(weights, values))
        exact = _exact_step(prediction, lam_s, h, alpha_t, sigma_t, data)
        assert ours == pytest.approx(exact, rel=1e-9, abs=1e-12), (degree, ours, exact)


def test_midpoint_form_is_the_papers_second_order_steps() -> None:
    w = 0.37  # any first-order weight
    for r in (0.5, 1.0, 1.7):
        # DPM-Solver++(2M): D = (1 + 1/(2r)) m_0 - 1/(2r) m_(-1), r = h_(i-1) / h_i (a past level at -r).
        assert midpoint_weights([0.0, -r], w) == pytest.approx([w * (1 + 0.5 / r), -w * 0.5 / r])
    # DPM-Solver-2 / DPM-Solver++(2S) with r_1 = 1/2: the prediction at the midpoint alone.
    assert midpoint_weights([0.0, 0.5], w) == pytest.approx([0.0, w])
    with pytest.raises(ValueError, match="2 nodes"):
        midpoint_weights([0.0, -1.0, -2.0], w)


def test_lagrange_values_interpolate() -> None:
    nodes = [0.0, -0.8, 0.4]
    assert lagrange_values(nodes, -0.8) == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)
    values = [1.0, 2.0, -1.0]
    u = 0.25
    quadratic = [sum(w * v for w, v in zip(lagrange_values(nodes, x), values)) for x in nodes]
    assert quadratic == pytest.approx(values)
    assert sum(lagrange_values(nodes, u)) == pytest.approx(1.0)


def test_one_node_is_the_first_order_step() -> None:
    alpha_s, sigma_s, alpha_t, sigma_t = 0.6, 0.8, 0.8, 0.6
    h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
    for data in (True, False):
        base, weight = first_order_coefficients(alpha_s, sigma_s, alpha_t, sigma_t, data)
        assert base == pytest.approx(sigma_t / sigma_s if data else alpha_t / alpha_s)
        assert exponential_weights(h, [0.0], alpha_t, sigma_t, data) == pytest.approx([weight], rel=1e-12)


def test_first_order_step_onto_the_clean_data_is_the_x0_estimate() -> None:
    # x_s = alpha_s x0 + sigma_s eps; one step to (alpha, sigma) = (1, 0) gives x0 in both forms.
    alpha_s, sigma_s, x0, eps = 0.7, 0.5, 0.3, -1.2
    x_s = alpha_s * x0 + sigma_s * eps
    base, weight = first_order_coefficients(alpha_s, sigma_s, 1.0, 0.0, True)
    assert base * x_s + weight * x0 == pytest.approx(x0)
    base, weight = first_order_coefficients(alpha_s, sigma_s, 1.0, 0.0, False)
    assert base * x_s + weight * eps == pytest.approx(x0)


def test_weights_reject_a_step_that_does_not_advance() -> None:
    for h in (0.0, -0.1, math.inf):
        with pytest.raises(ValueError, match="finite h > 0"):
            exponential_weights(h, [0.0, -1.0], 1.0, 1.0, True)


def test_multistep_orders_rise_at_the_start_and_fall_at_the_end() -> None:
    assert multistep_orders(1, 3, True) == [1]
    assert multistep_orders(2, 3, True) == [1, 1]
    assert multistep_orders(5, 3, True) == [1, 2, 3, 2, 1]
    assert multistep_orders(5, 3, False) == [1, 2, 3, 3, 3]
    assert multistep_orders(6, 2, True) == [1, 2, 2, 2, 2, 1]
    long = LOWER_ORDER_FINAL_BELOW
    assert multistep_orders(long, 3, True) == [1, 2] + [3] * (long - 2)


@pytest.mark.parametrize("denoise_final", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_orders_spend_every_call(order: int, denoise_final: bool) -> None:
    for calls in range(1, 13):
        orders = singlestep_orders(calls, order, denoise_final)
        assert sum(orders) == calls and max(orders) <= order
        # All but the lower-order steps at the end have the full order (DPM-Solver-fast).
        full = [k for k in orders if k == order]
        assert orders[: len(full)] == full
        if denoise_final:
            assert orders[-1] == 1
    assert singlestep_orders(0, order, denoise_final) == []


def test_singlestep_orders_of_dpm_solver_fast() -> None:
    assert singlestep_orders(9, 3) == [3, 3, 2, 1]
    assert singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert singlestep_orders(11, 3) == [3, 3, 3, 2]
    assert singlestep_orders(2, 3) == [2]
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    # The denoising step is the final first-order step; the other calls in full-order steps.
    assert singlestep_orders(10, 3, True) == [3, 3, 3, 1]
    assert singlestep_orders(9, 3, True) == [3, 3, 2, 1]
    assert singlestep_orders(11, 3, True) == [3, 3, 3, 1, 1]
    assert singlestep_orders(2, 3, True) == [1, 1]
