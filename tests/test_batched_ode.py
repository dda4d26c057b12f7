"""sdekit.batched_ode.solve: per-sample adaptive Runge-Kutta, checked on ODEs with closed-form solutions."""

from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

from sdekit.batched_ode import solve

RATES = torch.tensor([0.5, 3.0, 20.0], dtype=torch.float64)
Y0 = torch.tensor([[1.0, 2.0], [1.0, -1.0], [0.5, 0.5]], dtype=torch.float64)


def modulation(t: torch.Tensor) -> torch.Tensor:
    return 1 + 0.5 * torch.sin(3 * t)


def rhs(t: torch.Tensor, state: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sample i: dy/dt = -k_i (1 + sin(3t) / 2) y, rows at their own times."""
    return (-RATES[index, None] * modulation(t)[:, None] * state[0],)


def exact(t0: float, t1: float) -> torch.Tensor:
    integral = (t1 - t0) + (math.cos(3 * t0) - math.cos(3 * t1)) / 6
    return Y0 * torch.exp(-RATES[:, None] * integral)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
@pytest.mark.parametrize("span", [(0.0, 2.0), (2.0, 1.0)])
def test_matches_the_closed_form(method: str, span: tuple[float, float]) -> None:
    sol = solve(rhs, (Y0,), *span, rtol=1e-6, atol=1e-6, method=method)
    want = Y0 * torch.exp(-RATES[:, None] * ((span[1] - span[0]) + (math.cos(3 * span[0]) - math.cos(3 * span[1])) / 6))
    # Global error in the tolerances' own mixed form: the local 1e-6 accumulated over the steps (measured: up to
    # 3.5e-4 relative on the growing backward solve with adaptive_heun, 4e-7 absolute on the decaying one).
    err = (sol.state[0] - want).abs()
    assert (err <= 1e-3 * want.abs() + 1e-5).all(), err
    # Each sample had its own step sizes.
    assert len(set(sol.nfe.tolist())) == 3


@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_a_sample_alone_gets_the_same_result_as_in_a_batch(method: str) -> None:
    batch = solve(rhs, (Y0,), 0.0, 2.0, rtol=1e-6, atol=1e-6, method=method)
    for i in range(3):

        def alone(t, state, index, i=i):  # noqa: ANN001, ANN202
            return rhs(t, state, torch.full_like(index, i))

        one = solve(alone, (Y0[i : i + 1],), 0.0, 2.0, rtol=1e-6, atol=1e-6, method=method)
        assert torch.equal(one.state[0][0], batch.state[0][i])
        assert int(one.nfe[0]) == int(batch.nfe[i])
    # One call per stage for all running samples, not one per sample.
    assert batch.calls == int(batch.nfe.max())


def test_bosh3_takes_torchdiffeqs_steps() -> None:
    # The same tableau and controller as torchdiffeq's bosh3: the same evaluations and result, sample by sample.
    sol = solve(rhs, (Y0,), 0.0, 2.0, rtol=1e-6, atol=1e-6, method="bosh3")
    span = torch.tensor([0.0, 2.0], dtype=torch.float64)
    for i in range(3):
        calls = 0

        def f(t: torch.Tensor, y: torch.Tensor, i: int = i) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return -RATES[i] * modulation(t) * y

        ref = odeint(f, Y0[i : i + 1], span, rtol=1e-6, atol=1e-6, method="bosh3", options={"step_t": span[1:]})[-1]
        assert calls == int(sol.nfe[i])
        assert torch.allclose(sol.state[0][i], ref[0], rtol=0, atol=1e-12)


def test_tuple_state_and_nan_report() -> None:
    def two_parts(t, state, index):  # noqa: ANN001, ANN202
        (velocity,) = rhs(t, state[:1], index)
        return velocity, -(RATES[index] * modulation(t))  # d/dt log|y| for every sample

    sol = solve(two_parts, (Y0, torch.zeros(3, dtype=torch.float64)), 0.0, 1.0, rtol=1e-8, atol=1e-8)
    assert torch.allclose(sol.state[1], torch.log(exact(0.0, 1.0)[:, 0] / Y0[:, 0]), atol=1e-6)

    def breaks(t, state, index):  # noqa: ANN001, ANN202
        (velocity,) = rhs(t, state, index)
        return (torch.where((t > 0.7)[:, None] & (index == 1)[:, None], torch.nan, velocity),)

    with pytest.raises(FloatingPointError, match=r"sample 1 holds NaN or Inf at t=0\.(7|8|9)") as info:
        solve(breaks, (Y0,), 0.0, 2.0, rtol=1e-6, atol=1e-6, what="test")
    assert str(info.value).startswith("test: ")
