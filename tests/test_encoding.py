"""sdekit.encoding: encode / decode through the probability-flow ODE, and slerp, on the exact mixture oracle.

The oracle's score is exact, so every reconstruction error here is the solver's: the adaptive solve's
(tolerances), or the fixed-step scheme's (first order in the step, DDIM paper Table 2).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

import sdekit
from sdekit.encoding import decode, encode, slerp
from sdekit.testing import GaussianMixture, MixtureScoreModel

CONFIGS = {
    # DDPMScheduler's config has clip_sample=True; encode/decode must not clip (latents at T exceed [-1, 1]).
    "vp-ddpm": lambda: DDPMScheduler().config,
    "vp": lambda: {"sde": "vp", "sde_params": {"beta_min": 0.1, "beta_max": 20}},
    "subvp": lambda: {"sde": "subvp", "sde_params": {"beta_min": 0.1, "beta_max": 20}},
    "ve": lambda: {"sde": "ve"},
}
STEPS = (10, 20, 50, 100, 1000)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    """Three components in 4-d with means and spread inside [-1, 1] (data range of an image model)."""
    return GaussianMixture(
        means=torch.tensor([[-0.5, -0.5, 0.3, 0.0], [0.5, 0.4, -0.3, 0.2], [0.0, 0.6, 0.5, -0.5]]),
        stds=torch.tensor([0.1, 0.15, 0.08]),
        weights=torch.tensor([0.4, 0.35, 0.25]),
    )


@pytest.fixture(scope="module")
def data(mixture: GaussianMixture) -> torch.Tensor:
    x = mixture.sample(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.abs().max() <= 1
    return x


def setup(mixture: GaussianMixture, name: str, prediction_type: str = "epsilon"):
    scheduler = sdekit.load_scheduler("pf-ode", CONFIGS[name](), prediction_type=prediction_type)
    model = MixtureScoreModel(mixture, scheduler.sde, prediction_type=prediction_type, time_input=scheduler.time_input)
    model = model.to(torch.float64)  # the oracle computes in its own dtype, like a real model
    return scheduler, model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "name, prediction_type",
    [
        ("vp-ddpm", "epsilon"),
        ("vp-ddpm", "v_prediction"),
        ("vp", "epsilon"),
        ("vp", "score"),
        ("subvp", "epsilon"),
        ("ve", "epsilon"),
        ("ve", "v_prediction"),
    ],
)
def test_adaptive_round_trip(mixture, data, name: str, prediction_type: str) -> None:
    scheduler, model = setup(mixture, name, prediction_type)
    z = encode(model, data, scheduler, rtol=1e-5, atol=1e-5)
    assert z.shape == data.shape and z.dtype == data.dtype
    # The latents follow the prior at T (std 1 for VP, sigma_max = 50 for VE), far outside the data range:
    # nothing was clipped to [-1, 1] although the DDPM configuration says clip_sample=True.
    assert z.abs().max() > 1.5
    x_back = decode(model, z, scheduler, rtol=1e-5, atol=1e-5)
    assert rel(x_back, data) < 1e-3  # measured: 2.7e-4 (DDPM table), 1.5e-4 (VP), 3.3e-4 (sub-VP), 2.3e-4 (VE)


def test_scheduler_as_config(mixture, data) -> None:
    scheduler, model = setup(mixture, "vp-ddpm")
    z = encode(model, data[:4], DDPMScheduler().config)
    assert torch.equal(z, encode(model, data[:4], scheduler))


def test_adaptive_latent_does_not_depend_on_the_batch(mixture, data) -> None:
    # Per-sample error control: a sample's steps, hence its latent, are its own whatever else is in the batch.
    scheduler, model = setup(mixture, "vp")
    together = encode(model, data[:8], scheduler)
    for i in (0, 5):
        assert torch.equal(encode(model, data[i : i + 1], scheduler)[0], together[i])
    assert torch.equal(decode(model, together[2:4], scheduler), decode(model, together, scheduler)[2:4])


@pytest.mark.parametrize("name", ["vp-ddpm", "ve"])
def test_fixed_steps_table(mixture, data, name: str) -> None:
    """The DDIM paper's Table 2: reconstruction error of decode(encode(x)) against the number of steps."""
    scheduler, model = setup(mixture, name)
    z_exact = encode(model, data, scheduler, rtol=1e-7, atol=1e-7)
    errors, mse, latent_errors = [], [], []
    for steps in STEPS:
        z = encode(model, data, scheduler, num_inference_steps=steps)
        x_back = decode(model, z, scheduler, num_inference_steps=steps)
        errors.append(rel(x_back, data))
        # The paper's unit: per-dimension MSE with data scaled to [0, 1] (here from [-1, 1]).
        mse.append(float(((x_back - data) / 2).pow(2).mean()))
        latent_errors.append(rel(z, z_exact))
    print(f"\n{name}: steps " + " ".join(f"{s:>9d}" for s in STEPS))
    print(f"{name}: rel err " + " ".join(f"{e:9.2e}" for e in errors))
    print(f"{name}: MSE01   " + " ".join(f"{e:9.2e}" for e in mse))
    print(f"{name}: z err   " + " ".join(f"{e:9.2e}" for e in latent_errors))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert all(a > b for a, b in zip(latent_errors, latent_errors[1:])), latent_errors
    assert errors[-1] < 1e-2  # measured 5.5e-3 (VP on the DDPM table), 2.5e-3 (VE)
    assert errors[-2] / errors[-1] > 5  # first order: 10x the steps, ~10x smaller error


