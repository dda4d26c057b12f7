"""The embedded-default demo: sample a known 2-d mixture with every installed SDE and report the quality.

The score comes from :mod:`sdekit.testing`'s exact oracle, so the numbers measure the samplers alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .registry import get_sde, list_plugins
from .sampling import sample_probability_flow, sample_reverse_sde
from .testing import GaussianMixture, MixtureScoreModel, frechet_distance

__all__ = ["DemoRow", "default_sdes", "demo_mixture", "print_demo", "run_demo"]


@dataclass
class DemoRow:
    """One line of the demo's table."""

    sde: str
    sampler: str
    nfe: int
    seconds: float
    frechet: float


def demo_mixture() -> GaussianMixture:
    """The demo's data: three unequal 2-d Gaussians, one of them correlated."""
    covs = torch.tensor([[[0.09, 0.0], [0.0, 0.09]], [[0.25, 0.15], [0.15, 0.20]], [[0.04, 0.0], [0.0, 0.01]]])
    return GaussianMixture(
        means=torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]]), covs=covs, weights=torch.tensor([0.5, 0.3, 0.2])
    )


def default_sdes() -> list[str]:
    """The SDE plugins that ship with sdekit (the ``sdekit`` distribution's), in name order."""
    return [info.name for info in list_plugins(kind="sde") if info.status == "ok" and info.distribution == "sdekit"]


def run_demo(
    num_samples: int = 4000,
    sde_steps: int = 500,
    ode_steps: int = 100,
    seed: int = 0,
    sdes: Sequence[str] | None = None,
) -> tuple[float, list[DemoRow]]:
    """Sample the demo mixture with the reverse SDE and the probability-flow ODE under each SDE.

    Args:
        num_samples, sde_steps, ode_steps, seed: samples, Euler-Maruyama steps, Heun steps and the seed.
        sdes: SDE plugin names (any installed ones that build with their defaults); default those that ship with
            sdekit (:func:`default_sdes`).

    Returns the data-vs-data Frechet floor at ``num_samples`` and one :class:`DemoRow` per sampler.
    """
    mixture = demo_mixture()
    gen = torch.Generator().manual_seed(seed)
    data = mixture.sample(num_samples, gen, dtype=torch.float64)
    floor = frechet_distance(mixture.sample(num_samples, gen, dtype=torch.float64), data)
    rows = []
    for name in default_sdes() if sdes is None else sdes:
        sde = get_sde(name)
        oracle = MixtureScoreModel(mixture, sde)
        runs = {
            "reverse SDE, Euler-Maruyama": (
                sde_steps,
                lambda: sample_reverse_sde(
                    sde, oracle.score_fn, (num_samples, 2), sde_steps, generator=gen, dtype=torch.float64
                ),
            ),
            "probability-flow ODE, Heun": (
                2 * ode_steps - 1,
                lambda: sample_probability_flow(
                    sde, oracle.score_fn, (num_samples, 2), ode_steps, generator=gen, dtype=torch.float64
                ),
            ),
        }
        for label, (nfe, run) in runs.items():
            start = time.perf_counter()
            samples = run()
            rows.append(DemoRow(name, label, nfe, time.perf_counter() - start, frechet_distance(samples, data)))
    return floor, rows


def print_demo(floor: float, rows: list[DemoRow]) -> None:
    """Print the demo's table."""
    print(f"Frechet distance to the data (data-vs-data floor {floor:.5f}):")
    print(f"{'sde':<6} {'sampler':<30} {'NFE':>5} {'seconds':>8} {'Frechet':>9}")
    for row in rows:
        print(f"{row.sde:<6} {row.sampler:<30} {row.nfe:>5} {row.seconds:>8.2f} {row.frechet:>9.5f}")
