"""Analytic-DPM on the exact-score oracle, in the form of the paper's Tables 1 and 2.

Bao, Li, Zhu & Zhang, "Analytic-DPM", ICLR 2022: Table 1 reports the variational bound (bits/dim) and Table 2
the sample quality (FID) of DDPM with ``beta_tilde`` and ``beta`` variances, Analytic-DDPM, DDIM and Analytic-DDIM
on even (ET) and optimal (OT) trajectories of K steps. Here the model is the ``sdekit.testing`` Gaussian-mixture
oracle (the exact noise prediction on the DDPM linear table, N = 1000), so differences are the samplers' own;
FID becomes the Frechet distance of the raw samples to held-out data (lower is better, with the data-vs-data
floor for reference), and the bound is computed on the data quantised to 8 bits in [-1, 1].

Two mixtures in [-1, 1]^2: overlapping components (the reverse kernels are close to Gaussian, as for images) and
narrow, well-separated ones (a 111-level step has a multimodal true kernel, which no Gaussian variance fixes).
Gamma is estimated once per mixture with ``estimator="error"``; see docs/samplers/analytic-dpm.md for why the
paper's ``norm`` estimator breaks the optimal trajectory in two dimensions (the last lines show it). The pixel rule
is off (``clip_pixel=None``): it is made for 8-bit images; its K = 10 effect is printed separately.

Also printed: the cost of estimating Gamma (model calls, seconds) and of the dynamic program for N = 1000.

    python benchmarks/analytic_dpm.py [--samples 4000] [--gamma-samples 4000] [--steps 10 25 50 100]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from sdekit.bound import nll_bound
from sdekit.testing import GaussianMixture, epsilon_oracle, frechet_distance
from sdekit_analytic_dpm import AnalyticDPMScheduler

METHODS = [
    ("DDPM, beta_tilde", 1.0, "beta_tilde"),
    ("DDPM, beta", 1.0, "beta"),
    ("Analytic-DDPM", 1.0, "analytic"),
    ("DDIM", 0.0, "beta_tilde"),
    ("Analytic-DDIM", 0.0, "analytic"),
]
TRAJECTORIES = {"even": "ET", "optimal": "OT"}


def mixtures() -> dict[str, GaussianMixture]:
    """The two data sets, both inside [-1, 1]^2 up to rare tails (clipped)."""
    weights = torch.tensor([0.5, 0.3, 0.2])
    return {
        "overlapping modes (std 0.25)": GaussianMixture(
            means=torch.tensor([[-0.3, -0.2], [0.3, 0.2], [0.0, 0.35]]), stds=torch.tensor([0.25] * 3), weights=weights
        ),
        "separated modes (std 0.05-0.12)": GaussianMixture(
            means=torch.tensor([[-0.5, -0.3], [0.45, 0.4], [0.0, 0.55]]),
            stds=torch.tensor([[0.08, 0.12], [0.1, 0.06], [0.05, 0.05]]),
            weights=weights,
        ),
    }


def data(mix: GaussianMixture, n: int, seed: int) -> torch.Tensor:
    return mix.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float64).clamp(-1, 1)


def estimate_gamma(mix: GaussianMixture, num_samples: int, estimator: str) -> tuple[list[float], int, float]:
    """Gamma at all 1000 levels; also the model calls and seconds it took."""
    scheduler = AnalyticDPMScheduler()
    model = epsilon_oracle(mix, scheduler.sde)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Monte Carlo values outside [0, 1] are clipped
        scheduler.estimate_gamma(
            model,
            data(mix, num_samples, 0),
            num_samples,
            batch_size=min(num_samples, 4000),
            generator=torch.Generator().manual_seed(1),
            estimator=estimator,
            show_progress=False,
        )
    return list(scheduler.config.gamma), model.num_calls, time.perf_counter() - start


def sample(mix: GaussianMixture, scheduler: AnalyticDPMScheduler, steps: int, n: int, seed: int) -> torch.Tensor:
    """DDPMPipeline's loop on the oracle."""
    model = epsilon_oracle(mix, scheduler.sde)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=gen).prev_sample
    return x


def print_table(title: str, rows: dict[str, list[str]], steps: list[int]) -> None:
    print(f"\n{title}\n")
    print("| trajectory | method | " + " | ".join(f"K = {k}" for k in steps) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " |")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")