def test_fixed_step_is_ddim_for_vp(mixture, data) -> None:
    # One step each way on a VP SDE: x_T = alpha_T x0_hat(eps) + sigma_T eps_hat(eps), and back.
    scheduler, model = setup(mixture, "vp", "epsilon")
    sde = scheduler.sde
    t0 = torch.full((data.shape[0],), sde.sampling_eps, dtype=torch.float64)
    t1 = torch.full_like(t0, sde.T)
    (a0, s0), (a1, s1) = sde.marginal_coeffs(t0[:1]), sde.marginal_coeffs(t1[:1])
    eps = model(data, sdekit.parametrization.to_model_time(sde, t0, scheduler.time_input)).sample
    x0 = (data - s0 * eps) / a0
    z = encode(model, data, scheduler, num_inference_steps=1)
    assert torch.allclose(z, a1 * x0 + s1 * eps, rtol=1e-12, atol=1e-12)
    eps_z = model(z, sdekit.parametrization.to_model_time(sde, t1, scheduler.time_input)).sample
    x0_z = (z - s1 * eps_z) / a1
    assert torch.allclose(decode(model, z, scheduler, num_inference_steps=1), a0 * x0_z + s0 * eps_z, atol=1e-12)


def test_float32(mixture, data) -> None:
    scheduler, model = setup(mixture, "vp")
    x = data[:4].float()
    z = encode(model, x, scheduler, rtol=1e-4, atol=1e-4)
    assert z.dtype == torch.float32
    assert rel(decode(model, z, scheduler, rtol=1e-4, atol=1e-4), x) < 1e-2


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_inputs(mixture, data) -> None:
    scheduler, model = setup(mixture, "vp")
    with pytest.raises(ValueError, match="NaN"):
        encode(model, torch.where(torch.arange(4) == 2, torch.nan, data[:2]), scheduler)
    with pytest.raises(ValueError, match="NaN"):
        decode(model, torch.full((2, 4), torch.inf, dtype=torch.float64), scheduler, num_inference_steps=5)
    with pytest.raises(ValueError, match="shape"):
        encode(model, data[0], scheduler)  # no batch dimension
    with pytest.raises(ValueError, match="num_inference_steps"):
        encode(model, data[:2], scheduler, num_inference_steps=0)
    with pytest.raises(ValueError, match="rtol"):
        decode(model, data[:2], scheduler, rtol=0)
    with pytest.raises(ValueError, match="method"):
        encode(model, data[:2], scheduler, method="euler")
    with pytest.raises(TypeError, match="scheduler"):
        encode(model, data[:2], object())


@pytest.mark.parametrize("steps", [None, 5])
def test_model_shape_mismatch(data, steps) -> None:
    scheduler = sdekit.load_scheduler("pf-ode", CONFIGS["vp"]())

    def doubled(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # learned-variance style: 2x the values
        return torch.cat([x, x], dim=1)

    with pytest.raises(ValueError, match="shape"):
        encode(doubled, data[:2], scheduler, num_inference_steps=steps)


@pytest.mark.parametrize("steps", [None, 5])
def test_nan_during_solve_names_the_time(mixture, data, steps) -> None:
    scheduler, model = setup(mixture, "vp")

    def breaks_late(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x, t).sample
        return torch.where(t.reshape(-1, 1) > 500, torch.nan, out)  # ddpm time units: t > 0.5

    with pytest.raises(FloatingPointError, match=r"t=0\.[5-9]|t=1"):
        encode(breaks_late, data[:2], scheduler, num_inference_steps=steps)


# --- slerp -------------------------------------------------------------------------------------------------------


def test_slerp_endpoints_and_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    z1 = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    assert torch.allclose(slerp(z0, z1, 0.0), z0, atol=1e-12)
    assert torch.allclose(slerp(z0, z1, 1.0), z1, atol=1e-12)
    # Equal norms: every point of the arc keeps the norm.
    u0 = z0 / z0.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    u1 = z1 / z1.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    for a in (0.25, 0.5, 0.9):
        assert torch.allclose(slerp(u0, u1, a).flatten(1).norm(dim=1), torch.ones(5, dtype=torch.float64))
    # Independent Gaussian latents: the slerp midpoint stays near the typical norm sqrt(D); lerp shrinks ~1/sqrt(2).
    d = 3 * 8 * 8
    mid = slerp(z0, z1, 0.5).flatten(1).norm(dim=1) / math.sqrt(d)
    lerp = (0.5 * (z0 + z1)).flatten(1).norm(dim=1) / math.sqrt(d)
    assert ((mid - 1).abs() < 0.15).all() and ((lerp - 1 / math.sqrt(2)).abs() < 0.1).all()
    # The midpoint makes equal angles with both ends.
    m = slerp(u0, u1, 0.5).flatten(1)
    assert torch.allclose((m * u0.flatten(1)).sum(1), (m * u1.flatten(1)).sum(1))


def test_slerp_per_sample_alpha_and_parallel() -> None:
    gen = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(3, 10, generator=gen), torch.randn(3, 10, generator=gen)
    alpha = torch.tensor([0.0, 0.5, 1.0])
    out = slerp(z0, z1, alpha)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0], z0[0]) and torch.allclose(out[2], z1[2])
    assert torch.allclose(out[1], slerp(z0[1:2], z1[1:2], 0.5)[0])
    # Parallel latents: linear interpolation.
    assert torch.allclose(slerp(z0, 2 * z0, 0.5), 1.5 * z0)


def test_slerp_bad_input() -> None:
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        slerp(z, torch.randn(2, 5), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        slerp(z, torch.full((2, 4), torch.nan), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        slerp(z, torch.randn(2, 4), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="antipodal"):
        slerp(z, -z, 0.5)
    with pytest.raises(ValueError, match="zero"):
        slerp(torch.zeros(2, 4), z, 0.5)
