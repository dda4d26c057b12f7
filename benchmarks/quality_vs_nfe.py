"""Sample quality against the number of model evaluations, on an exact-score oracle.

Every sampler sees the same model: the `sdekit.testing` Gaussian-mixture oracle, which returns the exact noise
prediction on DDPM timesteps (or the exact score on VE noise levels). Differences are then the samplers' own.
diffusers' DDPM, DDIM, DPM-Solver++, Euler and Heun schedulers run in the same process on the same oracle.

Prints one table: Frechet distance to held-out data (lower is better) at each NFE budget, with the
data-vs-data floor for reference.

    python benchmarks/quality_vs_nfe.py [--samples 2000] [--budgets 10 20 50 100 1000]
"""

from __future__ import annotations

import argparse
import inspect
import time
from collections.abc import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

import sdekit
from sdekit.testing import GaussianMixture, MixtureScoreModel, mixture_frechet_distance, mixture_frechet_floor

# The mixture reaches beyond [-1, 1], so no sampler may clip its x0 estimate (DDPMScheduler clips by default).
DDPM_CONFIG = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).config


def mixture() -> GaussianMixture:
    """Eight components in 16 dimensions (1 x 4 x 4 images) with unequal weights and scales."""
    gen = torch.Generator().manual_seed(123)
    means = torch.randn(8, 16, generator=gen) * 0.8
    stds = torch.rand(8, 16, generator=gen) * 0.25 + 0.05
    weights = torch.rand(8, generator=gen) + 0.5
    return GaussianMixture(means, stds=stds, weights=weights, event_shape=(1, 4, 4))


def run_loop(scheduler, model: MixtureScoreModel, steps: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """A pipeline's loop; returns the samples and the number of model calls."""
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n,) + model.mixture.event_shape, generator=gen, dtype=torch.float64) * scheduler.init_noise_sigma
    model.num_calls = 0
    extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        x = scheduler.step(model(x_in, t).sample, t, x, **extra).prev_sample
    return x, model.num_calls


def steps_for(nfe: int, evals_per_level: Callable[[int], int], max_steps: int) -> int:
    """The largest step count whose evaluation count does not exceed ``nfe``."""
    best = 1
    for steps in range(1, max_steps + 1):
        if evals_per_level(steps) <= nfe:
            best = steps
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20, 50, 100, 1000])
    args = parser.parse_args()
    mix = mixture()
    n = args.samples
    # One Frechet distance of all n samples against the mixture's exact moments: no second sample set's noise,
    # and a floor (the expected value for exact samples) far below the samplers' differences.
    floor = mixture_frechet_floor(mix, n, n, generator=torch.Generator().manual_seed(0))

    vp = sdekit.get_sde(
        "vp", **{k: DDPM_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    )
    eps_model = MixtureScoreModel(mix, vp, prediction_type="epsilon", time_input="ddpm")
    subvp_cfg = dict(sde="subvp")
    ve_cfg = dict(sde="ve", sigma_min=0.01, sigma_max=50.0, prediction_type="score", time_input="sigma")
    ve_model = MixtureScoreModel(mix, sdekit.get_sde("ve", sigma_min=0.01, sigma_max=50.0), "score", "sigma")
    subvp_model = MixtureScoreModel(
        mix,
        sdekit.get_sde(
            "subvp", **{k: DDPM_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
        ),
    )

    one = lambda s: s  # noqa: E731
    two = lambda s: 2 * s  # noqa: E731
    heun = lambda s: 2 * s - 1  # noqa: E731
    rows: list[tuple[str, Callable, MixtureScoreModel, Callable[[int], int]]] = [
        ("diffusers DDPM", lambda: DDPMScheduler.from_config(DDPM_CONFIG), eps_model, one),
        ("diffusers DDIM", lambda: DDIMScheduler.from_config(DDPM_CONFIG), eps_model, one),
        ("diffusers DPM-Solver++(2M)", lambda: DPMSolverMultistepScheduler.from_config(DDPM_CONFIG), eps_model, one),
        ("diffusers Euler", lambda: EulerDiscreteScheduler.from_config(DDPM_CONFIG), eps_model, one),
        ("diffusers Heun", lambda: HeunDiscreteScheduler.from_config(DDPM_CONFIG), eps_model, heun),
        ("ddim eta=0", lambda: sdekit.load_scheduler("ddim", DDPM_CONFIG), eps_model, one),
        ("ddim eta=1", lambda: sdekit.load_scheduler("ddim", DDPM_CONFIG, eta=1.0), eps_model, one),
        ("pf-ode euler vp", lambda: sdekit.load_scheduler("pf-ode", DDPM_CONFIG, solver="euler"), eps_model, one),
        ("pf-ode heun vp", lambda: sdekit.load_scheduler("pf-ode", DDPM_CONFIG, solver="heun"), eps_model, heun),
        ("pc rd+langevin vp", lambda: sdekit.load_scheduler("pc", DDPM_CONFIG), eps_model, two),
        ("pc rd only vp", lambda: sdekit.load_scheduler("pc", DDPM_CONFIG, corrector="none"), eps_model, one),
        (
            "pc em only vp",
            lambda: sdekit.load_scheduler("pc", DDPM_CONFIG, predictor="euler_maruyama", corrector="none"),
            eps_model,
            one,
        ),
        (
            "pf-ode heun subvp",
            lambda: sdekit.load_scheduler("pf-ode", DDPM_CONFIG, solver="heun", **subvp_cfg),
            subvp_model,
            heun,
        ),
        ("pc rd+langevin subvp", lambda: sdekit.load_scheduler("pc", DDPM_CONFIG, **subvp_cfg), subvp_model, two),
        (
            "pf-ode heun ve",
            lambda: sdekit.load_scheduler("pf-ode", DDPM_CONFIG, solver="heun", **ve_cfg),
            ve_model,
            heun,
        ),
        ("pc rd+langevin ve", lambda: sdekit.load_scheduler("pc", DDPM_CONFIG, **ve_cfg), ve_model, two),
        ("pc rd only ve", lambda: sdekit.load_scheduler("pc", DDPM_CONFIG, corrector="none", **ve_cfg), ve_model, one),
    ]
    print(
        f"Frechet distance of {n} samples to the exact moments of a 16-d, 8-component mixture; floor (exact samples) "
        f"{floor:.4f}"
    )
    header = f"{'sampler':<28}" + "".join(f"{'NFE ' + str(b):>12}" for b in args.budgets)
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for label, make, model, evals in rows:
        cells = []
        for budget in args.budgets:
            steps = steps_for(budget, evals, 1000)
            try:
                x, calls = run_loop(make(), model, steps, n, seed=1)
            except ValueError as err:  # e.g. a diffusers scheduler that cannot take this many steps
                cells.append(f"{'n/a':>12}")
                print(f"  ({label} at NFE {budget}: {err})")
                continue
            if not torch.isfinite(x).all():
                cells.append(f"{'NaN':>12}")
                continue
            fd = mixture_frechet_distance(x, mix, n)
            cells.append(f"{fd:>8.4f}{'' if calls == budget else f'@{calls}':>4}")
        print(f"{label:<28}" + "".join(cells))
    print(
        f"(value@k: the sampler used k evaluations, the most that fit the budget; {time.perf_counter() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
