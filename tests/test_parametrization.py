"""Model-output and model-time conversions."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdekit.parametrization import (
    PREDICTION_TYPES,
    convert_model_output,
    from_model_time,
    model_output_to,
    split_model_output,
    to_model_time,
)


def _noisy(sde, gen: torch.Generator):
    x0 = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    alpha, sigma = sde.marginal_coeffs(t.reshape(6, 1, 1))
    return x0, eps, t, alpha, sigma, alpha * x0 + sigma * eps


def test_every_output_type_gives_back_x0_and_eps(any_sde) -> None:
    x0, eps, _, alpha, sigma, xt = _noisy(any_sde, torch.Generator().manual_seed(0))
    outputs = {
        "epsilon": eps,
        "sample": x0,
        "v_prediction": alpha * eps - sigma * x0,
        "score": -eps / sigma,
    }
    for kind, out in outputs.items():
        got_x0, got_eps = split_model_output(out, xt, alpha, sigma, kind)
        assert torch.allclose(got_x0, x0, atol=1e-9), kind
        assert torch.allclose(got_eps, eps, atol=1e-9), kind
        for target in PREDICTION_TYPES:
            assert torch.allclose(convert_model_output(out, xt, alpha, sigma, kind, target), outputs[target], atol=1e-9)


def test_round_trips(any_sde) -> None:
    x0, eps, t, alpha, sigma, xt = _noisy(any_sde, torch.Generator().manual_seed(1))
    for a, b in itertools.permutations(PREDICTION_TYPES, 2):
        there = model_output_to(any_sde, eps, xt, t, "epsilon", a)
        back = model_output_to(any_sde, model_output_to(any_sde, there, xt, t, a, b), xt, t, b, "epsilon")
        assert torch.allclose(back, eps, atol=1e-8), (a, b)


def test_time_round_trips(any_sde) -> None:
    t = torch.linspace(0.001, 1.0, 9, dtype=torch.float64)
    assert torch.allclose(to_model_time(any_sde, t, "ddpm"), t * (any_sde.N - 1))
    for convention in ("ddpm", "continuous"):
        assert torch.allclose(from_model_time(any_sde, to_model_time(any_sde, t, convention), convention), t)
    if any_sde.is_variance_exploding():  # VE maps noise levels back to times; the VP family does not
        sigma = to_model_time(any_sde, t, "sigma")
        assert torch.allclose(sigma, any_sde.sigma(t))
        assert torch.allclose(from_model_time(any_sde, sigma, "sigma"), t)
    else:
        with pytest.raises(ValueError, match="t_from_sigma"):
            from_model_time(any_sde, t, "sigma")


def test_ddpm_integer_timesteps_hit_the_table() -> None:
    from sdekit_sdes import VPSDE

    sde = VPSDE(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    steps = torch.tensor([0, 1, 500, 999])
    t = from_model_time(sde, steps, "ddpm")
    table = torch.cumprod(1 - sde.schedule.betas, 0)
    assert torch.allclose(sde.alpha_bar(t), table[steps].to(t.dtype), rtol=1e-6)


def test_bad_inputs() -> None:
    from sdekit_sdes import VPSDE

    sde = VPSDE()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"'epsilon'.*Did you mean 'epsilon'"):
        model_output_to(sde, x, x, 0.5, "epsilom", "sample")
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*shape \(2, 3\)"):
        model_output_to(sde, torch.zeros(2, 4), x, 0.5, "epsilon", "sample")
    with pytest.raises(ValueError, match="time_input"):
        to_model_time(sde, 0.5, "karras")


def test_half_precision_output_keeps_dtype() -> None:
    from sdekit_sdes import VESDE

    x = torch.randn(2, 3).half()
    out = model_output_to(VESDE(), x, x, torch.tensor([0.1, 0.9]), "score", "sample")
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
