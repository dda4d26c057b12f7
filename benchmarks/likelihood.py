"""Likelihood through the probability-flow ODE: sdekit's ``likelihood`` against k-diffusion's ``log_likelihood``.

Both integrate the probability-flow ODE of the same exact-score oracle with dopri5 at the same tolerances and
return bits/dim; the script prints, per tolerance, each one's error against the exact value, its model
evaluations per sample and its wall time, and the ratios (ours / k-diffusion).

The oracle: a VE SDE (sigma from 0.01 to 50, score-SDE's CIFAR-10 setting, k-diffusion's native form), data
from a product of ``--dims`` one-dimensional two-component Gaussian mixtures (a ``2^dims``-component mixture in
``sdekit.testing``). Its score's Jacobian is diagonal, so the Rademacher Hutchinson estimate that k-diffusion
uses (and sdekit's default) equals the exact divergence: the errors printed are the solvers' alone. The script
checks that by running sdekit's exact trace as well.

The exact value is the oracle's closed-form ``log p_eps(x)`` plus the prior's mismatch ``log N(z; 0, 50^2) -
log p_T(z)`` at the exact latent ``z`` (from a solve at rtol 1e-10): both methods compute ``log N(z(x); 0, 50^2) +
log |det dz/dx|``, which is that sum.

k-diffusion stays out of sdekit's environment; install it in the benchmark one (see docs/benchmarks.md):

    .venv-bench/bin/pip install k-diffusion "setuptools<81"
    .venv-bench/bin/python benchmarks/likelihood.py [--dims 6] [--samples 64]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch

import sdekit
from sdekit.testing import GaussianMixture, MixtureScoreModel

TOLERANCES = (1e-3, 1e-4, 1e-5)


def product_mixture(dims: int) -> GaussianMixture:
    """``dims`` independent coordinates, each ``0.4 N(-0.6, 0.15^2) + 0.6 N(0.5, 0.3^2)``."""
    means_1d, stds_1d, weights_1d = (-0.6, 0.5), (0.15, 0.3), (0.4, 0.6)
    picks = list(itertools.product(range(2), repeat=dims))
    means = torch.tensor([[means_1d[i] for i in pick] for pick in picks], dtype=torch.float64)
    stds = torch.tensor([[stds_1d[i] for i in pick] for pick in picks], dtype=torch.float64)
    weights = torch.tensor([math.prod(weights_1d[i] for i in pick) for pick in picks], dtype=torch.float64)
    return GaussianMixture(means, stds=stds, weights=weights)


def bits(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per sample to bits per dimension."""
    return nats / (dims * math.log(2))


