"""Sample a trained pipeline with sdekit's samplers and score the samples against held-out images.

The trainer uses :func:`sample` and :func:`save_grid` for its grids; the main job (``training/demo.py``) and the
quality benchmark (``benchmarks/train_quality.py``) use :func:`evaluate` to run every built-in sampler on a
trained ``DiffusionPipeline`` and report, per sampler, the model calls per sample (NFE), the wall time and the
Frechet distance in pixel space to images the model never saw.

Every sampling run reports its progress through :class:`sdekit.progress.Progress`, labelled with the run's label
(a tqdm bar on a terminal, a line per 10% elsewhere; ``SDEKIT_PROGRESS=bar|lines|off`` forces one), and
:func:`evaluate` prints one line per finished run. Progress and these lines go to stderr.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from PIL import Image

import sdekit
from sdekit.cli.files import image_grid
from sdekit.cli.likelihood import summarize
from sdekit.ode import model_score_fn
from sdekit.progress import Progress, pipeline_progress
from sdekit.sde import TimeLike
from sdekit.sharding import sample_generators
from sdekit.testing import frechet_distance

from data import ImageTransform, TrainingImages, load_images

__all__ = [
    "BUILTIN_RUNS",
    "EvalRow",
    "SamplerRun",
    "data_floor",
    "embedded_images",
    "evaluate",
    "format_table",
    "report",
    "sample",
    "sample_pipeline",
    "save_grid",
    "untrained_like",
]


@dataclass(frozen=True)
class SamplerRun:
    """One way of sampling a trained model: an sdekit sampler, its settings and its number of levels.

    Args:
        label: the name in tables and of the grid file.
        sampler: a registered sampler (``sdekit.list_plugins(kind="sampler")``), or ``"sample_ode"`` for the
            adaptive probability-flow solver :func:`sdekit.sample_ode` (its NFE is whatever the solver needs).
        steps: ``num_inference_steps`` (noise levels); unused by ``sample_ode``.
        options: scheduler settings over the pipeline's config, e.g. ``{"eta": 1.0}``.
    """

    label: str
    sampler: str
    steps: int = 25
    options: Mapping[str, Any] = field(default_factory=dict)


BUILTIN_RUNS: tuple[SamplerRun, ...] = (
    SamplerRun("reverse-sde", "pc", 100, {"predictor": "reverse_diffusion", "corrector": "none"}),
    SamplerRun("euler-maruyama", "pc", 100, {"predictor": "euler_maruyama", "corrector": "none"}),
    SamplerRun("pc-langevin", "pc", 50, {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16}),
    SamplerRun("pf-ode-heun", "pf-ode", 25, {"solver": "heun"}),
    SamplerRun("pf-ode-dopri5", "sample_ode", 0, {"rtol": 1e-3, "atol": 1e-3}),
    SamplerRun("ddim", "ddim", 25, {"eta": 0.0}),
    SamplerRun("ddpm", "ddim", 100, {"eta": 1.0}),
    SamplerRun("analytic-ddpm", "analytic-dpm", 25, {"eta": 1.0}),
    SamplerRun("analytic-ddim", "analytic-dpm", 25, {"eta": 0.0}),
)
"""Every built-in sampler on a VP / DDPM-table model: reverse-SDE predictors, predictor-corrector with Langevin,
the probability-flow ODE (fixed Heun steps and adaptive dopri5), DDIM and DDPM, Analytic-DDPM and -DDIM."""


@dataclass(frozen=True)
class EvalRow:
    """One sampler's result: ``nfe`` model calls per sample, ``seconds`` of wall time for all samples (Gamma
    estimation included for Analytic-DPM), and the pixel-space Frechet distance to the held-out images."""

    label: str
    nfe: int
    seconds: float
    frechet: float


def report(message: str) -> None:
    """Print one line of a run's log to stderr, where progress goes, so that the two stay in order."""
    print(message, file=sys.stderr, flush=True)


