"""``sdekit sample``: draw samples from a model with any sampler plugin and write a PNG grid or the arrays."""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..models import model_prediction
from ..sharding import map_batches, sample_generators, share_size
from .base import add_model_options, add_output_options, add_run_options, positive_int
from .files import IMAGE_OUTPUTS, check_output, write_images
from .models import build_scheduler, load_model
from .processes import command_device, process_state, share_progress

__all__ = ["EXAMPLE", "HELP", "configure", "draw", "run"]

HELP = "draw samples from a model with any sampler and write a PNG grid or an .npz of the samples"
EXAMPLE = "sdekit sample --model out --sampler pc --steps 100 --num-samples 64 --out samples.png"


def configure(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit sample``."""
    add_model_options(parser, sampler=True)
    parser.add_argument("--steps", type=positive_int, default=50, help="noise levels (num_inference_steps, default 50)")
    parser.add_argument("--num-samples", type=positive_int, default=64, metavar="N", help="samples (default 64)")
    add_run_options(parser, batch_size=64)
    add_output_options(parser, IMAGE_OUTPUTS, "a PNG grid, or .npz with the float samples and uint8 images")


@torch.no_grad()
def draw(
    model: torch.nn.Module,
    scheduler: Any,
    generators: Sequence[torch.Generator],
    shape: tuple[int, ...],
    num_inference_steps: int,
    device: torch.device,
    on_call: Callable[[], None] = lambda: None,
) -> torch.Tensor:
    """One sample per generator: the loop of a diffusers pipeline, sample ``i``'s noise drawn from ``generators[i]``.

    The start is standard normal noise (drawn on each generator's device, then moved to ``device``) times the
    scheduler's ``init_noise_sigma``; each timestep calls the model on ``scale_model_input(x, t)`` and passes the
    generators to ``step()`` (if it takes a generator), which draws each sample's noise from its own. A sample
    therefore comes out the same in any batch, up to the rounding of the batched model call. ``on_call`` runs after
    every model call.
    """
    noise = torch.cat([torch.randn((1, *shape), generator=g, device=g.device) for g in generators])
    x = noise.to(device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps, device=device)
    extra = {"generator": list(generators)} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        output = model_prediction(model, scheduler.scale_model_input(x, t), t)
        result = scheduler.step(output, t, x, **extra)
        x = result.prev_sample if hasattr(result, "prev_sample") else result[0]
        on_call()
    return x


def run(args: argparse.Namespace) -> int:
    """Run ``sdekit sample``: every process draws its share of the samples, the main process writes ``--out``."""
    out = check_output(args.out, args.overwrite, IMAGE_OUTPUTS)
    state = process_state(args.device)
    device = command_device(args, state)
    loaded = load_model(args, device)
    scheduler = build_scheduler(loaded, args.sampler, dict(args.option))
    scheduler.set_timesteps(args.steps)  # a sampler that cannot plan this run says so before any work
    calls = len(scheduler.timesteps)
    share = share_size(args.num_samples, args.batch_size, state.process_index, state.num_processes)
    batches = -(-share // args.batch_size) if share else 0
    with share_progress(state, batches * calls, f"sample ({args.sampler})", "call") as progress:

        def batch(indices: range) -> dict[str, torch.Tensor]:
            generators = sample_generators(args.seed, indices)
            x = draw(loaded.model, scheduler, generators, loaded.sample_shape, args.steps, device, progress.update)
            return {"samples": x.float()}

        gathered = map_batches(batch, args.num_samples, args.batch_size, state=state)
    if gathered is not None:
        write_images(out, gathered["samples"], args.overwrite)
        print(f"wrote {args.num_samples} samples ({args.sampler}, {calls} model calls each) to {out}")
    return 0
