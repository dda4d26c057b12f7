"""The ``dpm-solver`` plugin (plugins/sdekit-dpm-solver) against diffusers' DPM-Solver schedulers, in the same run.

**The oracle** (default): the exact-score Gaussian-mixture oracle of ``benchmarks/quality_vs_nfe.py`` (16
dimensions, 8 components; exact noise prediction on the DDPM linear table's timesteps, exact score on VE noise
levels), 4000 samples from the same noise for every sampler, Frechet distance to the mixture's exact moments.
diffusers' ``DPMSolverMultistepScheduler`` (orders 2 and 3), ``DPMSolverSinglestepScheduler`` and
``DDIMScheduler`` run on VP from the same DDPM config; ``dpm-solver`` runs on VP, sub-VP and VE. ``/ 2M``: the row's
distance over diffusers' default ``DPMSolverMultistepScheduler`` (DPM-Solver++(2M)) at the same budget; ``/ peer``:
over the diffusers scheduler of the same method and order. Below 1, the plugin is better.

**The digits model** (``--digits MODEL_DIR``): the same comparison on a trained pipeline folder, e.g. the one
``training/demo.py`` writes (``outputs/demo/model``), in pixel Frechet distance to the 297 held-out digits.

    pip install -e plugins/sdekit-dpm-solver
    python benchmarks/dpm_solver.py [--samples 4000] [--budgets 10 20]
    python benchmarks/dpm_solver.py --digits outputs/demo/model [--seeds 2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from quality_vs_nfe import DDPM_CONFIG, oracles, run_loop, sde_setups

import sdekit
from sdekit.testing import benchmark_mixture, mixture_frechet_distance, mixture_frechet_floor

Make = Callable[[Any], Any]
"""Builds a scheduler from a pipeline's scheduler config."""

PEERS: dict[str, Make] = {
    "diffusers DPM-Solver++(2M)": lambda c: DPMSolverMultistepScheduler.from_config(c),
    "diffusers DPM-Solver++(3M)": lambda c: DPMSolverMultistepScheduler.from_config(c, solver_order=3),
    "diffusers DPM-Solver++(2S)": lambda c: DPMSolverSinglestepScheduler.from_config(c),
    "diffusers DPM-Solver++(3S)": lambda c: DPMSolverSinglestepScheduler.from_config(c, solver_order=3),
    "diffusers DDIM": lambda c: DDIMScheduler.from_config(c),
}
DEFAULT_PEER = "diffusers DPM-Solver++(2M)"

OURS: dict[str, tuple[dict[str, Any], str | None]] = {
    # label: (dpm-solver settings, the diffusers peer of the same method and order)
    "dpm-solver 1 (DDIM)": ({"solver_order": 1}, "diffusers DDIM"),
    "dpm-solver 2": ({"solver_order": 2}, "diffusers DPM-Solver++(2M)"),
    "dpm-solver 3": ({"solver_order": 3}, "diffusers DPM-Solver++(3M)"),
    "dpm-solver 2 noise": ({"solver_order": 2, "algorithm_type": "dpmsolver"}, "diffusers DPM-Solver++(2M)"),
    "dpm-solver 3 noise": ({"solver_order": 3, "algorithm_type": "dpmsolver"}, "diffusers DPM-Solver++(3M)"),
    "dpm-solver 2 taylor": ({"solver_order": 2, "solver_type": "taylor"}, "diffusers DPM-Solver++(2M)"),
    "dpm-solver 2 singlestep": ({"solver_order": 2, "method": "singlestep"}, "diffusers DPM-Solver++(2S)"),
    "dpm-solver 3 singlestep": ({"solver_order": 3, "method": "singlestep"}, "diffusers DPM-Solver++(3S)"),
    "dpm-solver 2 uniform": ({"solver_order": 2, "time_grid": "uniform"}, "diffusers DPM-Solver++(2M)"),
}


DIGITS_PEERS = (DEFAULT_PEER, "diffusers DPM-Solver++(3M)", "diffusers DDIM")
DIGITS_OURS = ("dpm-solver 2", "dpm-solver 3", "dpm-solver 2 noise", "dpm-solver 3 noise", "dpm-solver 3 singlestep")
"""The rows of the digits benchmark (each costs ``seeds x budgets`` sampling runs of the trained UNet)."""


def ours(settings: dict[str, Any], extra: dict[str, Any] | None = None) -> Make:
    """``dpm-solver`` from a pipeline's config with ``settings`` (and the SDE's ``extra``)."""
    return lambda c: sdekit.load_scheduler("dpm-solver", c, **(extra or {}), **settings)