def save_grid(
    images: torch.Tensor,
    path: Path,
    *,
    min_width: int = 512,
    gap: int = 4,
    background: int = 128,
    columns: int | None = None,
) -> Image.Image:
    """Save samples in ``[-1, 1]`` (``(B, C, H, W)``) as a PNG grid, large enough to judge, and return it.

    The grid has ``columns`` columns (default ``ceil(sqrt(B))``), filled row by row. Every pixel becomes an ``s x
    s`` block (nearest neighbour), ``s`` the smallest integer that makes the grid at least ``min_width`` pixels wide
    (1 if it already is); ``gap`` pixels of the grey level ``background`` separate the cells and frame the grid, and
    fill the cells left empty.

    Args:
        images: the samples, ``(B, C, H, W)`` with ``C`` 1 or 3.
        path: the PNG to write (its folder is created).
        min_width: the smallest width of the grid in pixels; default 512.
        gap: the width of the gaps in pixels; default 4.
        background: the grey level (0-255) of the gaps; default 128, apart from both black and white.
        columns: images per row; default ``ceil(sqrt(B))``.
    """
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, C, H, W) with B >= 1 and C 1 or 3, got shape {tuple(images.shape)}.")
    cols = math.ceil(math.sqrt(images.shape[0])) if columns is None else columns
    for name, value, low in (("min_width", min_width, 1), ("gap", gap, 0), ("columns", cols, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
    if isinstance(background, bool) or not isinstance(background, int) or not 0 <= background <= 255:
        raise ValueError(f"background must be an integer grey level in [0, 255], got {background!r}.")
    picture = image_grid(images, min_width=min_width, gap=gap, background=background, columns=cols)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return picture


@torch.no_grad()
def sample(
    unet: UNet2DModel, scheduler: SchedulerMixin, n: int, steps: int, seed: int, *, label: str = "sampling"
) -> torch.Tensor:
    """``n`` samples in ``[-1, 1]``-ish model space with ``scheduler``: the loop a diffusers pipeline runs, with
    ``init_noise_sigma`` and ``scale_model_input`` applied (so VE samplers work too). Progress counts model calls
    and is labelled ``label``."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=gen).to(unet.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    # As diffusers' pipelines do, pass the generator only to a step() that takes one (a deterministic
    # third-party sampler may not).
    extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    with Progress(len(scheduler.timesteps), label, "step") as progress:
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t.to(unet.device)).sample
            x = scheduler.step(out, t, x, **extra).prev_sample
            progress.update(1)
    return x


def sample_pipeline(pipe: DDPMPipeline, n: int, steps: int, seed: int, *, label: str = "sampling") -> torch.Tensor:
    """``n`` samples from the unmodified diffusers pipeline ``pipe`` (its own loop, clamping and output), returned
    as ``(n, C, H, W)`` in ``[-1, 1]``. The pipeline's progress bar reports through :class:`Progress`, labelled
    ``label``, during the call only."""
    generator = torch.Generator().manual_seed(seed)
    with pipeline_progress(pipe, label):
        out = pipe(batch_size=n, num_inference_steps=steps, generator=generator, output_type="pt")
    return out.images * 2 - 1  # "pt" output: (n, C, H, W) in [0, 1]


def embedded_images(pipe: DDPMPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits at ``pipe``'s resolution and channels: ``(training, heldout)`` tensors in ``[-1, 1]``,
    the 1500 images the trainer uses and the 297 it never sees."""
    transform = ImageTransform(pipe.unet.config.sample_size, channels=pipe.unet.config.in_channels)
    return tuple(TrainingImages(load_images(split=split), transform).tensor() for split in ("train", "test"))


def untrained_like(pipe: DDPMPipeline, seed: int = 0) -> DDPMPipeline:
    """``pipe`` with a freshly initialised network of the same architecture: the scale a trained model beats."""
    torch.manual_seed(seed)
    return type(pipe)(unet=UNet2DModel.from_config(pipe.unet.config), scheduler=pipe.scheduler)


def data_floor(train: torch.Tensor, heldout: torch.Tensor, seed: int = 0) -> float:
    """The Frechet distance of as many training images as there are held-out ones to the held-out images: what a
    perfect model would score with this many samples (the metric's own noise and the train / test gap)."""
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))[: heldout.shape[0]]
    return frechet_distance(train[pick], heldout)