def timed(fn):  # noqa: ANN001, ANN201
    """``(result, seconds)`` of ``fn()``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=6, help="data dimensions (the mixture has 2^dims components)")
    parser.add_argument("--samples", type=int, default=64, help="data points, one batch (default 64)")
    args = parser.parse_args()
    try:
        from k_diffusion.sampling import log_likelihood as kd_log_likelihood
    except ImportError as error:
        print(
            f"likelihood.py: k-diffusion is not importable ({error}); install it in the benchmark environment "
            "(see the module docstring).",
            file=sys.stderr,
        )
        return 2

    torch.set_grad_enabled(False)
    mixture = product_mixture(args.dims)
    scheduler = sdekit.load_scheduler("pf-ode", {"sde": "ve", "sde_params": {"sigma_min": 0.01, "sigma_max": 50.0}})
    sde = scheduler.sde
    # sdekit's model: the exact epsilon; k-diffusion's: the exact denoiser D(x, sigma), the same oracle read as
    # prediction_type "sample" with the model time in sigma.
    ours_model = MixtureScoreModel(mixture, sde, prediction_type="epsilon", time_input=scheduler.time_input)
    ours_model = ours_model.to(torch.float64)
    denoiser = MixtureScoreModel(mixture, sde, prediction_type="sample", time_input="sigma").to(torch.float64)
    x = mixture.sample(args.samples, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    eps_t = torch.tensor(sde.sampling_eps, dtype=torch.float64)
    sigma_min, sigma_max = float(sde.sigma(eps_t)), float(sde.sigma(torch.tensor(sde.T, dtype=torch.float64)))
    reference = sdekit.likelihood(ours_model, x, scheduler, trace="exact", rtol=1e-10, atol=1e-10)
    exact = -bits(
        mixture.log_prob(x, 1.0, sigma_min)
        + sde.prior_logp(reference.z)
        - mixture.log_prob(reference.z, 1.0, sigma_max),
        args.dims,
    )
    exact_trace = sdekit.likelihood(ours_model, x[:8], scheduler, trace="exact", rtol=1e-5, atol=1e-5)
    hutch = sdekit.likelihood(
        ours_model, x[:8], scheduler, rtol=1e-5, atol=1e-5, generator=torch.Generator().manual_seed(1)
    )
    gap = float((hutch.bpd - exact_trace.bpd).abs().max())
    print(
        f"oracle: {args.dims}-d product of 1-d mixtures ({mixture.num_components} components), VE sigma "
        f"{sigma_min:.6g}..{sigma_max:g}, {args.samples} samples in one batch, float64, dopri5, atol = rtol"
    )
    print(f"check: Hutchinson (Rademacher) vs exact trace on this oracle, max |difference| = {gap:.1e} bits/dim")
    print(
        "error = mean |bits/dim - exact| over the samples; NFE = model evaluations per sample (k-diffusion "
        "evaluates every sample at each call)"
    )
    print()
    header = (
        f"{'rtol':>6} | {'ours err':>9} {'ours NFE':>9} {'ours s':>7} | {'k-d err':>9} {'k-d NFE':>8} {'k-d s':>7} |"
    )
    header += f" {'err ratio':>9} {'NFE ratio':>9} {'time ratio':>10} | {'ours @3x rtol: err':>18} {'NFE':>6}"
    print(header)
    print("-" * len(header))
    for tol in TOLERANCES:
        ours, ours_s = timed(
            lambda tol=tol: sdekit.likelihood(
                ours_model, x, scheduler, rtol=tol, atol=tol, generator=torch.Generator().manual_seed(1)
            )
        )
        ours_err = float((ours.bpd - exact).abs().mean())
        ours_nfe = float(ours.nfe.double().mean())
        torch.manual_seed(1)  # k-diffusion draws its probe from the global generator
        (kd_ll, info), kd_s = timed(
            lambda tol=tol: kd_log_likelihood(denoiser_fn(denoiser), x, sigma_min, sigma_max, atol=tol, rtol=tol)
        )
        kd_err = float((bits(-kd_ll, args.dims) - exact).abs().mean())
        kd_nfe = float(info["fevals"])
        # sdekit at a 3x looser tolerance: its error against k-diffusion's at this one, for fewer evaluations.
        loose = sdekit.likelihood(
            ours_model, x, scheduler, rtol=3 * tol, atol=3 * tol, generator=torch.Generator().manual_seed(1)
        )
        loose_err, loose_nfe = float((loose.bpd - exact).abs().mean()), float(loose.nfe.double().mean())
        print(
            f"{tol:>6.0e} | {ours_err:>9.2e} {ours_nfe:>9.1f} {ours_s:>7.2f} | {kd_err:>9.2e} {kd_nfe:>8.0f} "
            f"{kd_s:>7.2f} | {ours_err / kd_err:>9.2f} {ours_nfe / kd_nfe:>9.2f} {ours_s / kd_s:>10.2f} | "
            f"{loose_err:>18.2e} {loose_nfe:>6.1f}"
        )
    return 0


def denoiser_fn(model: MixtureScoreModel):  # noqa: ANN201
    """k-diffusion's model interface ``D(x, sigma)`` (a tensor) over the oracle's ``.sample`` output."""
    return lambda x, sigma: model(x, sigma).sample


if __name__ == "__main__":
    sys.exit(main())