def print_table(title: str, results: dict[str, list[float]], peers: dict[str, str | None], budgets: Sequence[int]):
    """A markdown table: the distance at each budget, then the ratios to diffusers' 2M and to the row's peer."""
    print(f"\n{title}\n")
    head = [f"{b} calls" for b in budgets] + [f"/ 2M @{b}" for b in budgets] + [f"/ peer @{b}" for b in budgets]
    print("| sampler | " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * len(head))
    default = results.get(DEFAULT_PEER)
    for label, values in results.items():
        cells = [f"{v:.4f}" if math.isfinite(v) else "n/a" for v in values]
        for reference in (default, results.get(peers.get(label) or "")):
            for v, r in zip(values, reference or [math.nan] * len(values)):
                cells.append(f"{v / r:.2f}" if reference and label not in PEERS and math.isfinite(v / r) else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


def oracle_benchmark(args: argparse.Namespace) -> None:
    """Every row on the mixture oracle: diffusers' on VP, the plugin on VP, sub-VP and VE."""
    mix = benchmark_mixture()
    models = oracles(mix)
    n = args.samples
    floor = mixture_frechet_floor(mix, n, n, generator=torch.Generator().manual_seed(0))
    print(f"Frechet distance of {n} samples to the exact moments of a 16-d, 8-component mixture; floor {floor:.4f}.")
    start = time.perf_counter()
    for kind in ("vp", "subvp", "ve"):
        rows: dict[str, Make] = dict(PEERS) if kind == "vp" else {}
        rows.update({label: ours(settings, sde_setups()[kind]) for label, (settings, _) in OURS.items()})
        results = {}
        for label, make in rows.items():
            values = []
            for budget in args.budgets:
                x, calls = run_loop(make(DDPM_CONFIG), models[kind], budget, n, seed=1)
                assert calls == budget, (label, calls, budget)
                values.append(mixture_frechet_distance(x, mix, n) if bool(torch.isfinite(x).all()) else math.nan)
            results[label] = values
        peers = {label: peer for label, (_, peer) in OURS.items()} if kind == "vp" else {}
        print_table(f"{kind}{' (DDPM table)' if kind != 've' else ''}", results, peers, args.budgets)
    print(f"\n({time.perf_counter() - start:.0f} s)")


def digits_benchmark(args: argparse.Namespace) -> None:
    """diffusers' DPM-Solver schedulers and the plugin on a trained pipeline folder, in pixel Frechet distance."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from sdekit.testing import frechet_distance  # noqa: PLC0415

    from evaluate import data_floor, embedded_images, sample  # noqa: PLC0415

    diffusers_logging.set_verbosity_error()  # the sdekit keys a diffusers scheduler does not take
    pipe = DiffusionPipeline.from_pretrained(args.digits)
    training, heldout = embedded_images(pipe)
    n = args.samples or heldout.shape[0]
    config = pipe.scheduler.config
    rows: dict[str, Make] = {label: PEERS[label] for label in DIGITS_PEERS}
    rows.update({label: ours(OURS[label][0]) for label in DIGITS_OURS})
    print(
        f"Pixel Frechet distance of {n} samples to the {heldout.shape[0]} held-out digits ({args.digits}), mean over "
        f"{args.seeds} seed(s); data floor {data_floor(training, heldout, 0):.2f}"
    )
    results = {}
    start = time.perf_counter()
    for label, make in rows.items():
        values = []
        for budget in args.budgets:
            distances = []
            for seed in range(args.seeds):
                with torch.no_grad():
                    x = sample(pipe.unet, make(config), n, budget, seed, label=f"{label} @{budget}")
                distances.append(frechet_distance(x.clamp(-1, 1), heldout))
            values.append(sum(distances) / len(distances))
        results[label] = values
        print(f"  {label}: {[round(v, 2) for v in values]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print_table("Digits model", results, {label: peer for label, (_, peer) in OURS.items()}, args.budgets)


def main() -> None:
    """Parse the flags and run the oracle benchmark, or the digits one with ``--digits``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="samples per run (oracle: 4000; digits: 297)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 20], help="model calls (default 10 20)")
    parser.add_argument("--digits", default=None, help="a trained pipeline folder: benchmark it instead")
    parser.add_argument("--seeds", type=int, default=1, help="digits: runs with different noise to average")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sdekit.get_sampler_class("dpm-solver")  # says how to install the plugin if it is missing
    if args.digits:
        digits_benchmark(args)
    else:
        args.samples = args.samples or 4000
        oracle_benchmark(args)


if __name__ == "__main__":
    main()
