"""Sample a trained pipeline with sdekit's samplers and score the samples against held-out images.

The trainer uses :func:`sample` and :func:`save_grid` for its grids; the main job (``training/demo.py``) and the
quality benchmark (``benchmarks/train_quality.py``) use :func:`evaluate` to run every built-in sampler on a
trained ``DiffusionPipeline`` and report, per sampler, the model calls per sample (NFE), the wall time and the
Frechet distance in pixel space to images the model never saw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMPipeline, SchedulerMixin, UNet2DModel
from PIL import Image

import sdekit
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


def save_grid(images: torch.Tensor, path: Path) -> Image.Image:
    """Save samples in ``[-1, 1]`` (``(B, C, H, W)``) as a square PNG grid and return it."""
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(b):
        grid[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else array)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return picture


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: SchedulerMixin, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` samples in ``[-1, 1]``-ish model space with ``scheduler``: the loop a diffusers pipeline runs, with
    ``init_noise_sigma`` and ``scale_model_input`` applied (so VE samplers work too)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=gen).to(unet.device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = unet(scheduler.scale_model_input(x, t), t.to(unet.device)).sample
        x = scheduler.step(out, t, x, generator=gen).prev_sample
    return x


def sample_pipeline(pipe: DDPMPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` samples from the unmodified diffusers pipeline ``pipe`` (its own loop, clamping and output), returned
    as ``(n, C, H, W)`` in ``[-1, 1]``."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
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
        One :class:`EvalRow` per run, in order.
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
                samples = _sample(pipe, n, run.steps, seed)
                nfe = len(pipe.scheduler.timesteps)  # the pipeline calls the model once per listed timestep
            seconds = time.perf_counter() - start
            rows.append(EvalRow(run.label, nfe, seconds, frechet_distance(samples, heldout)))
            if grid_dir is not None:
                save_grid(samples[:grid_size], Path(grid_dir) / f"{run.label}.png")
    finally:
        pipe.scheduler = original
    return rows


def _sample(pipe: DDPMPipeline, n: int, steps: int, seed: int) -> torch.Tensor:
    """The diffusers pipeline itself where it is right. ``DDPMPipeline`` starts from unit noise, so a VE sampler
    (``init_noise_sigma = sigma_max``) gets the loop of :func:`sample`, which scales the start as SD-style loops do."""
    if pipe.scheduler.init_noise_sigma == 1:
        return sample_pipeline(pipe, n, steps, seed)
    return sample(pipe.unet, pipe.scheduler, n, steps, seed).clamp(-1, 1)


def _sample_ode(
    unet: UNet2DModel, reference: SchedulerMixin, run: SamplerRun, n: int, seed: int
) -> tuple[torch.Tensor, int]:
    # The pipeline's scheduler gives the model's SDE, time input and parametrization.
    scheduler = sdekit.load_scheduler("pf-ode", reference.config)
    shape = (n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad():
        result = sdekit.sample_ode(
            scheduler.sde,
            shape,
            model=unet,
            prediction_type=scheduler.config.prediction_type,
            time_input=scheduler.time_input,
            denoise=True,
            generator=torch.Generator().manual_seed(seed),
            device=unet.device,
            **run.options,
        )
    return result.samples.clamp(-1, 1), result.nfe


def _estimate_gamma(pipe: DDPMPipeline, run: SamplerRun, data: torch.Tensor | None, seed: int) -> None:
    if data is None:
        raise ValueError(f"run {run.label!r} uses analytic-dpm, which needs gamma_data (training images).")
    # The levels the run visits: an even or quadratic trajectory does not depend on Gamma, so a scheduler with
    # the baseline variance plans them without it.
    probe = sdekit.load_scheduler("analytic-dpm", pipe.scheduler.config, variance="beta_tilde")
    if probe.config.trajectory == "optimal":
        raise ValueError(f"run {run.label!r}: the optimal trajectory needs Gamma at every level; use even here.")
    probe.set_timesteps(run.steps)
    levels = sorted({int(t) for t in probe.timesteps})
    shuffled = data[torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))]
    # 500 images per level estimate 1 - Gamma to sqrt(2 / (d M)), under 0.5% for 16 x 16 images.
    count = min(500, data.shape[0])
    with torch.no_grad():
        pipe.scheduler.estimate_gamma(
            pipe.unet,
            shuffled,
            num_samples=count,
            batch_size=count,
            timesteps=levels,
            generator=torch.Generator().manual_seed(seed + 1),
            estimator="error",
            show_progress=False,
        )


def format_table(rows: Sequence[EvalRow], extra: Mapping[str, float] | None = None) -> str:
    """A Markdown table of ``rows``; ``extra`` adds reference lines (label -> Frechet), such as the data floor."""
    lines = ["| sampler | NFE | seconds | Frechet |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r.label} | {r.nfe} | {r.seconds:.1f} | {r.frechet:.2f} |" for r in rows]
    lines += [f"| {label} | | | {value:.2f} |" for label, value in (extra or {}).items()]
    return "\n".join(lines)