def evaluate(
    pipe: DDPMPipeline,
    heldout: torch.Tensor,
    runs: Sequence[SamplerRun] = BUILTIN_RUNS,
    *,
    num_samples: int | None = None,
    gamma_data: torch.Tensor | None = None,
    grid_dir: Path | None = None,
    grid_size: int = 64,
    seed: int = 0,
) -> list[EvalRow]:
    """Sample ``pipe`` with each of ``runs`` and compare with ``heldout``.

    Args:
        pipe: a trained pipeline (``DiffusionPipeline.from_pretrained(output_dir)``); its scheduler's config gives
            the SDE, the model time and the prediction type to every sampler.
        heldout: images the model never saw, ``(M, C, H, W)`` in ``[-1, 1]``.
        runs: the samplers; default :data:`BUILTIN_RUNS`.
        num_samples: samples per sampler; default ``M``, as many as held-out images.
        gamma_data: training images for Analytic-DPM's ``Gamma`` estimate (needed if a run uses it), estimated at
            the run's own levels only, with the low-variance ``error`` estimator.
        grid_dir: if given, write ``<label>.png``, a grid of the first ``grid_size`` samples, per run.
        grid_size: samples per grid; default 64.
        seed: the seed of every run's noise; default 0.

    Returns:
        One :class:`EvalRow` per run, in order. Each run also shows its progress, labelled with its label, and
        prints ``<label>: done in <seconds> s, NFE <nfe>, Frechet <distance>`` to stderr when it ends.
    """
    n = num_samples or heldout.shape[0]
    original = pipe.scheduler
    rows = []
    try:
        for run in runs:
            start = time.perf_counter()
            if run.sampler == "sample_ode":
                samples, nfe = _sample_ode(pipe.unet, original, run, n, seed)
            else:
                pipe.scheduler = sdekit.load_scheduler(run.sampler, original.config, **run.options)
                if run.sampler == "analytic-dpm":
                    _estimate_gamma(pipe, run, gamma_data, seed)
                samples = _sample(pipe, n, run, seed)
                nfe = len(pipe.scheduler.timesteps)  # the pipeline calls the model once per listed timestep
            seconds = time.perf_counter() - start
            row = EvalRow(run.label, nfe, seconds, frechet_distance(samples, heldout))
            rows.append(row)
            report(f"{row.label}: done in {row.seconds:.1f} s, NFE {row.nfe}, Frechet {row.frechet:.2f}")
            if grid_dir is not None:
                save_grid(samples[:grid_size], Path(grid_dir) / f"{run.label}.png")
    finally:
        pipe.scheduler = original
    return rows


def _sample(pipe: DDPMPipeline, n: int, run: SamplerRun, seed: int) -> torch.Tensor:
    """The diffusers pipeline itself where it is right. ``DDPMPipeline`` starts from unit noise, so a VE sampler
    (``init_noise_sigma = sigma_max``) gets the loop of :func:`sample`, which scales the start as SD-style loops do."""
    if pipe.scheduler.init_noise_sigma == 1:
        return sample_pipeline(pipe, n, run.steps, seed, label=run.label)
    return sample(pipe.unet, pipe.scheduler, n, run.steps, seed, label=run.label).clamp(-1, 1)


def _sample_ode(
    unet: UNet2DModel, reference: SchedulerMixin, run: SamplerRun, n: int, seed: int
) -> tuple[torch.Tensor, int]:
    """The adaptive solver, whose number of model calls is unknown in advance: its progress is the share of the
    time interval ``[sampling_eps, T]`` it has reached (held below 100% until it returns), with the model calls
    so far beside it."""
    # The pipeline's scheduler gives the model's SDE, time input and parametrization.
    scheduler = sdekit.load_scheduler("pf-ode", reference.config)
    sde = scheduler.sde
    score = model_score_fn(unet, sde, scheduler.config.prediction_type, scheduler.time_input)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    calls = 0
    with Progress(100, run.label, "%") as progress:

        def tracked_score(x: torch.Tensor, t: TimeLike) -> torch.Tensor:
            nonlocal calls
            calls += 1
            earliest = float(torch.as_tensor(t).min())
            reached = min(math.floor(100 * (sde.T - earliest) / (sde.T - sde.sampling_eps)), 99)
            progress.update(max(reached - progress.n, 0), nfe=calls)
            return score(x, t)

        with torch.no_grad():
            result = sdekit.sample_ode(
                sde,
                shape,
                score_fn=tracked_score,
                denoise=True,
                generator=torch.Generator().manual_seed(seed),
                device=unet.device,
                **run.options,
            )
        progress.update(100 - progress.n, nfe=result.nfe)
    return result.samples.clamp(-1, 1), result.nfe


