"""The main job: train the embedded default briefly, then sample it with every built-in sampler.

    python training/demo.py                        # what `./dev.sh demo` runs; a few minutes on 2 CPU cores
    python training/demo.py --max_train_steps 1200 --output_dir outputs/demo

It trains the ``default`` preset (scikit-learn's digits, a VP SDE on a DDPM table, continuous denoising score
matching) with ``training/train.py``, loads the written folder with ``DiffusionPipeline.from_pretrained``, and
runs every built-in sampler through that unmodified diffusers pipeline (the adaptive probability-flow solver
through ``sdekit.sample_ode``). It writes one grid per sampler to ``<output_dir>/grids/`` and prints (and writes to
``<output_dir>/results.md``) a table of model calls per sample, wall time and the pixel-space Frechet distance to
the held-out digits, next to the untrained model's and the data's own floor. It also inpaints the right half of
eight held-out digits from their left half (``<output_dir>/grids/inpainting.png``) and reports the held-out
digits' bits/dim under the trained network (``sdekit.likelihood``, 32 digits by default) in a second table.

It is never silent for long: a line announces each phase, every sampling run shows its progress labelled with
the sampler (a bar on a terminal, a line per 10% in a log; ``SDEKIT_PROGRESS=bar|lines|off`` forces one), and
each run ends with a line of its NFE, seconds and Frechet distance. All of these go to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

import sdekit
from sdekit.progress import progress_mode
from sdekit.sharding import sample_generators

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train  # noqa: E402
from evaluate import (  # noqa: E402
    BUILTIN_RUNS,
    SamplerRun,
    data_floor,
    embedded_images,
    evaluate,
    format_likelihood_table,
    format_table,
    heldout_likelihood,
    report,
    save_grid,
    untrained_like,
)


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo", help="the trained pipeline, grids and results.md")
    p.add_argument("--max_train_steps", type=int, default=600, help="training length (the preset's is 1200)")
    p.add_argument("--pretrained", default=None, help="evaluate this trained output folder instead of training")
    p.add_argument("--num_samples", type=int, default=None, help="samples per sampler (default: one per held-out)")
    p.add_argument("--num_likelihood", type=int, default=32, help="held-out digits to compute bits/dim of (default 32)")
    p.add_argument("--seed", type=int, default=0, help="the seed of training and of every sampler's noise")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more flags for training/train.py")
    return p


def load_pipeline(model_dir: Path) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained(model_dir)``, whose component-loading bar is shown only where progress
    is a bar: in a log its carriage returns would be noise (diffusers' setting is restored afterwards)."""
    quiet = progress_mode() != "bar" and diffusers_logging.is_progress_bar_enabled()
    if quiet:
        diffusers_logging.disable_progress_bar()
    try:
        return DiffusionPipeline.from_pretrained(model_dir)
    finally:
        if quiet:
            diffusers_logging.enable_progress_bar()


INPAINT_RUN = SamplerRun("ddim eta=1", "ddim", 50, {"eta": 1.0})
"""The sampler of the inpainting grid: stochastic, so plain replacement reconciles the two halves."""


