"""Quality after training: the embedded default trained for its preset's length against the untrained network.

    python benchmarks/train_quality.py                    # the default preset's 1200 steps, ~6 min on 2 CPU cores
    python benchmarks/train_quality.py --pretrained outputs/train_quality/model      # evaluate again, no training

Trains ``training/configs/default.yaml`` with ``training/train.py`` (the trainer under test), then samples the
saved pipeline and the same architecture at initialisation with the same samplers and noise, and prints the
Frechet distance in pixel space to the 297 held-out digits for both, and their ratio. In the same run, diffusers'
own ``DDIMScheduler`` and ``DDPMScheduler`` sample the trained model too: the trainer's checkpoint is an ordinary
DDPM-table model, so the peer's schedulers must do as well as sdekit's samplers on it. The data's own floor (as
many training images as held-out ones) gives the scale of a perfect model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

from sdekit.testing import frechet_distance  # noqa: E402

import train  # noqa: E402
from evaluate import (  # noqa: E402
    EvalRow,
    SamplerRun,
    data_floor,
    embedded_images,
    evaluate,
    sample_pipeline,
    untrained_like,
)

RUNS = (
    SamplerRun("pf-ode-heun", "pf-ode", 25),
    SamplerRun("ddim", "ddim", 25, {"eta": 0.0}),
    SamplerRun("ddpm", "ddim", 100, {"eta": 1.0}),
    SamplerRun("pc-langevin", "pc", 50, {"predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16}),
)


def main() -> None:
    """Train (unless ``--pretrained``), evaluate trained and untrained, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/train_quality")
    p.add_argument("--pretrained", default=None, help="an already trained output folder (skips training)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    model_dir = Path(args.pretrained or Path(args.output_dir) / "model")
    if not args.pretrained:
        start = time.perf_counter()
        train.main(["--config", "default", "--output_dir", str(model_dir), "--seed", str(args.seed)])
        print(f"trained the default preset in {time.perf_counter() - start:.0f} s")
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    training, heldout = embedded_images(pipe)

    trained = evaluate(pipe, heldout, RUNS, seed=args.seed)
    untrained = evaluate(untrained_like(pipe, args.seed), heldout, RUNS, seed=args.seed)
    peers = []
    for label, cls, steps in (
        ("diffusers DDIMScheduler", DDIMScheduler, 25),
        ("diffusers DDPMScheduler", DDPMScheduler, 100),
    ):
        peer = type(pipe)(unet=pipe.unet, scheduler=cls.from_config(pipe.scheduler.config))
        start = time.perf_counter()
        samples = sample_pipeline(peer, heldout.shape[0], steps, args.seed)
        peers.append(EvalRow(label, steps, time.perf_counter() - start, frechet_distance(samples, heldout)))
    floor = data_floor(training, heldout, args.seed)

    print(f"\nFrechet distance to the {len(heldout)} held-out digits ({model_dir}); data floor {floor:.2f}\n")
    print("| sampler | NFE | untrained | trained | untrained / trained |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for before, after in zip(untrained, trained):
        ratio = before.frechet / after.frechet
        print(f"| {after.label} | {after.nfe} | {before.frechet:.2f} | {after.frechet:.2f} | {ratio:.1f}x |")
    for row in peers:
        print(f"| {row.label} | {row.nfe} | | {row.frechet:.2f} | |")


if __name__ == "__main__":
    main()