def _estimate_gamma(pipe: DDPMPipeline, run: SamplerRun, data: torch.Tensor | None, seed: int) -> None:
    if data is None:
        raise ValueError(f"run {run.label!r} uses analytic-dpm, which needs gamma_data (training images).")
    shuffled = data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))]
    # 500 images per level estimate 1 - Gamma to sqrt(2 / (d M)), under 0.5% for 16 x 16 images.
    count = min(500, data.shape[0])
    report(f"{run.label}: estimating Gamma at the {run.steps} levels it visits from {count} training images")
    with torch.no_grad():
        pipe.scheduler.estimate_gamma(
            pipe.unet,
            shuffled,
            num_samples=count,
            batch_size=count,
            timesteps="trajectory",  # only the levels of this run's trajectory
            num_inference_steps=run.steps,
            generator=torch.Generator().manual_seed(seed + 1),
            estimator="error",
        )


@dataclass(frozen=True)
class LikelihoodRow:
    """Bits/dim of the held-out images under one model: the mean, its 95% interval, model calls per image, and
    the wall time for all of them."""

    label: str
    bpd: float
    ci95: tuple[float, float]
    nfe: float
    seconds: float


def heldout_likelihood(
    pipe: DDPMPipeline,
    heldout: torch.Tensor,
    label: str,
    *,
    seed: int = 0,
    batch_size: int = 64,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> LikelihoodRow:
    """Bits/dim of ``heldout`` (8-bit images in ``[-1, 1]``) under ``pipe``'s model through the probability-flow ODE
    (:func:`sdekit.likelihood`, dequantized as score-SDE reports bits/dim, Hutchinson trace), with the 95% Student-t
    interval over the images. Image ``i``'s dequantization noise and probe come from ``seed`` and ``i``, as in
    ``sdekit likelihood``; progress counts images and is labelled ``label``."""
    scheduler = sdekit.load_scheduler("pf-ode", pipe.scheduler.config)  # the probability-flow ODE of the model's SDE
    bpd, nfe = [], []
    start = time.perf_counter()
    with Progress(heldout.shape[0], f"likelihood {label}", "image") as progress:
        for first in range(0, heldout.shape[0], batch_size):
            indices = range(first, min(first + batch_size, heldout.shape[0]))
            result = sdekit.likelihood(
                pipe.unet,
                heldout[indices.start : indices.stop],
                scheduler,
                rtol=rtol,
                atol=atol,
                dequantize=True,
                generator=sample_generators(seed, indices),
            )
            bpd.append(result.bpd.cpu())
            nfe.append(result.nfe.cpu())
            progress.update(len(indices), bpd=float(result.bpd.mean()))
    summary = summarize(torch.cat(bpd))
    low, high = summary["bpd_ci95"]
    return LikelihoodRow(
        label, summary["bpd"], (low, high), float(torch.cat(nfe).double().mean()), time.perf_counter() - start
    )


def format_likelihood_table(rows: Sequence[LikelihoodRow]) -> str:
    """A Markdown table of held-out bits/dim, one row per model."""
    lines = ["| model | bits/dim | 95% interval | NFE per image | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [
        f"| {r.label} | {r.bpd:.3f} | [{r.ci95[0]:.3f}, {r.ci95[1]:.3f}] | {r.nfe:.0f} | {r.seconds:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def format_table(rows: Sequence[EvalRow], extra: Mapping[str, float] | None = None) -> str:
    """A Markdown table of ``rows``; ``extra`` adds reference lines (label -> Frechet), such as the data floor."""
    lines = ["| sampler | NFE | seconds | Frechet |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.label} | {r.nfe} | {r.seconds:.1f} | {r.frechet:.2f} |" for r in rows]
    lines += [f"| {label} | | | {value:.2f} |" for label, value in (extra or {}).items()]
    return "\n".join(lines)