def run(name: str, mix: GaussianMixture, args: argparse.Namespace) -> None:
    gamma, calls, seconds = estimate_gamma(mix, args.gamma_samples, "error")
    print(f"\n## {name}\n\nGamma: {calls} model calls ({args.gamma_samples} samples x 1000 levels), {seconds:.1f} s")
    reference = data(mix, 50_000, 9)
    # A Frechet distance between finite sample sets scatters widely: the floor is a mean over 10 data sets.
    floor = sum(frechet_distance(data(mix, args.samples, 100 + i), reference) for i in range(10)) / 10
    x0 = ((data(mix, args.samples, 4) + 1) * 127.5).round() / 127.5 - 1
    oracle = epsilon_oracle(mix, AnalyticDPMScheduler().sde)
    fd_rows: dict[str, list[str]] = {}
    nll_rows: dict[str, list[str]] = {}
    for trajectory, short in TRAJECTORIES.items():
        for method, eta, variance in METHODS:
            label = f"{short} | {method}"
            fd_rows[label], nll_rows[label] = [], []
            for steps in args.steps:
                scheduler = AnalyticDPMScheduler(
                    gamma=gamma, eta=eta, variance=variance, trajectory=trajectory, clip_pixel=None
                )
                x = sample(mix, scheduler, steps, args.samples, seed=5)
                fd_rows[label].append(f"{frechet_distance(x, reference):.2e}")
                if eta == 0.0:
                    nll_rows[label].append("inf")  # DDIM's inference kernel is deterministic: no finite bound
                    continue
                bound = nll_bound(oracle, scheduler, x0, generator=torch.Generator().manual_seed(7))
                nll_rows[label].append(f"{float(bound.mean()):.3f}")
    print_table(
        f"Frechet distance to held-out data (Table 2's form); data-vs-data floor (mean) {floor:.1e}",
        fd_rows,
        args.steps,
    )
    print_table("Variational bound, bits/dim on 8-bit data (Table 1's form)", nll_rows, args.steps)

    k = args.steps[0]
    pixel = []
    for method, eta, _ in METHODS[2::2]:
        scheduler = AnalyticDPMScheduler(gamma=gamma, eta=eta, clip_pixel=2.0)
        pixel.append(f"{method} {frechet_distance(sample(mix, scheduler, k, args.samples, 5), reference):.2e}")
    print(f"\nWith the pixel rule (clip_pixel=2), ET, K = {k}: " + ", ".join(pixel))
    norm_gamma, _, _ = estimate_gamma(mix, args.gamma_samples, "norm")
    scheduler = AnalyticDPMScheduler(gamma=norm_gamma, trajectory="optimal", clip_pixel=None)
    scheduler.set_timesteps(k)
    bound = float(nll_bound(oracle, scheduler, x0, generator=torch.Generator().manual_seed(7)).mean())
    print(
        f"OT from the paper's norm estimator ({args.gamma_samples} samples), Analytic-DDPM, K = {k}: levels "
        f"{scheduler.timesteps.tolist()}, bound {bound:.3f} bits/dim"
    )


def dynamic_program_time(gamma: list[float], steps: list[int]) -> None:
    print("\nDynamic program for N = 1000 (fresh scheduler: the step costs, then one O(K N^2) pass for all K' <= K):")
    for k in steps:
        scheduler = AnalyticDPMScheduler(gamma=gamma, trajectory="optimal")
        start = time.perf_counter()
        scheduler.set_timesteps(k)
        print(f"  K = {k}: {time.perf_counter() - start:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4000, help="samples per Frechet distance and bound")
    parser.add_argument("--gamma-samples", type=int, default=4000, help="data samples M for Gamma")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100], help="trajectory lengths K")
    args = parser.parse_args()
    # The oracle's tensors are small: intra-op threads only contend with other processes on a shared machine.
    torch.set_num_threads(1)
    start = time.perf_counter()
    sets = mixtures()
    for name, mix in sets.items():
        run(name, mix, args)
    gamma, _, _ = estimate_gamma(next(iter(sets.values())), args.gamma_samples, "error")
    dynamic_program_time(gamma, args.steps)
    print(f"\nTotal {time.perf_counter() - start:.0f} s; torch {torch.__version__}, 1 thread.")


if __name__ == "__main__":
    main()