def inpainting_grid(pipe: DiffusionPipeline, heldout: torch.Tensor, path: Path, seed: int, count: int = 8) -> None:
    """Inpaint the right half of ``count`` held-out digits from their left half (:func:`sdekit.inpaint`) and save a
    grid of three rows: the digits, what the model was given (the hidden half grey), and the results."""
    images = heldout[:count]
    mask = torch.ones_like(images[:1, :1])
    mask[..., images.shape[-1] // 2 :] = 0  # 1 where known: the left half
    scheduler = sdekit.load_scheduler(INPAINT_RUN.sampler, pipe.scheduler.config, **INPAINT_RUN.options)
    report(f"demo: inpainting the right half of {count} held-out digits with {INPAINT_RUN.label}")
    generator = sample_generators(seed, range(count))  # digit i's noise from (seed, i), as the CLI seeds it
    with torch.no_grad():
        filled = sdekit.inpaint(
            pipe.unet, scheduler, images, mask, num_inference_steps=INPAINT_RUN.steps, generator=generator
        )
    given = torch.where(mask.bool(), images, torch.zeros_like(images))
    save_grid(torch.cat([images, given, filled.clamp(-1, 1)]), path, columns=count)
    report(f"demo: wrote {path} (rows: held-out digits, the known left halves, inpainted)")


def main(argv: Sequence[str] | None = None) -> str:
    """Train, sample with every built-in sampler, print and write the table; returns it."""
    args = build_parser().parse_args(argv)
    out = Path(args.output_dir)
    model_dir = Path(args.pretrained) if args.pretrained else out / "model"
    if not args.pretrained:
        report(f"demo: training the default preset for {args.max_train_steps} steps into {model_dir}")
        steps = str(args.max_train_steps)
        # Run again, the demo reuses its finished training, or continues an interrupted one from its checkpoint.
        flags = ["--config", "default", "--output_dir", str(model_dir), "--max_train_steps", steps]
        train.main([*flags, "--seed", str(args.seed), "--resume_from_checkpoint", "latest", *args.train_args])
    report(f"demo: loading the trained pipeline from {model_dir}")
    pipe = load_pipeline(model_dir)

    training, heldout = embedded_images(pipe)
    common = {"num_samples": args.num_samples, "seed": args.seed}
    count = args.num_samples or len(heldout)
    report(f"demo: sampling {count} images with each of {len(BUILTIN_RUNS)} samplers; grids in {out / 'grids'}")
    rows = evaluate(pipe, heldout, BUILTIN_RUNS, gamma_data=training, grid_dir=out / "grids", **common)
    # The pipeline's own sampler on the same network before any training, for scale.
    baseline_run = SamplerRun("untrained", "pf-ode", 25)
    report(f"demo: untrained baseline: the same network freshly initialised, {baseline_run.steps} pf-ode-heun levels")
    baseline = evaluate(untrained_like(pipe, args.seed), heldout, [baseline_run], **common)
    report(f"demo: data floor: {len(heldout)} training digits against the {len(heldout)} held-out ones")
    floor = data_floor(training, heldout, args.seed)

    inpainting_grid(pipe, heldout, out / "grids" / "inpainting.png", args.seed)
    scored = heldout[: args.num_likelihood]
    report(f"demo: likelihood of {len(scored)} held-out digits (probability-flow ODE, dequantized 8-bit)")
    likelihoods = [heldout_likelihood(pipe, scored, "trained model", seed=args.seed, rtol=1e-3, atol=1e-3)]

    table = format_table(rows, {"untrained model (pf-ode-heun)": baseline[0].frechet, "training data (floor)": floor})
    header = (
        f"Frechet distance in pixel space ({' x '.join(map(str, heldout.shape[1:]))}) to the {len(heldout)} held-out "
        f"digits ({model_dir}); grids in {out / 'grids'}"
    )
    nll_header = f"Bits/dim of {len(scored)} held-out digits (sdekit.likelihood, Hutchinson trace, rtol 1e-3)"
    nll_table = format_likelihood_table(likelihoods)
    text = f"{header}\n\n{table}\n\n{nll_header}\n\n{nll_table}\n"
    (out / "results.md").write_text(text)
    report(f"demo: wrote {out / 'results.md'}")
    print(f"\n{text}", end="")
    return table


def run(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with an interrupt or a mistake in the flags reported in one line instead of
    a traceback. Returns the exit status: 0 done, 2 a setting to change, 130 interrupted."""
    try:
        main(argv)
    except train.UsageError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    except (train.Interrupted, KeyboardInterrupt) as err:
        where = f" at training step {err.step}" if isinstance(err, train.Interrupted) and err.step else ""
        print(
            f"demo.py: interrupted{where}; run the same command again to continue (finished training is reused, "
            "an interrupted one resumes from its last checkpoint).",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run())
