"""Sample quality against the number of model calls: sdekit's pc and pf-ode against diffusers' schedulers.

**The oracle** (default). Every sampler sees the same model: the `sdekit.testing` Gaussian-mixture oracle, which
returns the exact noise prediction on DDPM timesteps (or the exact score on VE noise levels), so differences are
the samplers' own. diffusers' DDPM, DDIM, DPM-Solver++(2M), Euler and Heun schedulers run in the same process on
the same oracle. Prints

1. the grid study: every pc configuration (each predictor, with and without the Langevin corrector) and every
   pf-ode solver on each time grid (uniform, logsnr, karras), VP on the DDPM table, at each budget: the numbers
   the samplers' default grids are chosen from;
2. the main table on each sampler's default grid, for VP, sub-VP and VE, with diffusers' peers, and the ratio of
   each row to its peer at the same budget (pc -> DDPMScheduler, pf-ode heun -> HeunDiscreteScheduler, ab2 ->
   DPMSolverMultistepScheduler, euler -> EulerDiscreteScheduler; below 1 is better).

``--snr-study`` prints instead the study pc's default ``snr`` is chosen from: each predictor on VP, sub-VP and VE
with the Langevin corrector at several ``snr``, as a ratio to the same predictor alone at the same model calls.
``--seeds S`` averages every number over S runs with different noise (seeds 1 to S; default 1).

Frechet distance of all samples to the mixture's exact moments (lower is better), with the floor (its expected
value for exact samples).

**The digits model** (``--digits MODEL_DIR``): the same comparison on a trained pipeline folder, e.g. the one
``training/demo.py`` writes (``outputs/demo/model``), in pixel Frechet distance to the 297 held-out digits.

    python benchmarks/quality_vs_nfe.py [--samples 4000] [--budgets 10 20 50 100] [--no-grid-study] [--seeds S]
    python benchmarks/quality_vs_nfe.py --snr-study [--only "pc ancestral"] [--seeds S]
    python benchmarks/quality_vs_nfe.py --digits outputs/demo/model [--budgets 10 20 50]
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

import sdekit
from sdekit.grids import TIME_GRIDS
from sdekit.testing import (
    GaussianMixture,
    MixtureScoreModel,
    benchmark_mixture,
    mixture_frechet_distance,
    mixture_frechet_floor,
)

# The mixture reaches beyond [-1, 1], so no sampler may clip its x0 estimate (DDPMScheduler clips by default).
DDPM_CONFIG = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False).config
TABLE = {k: DDPM_CONFIG[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}

PEERS: dict[str, tuple[type, Callable[[int], int]]] = {
    "diffusers DDPM": (DDPMScheduler, lambda s: s),
    "diffusers DDIM": (DDIMScheduler, lambda s: s),
    "diffusers DPM-Solver++(2M)": (DPMSolverMultistepScheduler, lambda s: s),
    "diffusers Euler": (EulerDiscreteScheduler, lambda s: s),
    "diffusers Heun": (HeunDiscreteScheduler, lambda s: 2 * s - 1),
}
PC_CONFIGS = {
    "rd": {"predictor": "reverse_diffusion"},
    "em": {"predictor": "euler_maruyama"},
    "ancestral": {"predictor": "ancestral"},
}
SOLVER_PEERS = {"heun": "diffusers Heun", "ab2": "diffusers DPM-Solver++(2M)", "euler": "diffusers Euler"}


@dataclass(frozen=True)
class Row:
    """One line of a table: how to build the scheduler, how many model calls ``n`` levels cost, and its peer."""

    label: str
    make: Callable[[], Any]
    evals: Callable[[int], int]
    kind: str = "vp"
    peer: str | None = None


def sde_setups() -> dict[str, dict[str, Any]]:
    """The scheduler configuration of each SDE the oracle serves: VP and sub-VP on the DDPM table (epsilon on DDPM
    timesteps), VE (score on sigma)."""
    return {
        "vp": {},
        "subvp": {"sde": "subvp"},
        "ve": {"sde": "ve", "sigma_min": 0.01, "sigma_max": 50.0, "prediction_type": "score", "time_input": "sigma"},
    }


def oracles(mix: GaussianMixture) -> dict[str, MixtureScoreModel]:
    """The oracle model of each SDE in :func:`sde_setups`."""
    return {
        "vp": MixtureScoreModel(mix, sdekit.get_sde("vp", **TABLE), "epsilon", "ddpm"),
        "subvp": MixtureScoreModel(mix, sdekit.get_sde("subvp", **TABLE), "epsilon", "ddpm"),
        "ve": MixtureScoreModel(mix, sdekit.get_sde("ve", sigma_min=0.01, sigma_max=50.0), "score", "sigma"),
    }


def pc_rows(kind: str, grid: str | None, langevin: bool, config: Any = DDPM_CONFIG) -> list[Row]:
    """Every pc predictor on SDE ``kind``, with or without Langevin, on ``grid`` (``None``: pc's default, named
    in the label), built from ``config``."""
    rows = []
    for name, options in PC_CONFIGS.items():
        corrector = "langevin" if langevin else "none"
        settings = {**sde_setups()[kind], **options, "corrector": corrector}
        if grid is not None:
            settings["time_grid"] = grid
        shown = f" {grid}" if grid else f" ({sdekit.load_scheduler('pc', config, **settings).default_time_grid()})"
        label = f"pc {name}{'+langevin' if langevin else ''} {kind}{shown}"
        evals = (lambda s: 2 * s) if langevin else (lambda s: s)
        rows.append(Row(label, _loader("pc", settings, config), evals, kind, "diffusers DDPM"))
    return rows


def pf_ode_rows(
    kind: str, grid: str | None, solvers: Sequence[str] = ("heun", "ab2", "euler"), config: Any = DDPM_CONFIG
) -> list[Row]:
    """pf-ode's solvers on SDE ``kind``, on ``grid`` (``None``: the solver's default, named in the label)."""
    rows = []
    for solver in solvers:
        settings = {**sde_setups()[kind], "solver": solver}
        if grid is not None:
            settings["time_grid"] = grid
        evals = (lambda s: 2 * s - 1) if solver == "heun" else (lambda s: s)
        shown = grid or sdekit.load_scheduler("pf-ode", config, **settings).default_time_grid()
        label = f"pf-ode {solver} {kind}" + (f" {grid}" if grid else f" ({shown})")
        rows.append(Row(label, _loader("pf-ode", settings, config), evals, kind, SOLVER_PEERS[solver]))
    return rows


def other_grid(kind: str, config: Any = DDPM_CONFIG) -> str:
    """The grid pf-ode Heun does not take by default on SDE ``kind``: ``uniform`` where its default is ``karras``,
    else ``karras`` (the main table's comparison row)."""
    default = sdekit.load_scheduler("pf-ode", config, **sde_setups()[kind]).default_time_grid()
    return "uniform" if default == "karras" else "karras"


class PreviousLayout:
    """pf-ode as it was before the time grids: ``n`` levels evenly spaced in ``t`` from ``T`` down to and including
    ``t = 0`` (the table's entry 0), Heun between them, then one more evaluation there for the x_0 estimate. The
    current sampler does exactly that when handed those levels as ``timesteps``."""

    def __init__(self, **settings: Any) -> None:
        self.inner = sdekit.load_scheduler("pf-ode", DDPM_CONFIG, **settings)

    def set_timesteps(self, steps: int) -> None:
        """The previous ``set_timesteps(steps)``."""
        last = DDPM_CONFIG["num_train_timesteps"] - 1
        self.inner.set_timesteps(timesteps=torch.linspace(last, 0, steps, dtype=torch.float64).tolist())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _loader(name: str, settings: dict[str, Any], config: Any = DDPM_CONFIG) -> Callable[[], Any]:
    return lambda: sdekit.load_scheduler(name, config, **settings)


def dpm_solver_rows(kind: str, config: Any = DDPM_CONFIG) -> list[Row]:
    """The third-party ``dpm-solver`` plugin (plugins/sdekit-dpm-solver), orders 2 and 3 on its default log-SNR
    grid, one call per level; none if it is not installed (``benchmarks/dpm_solver.py`` has its full study)."""
    names = {info.name for info in sdekit.list_plugins(kind="sampler") if info.status == "ok"}
    if "dpm-solver" not in names:
        return []
    rows = []
    for order in (2, 3):
        settings = {**sde_setups()[kind], "solver_order": order}
        label = f"dpm-solver order {order} {kind} (logsnr)"
        rows.append(
            Row(label, _loader("dpm-solver", settings, config), lambda s: s, kind, "diffusers DPM-Solver++(2M)")
        )
    return rows


def peer_rows() -> list[Row]:
    """diffusers' schedulers, built from the same DDPM config."""
    return [Row(label, (lambda cls=cls: cls.from_config(DDPM_CONFIG)), evals) for label, (cls, evals) in PEERS.items()]


def run_loop(scheduler: Any, model: MixtureScoreModel, steps: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
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


def steps_for(nfe: int, evals_per_level: Callable[[int], int], max_steps: int = 1000) -> int:
    """The largest step count whose evaluation count does not exceed ``nfe``."""
    return max((s for s in range(1, max_steps + 1) if evals_per_level(s) <= nfe), default=1)


def measure(
    rows: Sequence[Row], models: dict[str, MixtureScoreModel], mix: GaussianMixture, budgets, n, seeds: int = 1
):
    """``{label: [(frechet, calls) per budget]}``, the Frechet distance averaged over the runs seeded 1 to
    ``seeds``; ``(nan, 0)`` where a sampler cannot run or returns NaN."""
    results: dict[str, list[tuple[float, int]]] = {}
    for row in rows:
        cells = []
        for budget in budgets:
            steps = steps_for(budget, row.evals)
            distances = []
            try:
                for seed in range(1, seeds + 1):
                    x, calls = run_loop(row.make(), models[row.kind], steps, n, seed=seed)
                    distances.append(mixture_frechet_distance(x, mix, n) if torch.isfinite(x).all() else math.nan)
            except ValueError as err:  # e.g. a diffusers scheduler that cannot take this many steps
                print(f"  ({row.label} at {budget} calls: {err})")
                cells.append((math.nan, 0))
                continue
            cells.append((sum(distances) / len(distances), calls))
        results[row.label] = cells
    return results


SNR_STUDY = (0.08, 0.16, 0.3, 0.5)
"""The corrector ``snr`` values of ``--snr-study``."""


def snr_rows(kind: str, config: Any = DDPM_CONFIG) -> list[Row]:
    """Each pc predictor on SDE ``kind``, alone and with Langevin at each of :data:`SNR_STUDY`; a corrector row's
    peer is its predictor alone."""
    rows = []
    for name, options in PC_CONFIGS.items():
        alone = f"pc {name} {kind}"
        settings = {**sde_setups()[kind], **options}
        rows.append(Row(alone, _loader("pc", {**settings, "corrector": "none"}, config), lambda s: s, kind))
        for snr in SNR_STUDY:
            rows.append(
                Row(
                    f"pc {name}+langevin {kind} snr {snr}",
                    _loader("pc", {**settings, "corrector": "langevin", "snr": snr}, config),
                    lambda s: 2 * s,
                    kind,
                    alone,
                )
            )
    return rows


def snr_study(args: argparse.Namespace) -> None:
    """PC with Langevin at several ``snr``, against the same predictor alone, on VP, sub-VP and VE."""
    torch.set_num_threads(args.threads)
    mix = benchmark_mixture()
    models = oracles(mix)
    rows = [row for kind in ("vp", "subvp", "ve") for row in snr_rows(kind) if _selected(row, args.only)]
    print(
        f"Frechet distance of {args.samples} samples (mean of {args.seeds} seeds) to the mixture's exact moments; "
        "'/ peer': each corrector row over its predictor alone at the same model calls."
    )
    start = time.perf_counter()
    results = measure(rows, models, mix, args.budgets, args.samples, args.seeds)
    print_table("snr study (rows: predictor, SDE, corrector snr)", rows, results, args.budgets, True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


def _selected(row: Row, only: Sequence[str] | None) -> bool:
    """Whether ``--only`` keeps ``row``: diffusers' peers always, sdekit's rows when their label contains one of
    the given strings."""
    return not only or row.label.startswith("diffusers") or any(part in row.label for part in only)


def cell(value: float, calls: int, budget: int) -> str:
    """A table cell: the value, with ``@k`` when the sampler used ``k`` calls instead of the budget."""
    text = "n/a" if math.isnan(value) else f"{value:.4f}"
    return text if calls in (0, budget) else f"{text} @{calls}"


def print_table(title: str, rows: Sequence[Row], results, budgets, with_ratio: bool) -> None:
    """A markdown table of Frechet distances, with each row's ratio to its peer's when ``with_ratio``."""
    print(f"\n{title}\n")
    head = [f"{b} calls" for b in budgets]
    if with_ratio:
        head += [f"/ peer @{b}" for b in budgets]
    print("| sampler | " + " | ".join(head) + " |")
    print("| --- |" + " ---: |" * len(head))
    for row in rows:
        cells = [cell(fd, calls, b) for (fd, calls), b in zip(results[row.label], budgets)]
        if with_ratio:
            peer = results.get(row.peer) if row.peer else None
            for (fd, _), budget_index in zip(results[row.label], range(len(budgets))):
                ratio = fd / peer[budget_index][0] if peer else math.nan
                cells.append("" if math.isnan(ratio) else f"{ratio:.2f}")
        print(f"| {row.label} | " + " | ".join(cells) + " |")


def oracle_benchmark(args: argparse.Namespace) -> None:
    """The grid study and the main table on the mixture oracle."""
    torch.set_num_threads(args.threads)
    mix = benchmark_mixture()  # eight components in 16 dimensions (1 x 4 x 4 images)
    n = args.samples
    budgets = args.budgets
    # One Frechet distance of all n samples against the mixture's exact moments: no second sample set's noise,
    # and a floor (the expected value for exact samples) far below the samplers' differences.
    floor = mixture_frechet_floor(mix, n, n, generator=torch.Generator().manual_seed(0))
    models = oracles(mix)
    print(
        f"Frechet distance of {n} samples (mean of {args.seeds} seeds) to the exact moments of a 16-d, 8-component "
        f"mixture; floor (exact samples) {floor:.4f}. 'x @k': the sampler used k model calls, the most that fit "
        "the budget."
    )
    start = time.perf_counter()
    peers = peer_rows()
    results = measure(peers, models, mix, budgets, n, args.seeds)

    def keep(rows: list[Row]) -> list[Row]:
        return [row for row in rows if _selected(row, args.only)]

    if args.grid_study:
        study = [
            row
            for grid in TIME_GRIDS
            for row in [*pc_rows("vp", grid, False), *pc_rows("vp", grid, True), *pf_ode_rows("vp", grid)]
        ]
        study = keep(sorted(study, key=lambda row: row.label.rsplit(" ", 1)[0]))
        results.update(measure(study, models, mix, budgets, n, args.seeds))
        print_table("Grid study, VP on the DDPM table (rows: sampler, SDE, time_grid)", peers, results, budgets, False)
        print_table("", study, results, budgets, True)
    main_rows = [
        row
        for kind in ("vp", "subvp", "ve")
        for row in [
            *pc_rows(kind, None, False),
            *pc_rows(kind, None, True),
            *pf_ode_rows(kind, None),
            *pf_ode_rows(kind, other_grid(kind), ("heun",)),
            *dpm_solver_rows(kind),
        ]
    ]
    # pf-ode Heun as it was, on VP and sub-VP (on VE its t = 0 level has sigma = 0, which pf-ode refuses).
    for kind, before in (("vp", "pc rd subvp"), ("subvp", "pc rd ve")):
        previous = Row(
            f"pf-ode heun {kind}, previous layout",
            lambda settings=sde_setups()[kind]: PreviousLayout(**settings),
            lambda s: 2 * s - 1,
            kind,
            "diffusers Heun",
        )
        main_rows.insert(main_rows.index(next(r for r in main_rows if r.label.startswith(before))), previous)
    main_rows = keep(main_rows)
    results.update(measure(main_rows, models, mix, budgets, n, args.seeds))
    print_table("Main table: each sampler on its default time_grid", peers, results, budgets, False)
    print_table("", main_rows, results, budgets, True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


def digits_benchmark(args: argparse.Namespace) -> None:
    """The main comparison on a trained pipeline folder, in pixel Frechet distance to the held-out digits."""
    from diffusers import DiffusionPipeline

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from sdekit.testing import frechet_distance  # noqa: PLC0415

    from evaluate import data_floor, embedded_images, sample  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    pipe = DiffusionPipeline.from_pretrained(args.digits)
    training, heldout = embedded_images(pipe)
    n = args.samples if args.samples_given else heldout.shape[0]
    config = pipe.scheduler.config
    peers = [
        Row(label, (lambda cls=cls: cls.from_config(config)), evals)
        for label, (cls, evals) in PEERS.items()
        if label in ("diffusers DDPM", "diffusers DPM-Solver++(2M)", "diffusers Heun")
    ]
    main_rows = [
        *pc_rows("vp", None, False, config),
        *pc_rows("vp", None, True, config),
        *pf_ode_rows("vp", None, ("heun", "ab2"), config),
        *pf_ode_rows("vp", "uniform", ("heun",), config),
    ]
    study = []
    if args.grid_study:
        study = [
            row
            for grid in TIME_GRIDS
            for row in [
                *pc_rows("vp", grid, False, config),
                *pc_rows("vp", grid, True, config),
                *pf_ode_rows("vp", grid, ("heun", "ab2"), config),
            ]
        ]
        study.sort(key=lambda row: row.label.rsplit(" ", 1)[0])
    unique = {row.label: row for row in [*peers, *main_rows, *study]}  # heun uniform is in both tables
    rows = [row for row in unique.values() if _selected(row, args.only)]
    floor = data_floor(training, heldout, args.seed)
    print(
        f"Pixel Frechet distance of {n} samples to the {heldout.shape[0]} held-out digits ({args.digits}); data "
        f"floor {floor:.2f}"
    )
    results: dict[str, list[tuple[float, int]]] = {}
    start = time.perf_counter()
    for row in rows:
        cells = []
        for budget in args.budgets:
            steps = steps_for(budget, row.evals)
            scheduler = row.make()
            scheduler.set_timesteps(steps)
            calls = len(scheduler.timesteps)
            with torch.no_grad():
                x = sample(pipe.unet, scheduler, n, steps, args.seed, label=f"{row.label} @{budget}")
            cells.append((frechet_distance(x.clamp(-1, 1), heldout), calls))
        results[row.label] = cells
        print(f"  {row.label}: {[round(fd, 2) for fd, _ in cells]} ({time.perf_counter() - start:.0f} s)")
    ran = [row for row in [*main_rows, *study] if row.label in results]
    title = "Digits model (vp: the pipeline's own DDPM table)"
    print_table(title, [row for row in peers if row.label in results], results, args.budgets, False)
    print_table("", ran, results, args.budgets, True)


def main() -> None:
    """Parse the flags and run the oracle benchmark, or the digits one with ``--digits``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=None, help="samples per run (oracle: 4000; digits: 297)")
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="model calls (default 10 20 50 100)")
    parser.add_argument("--no-grid-study", dest="grid_study", action="store_false", help="only the main table")
    parser.add_argument("--digits", default=None, help="a trained pipeline folder: benchmark it instead")
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only sdekit rows whose label contains one of these"
    )
    parser.add_argument("--seed", type=int, default=0, help="digits: the seed of the sampling noise")
    parser.add_argument("--seeds", type=int, default=1, help="oracle: average over the runs seeded 1 to SEEDS")
    parser.add_argument("--snr-study", action="store_true", help="oracle: the corrector snr study instead")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.digits and (args.seeds != 1 or args.snr_study):
        parser.error("--seeds and --snr-study run on the oracle; with --digits use --seed")
    args.samples_given = args.samples is not None
    if args.budgets is None:
        args.budgets = [10, 20, 50] if args.digits else [10, 20, 50, 100]
    if args.digits:
        digits_benchmark(args)
        return
    args.samples = args.samples or 4000
    if args.snr_study:
        snr_study(args)
    else:
        oracle_benchmark(args)


if __name__ == "__main__":
    main()
