"""``sdekit encode`` and ``sdekit decode``: data to latents and back through the probability-flow ODE."""

from __future__ import annotations

import argparse

import torch

from .. import registry
from ..encoding import decode, encode
from ..sharding import map_batches, share_size
from .base import add_data_options, add_model_options, add_output_options, add_run_options, positive_float, positive_int
from .files import IMAGE_OUTPUTS, LATENT_FILES, check_output, read_data, read_latents, write_images, write_latents
from .models import load_model
from .processes import command_device, process_state, share_progress

__all__ = [
    "DECODE_EXAMPLE",
    "DECODE_HELP",
    "ENCODE_EXAMPLE",
    "ENCODE_HELP",
    "configure_decode",
    "configure_encode",
    "run_decode",
    "run_encode",
]

ENCODE_HELP = "map data to latents through the probability-flow ODE and write them (.safetensors or .npz)"
ENCODE_EXAMPLE = "sdekit encode --model out --data digits/ --num-samples 16 --out latents.safetensors"
DECODE_HELP = "map latents back to data through the probability-flow ODE and write a PNG grid or an .npz"
DECODE_EXAMPLE = "sdekit decode --model out --latents latents.safetensors --out decoded.png"


def _add_solver_options(parser: argparse.ArgumentParser) -> None:
    solver = parser.add_argument_group("solver")
    solver.add_argument(
        "--steps",
        type=positive_int,
        metavar="K",
        help="K fixed first-order steps (DDIM with eta=0 for VP models); default: the adaptive dopri5 solver",
    )
    solver.add_argument("--rtol", type=positive_float, default=1e-5, help="adaptive solver tolerance (default 1e-5)")
    solver.add_argument("--atol", type=positive_float, default=1e-5, help="adaptive solver tolerance (default 1e-5)")


def configure_encode(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit encode``."""
    add_model_options(parser, sampler=False)
    add_data_options(parser, "encode")
    _add_solver_options(parser)
    add_run_options(parser, batch_size=16, seed=False)
    add_output_options(parser, LATENT_FILES, "the latents, under the name 'latents'")


def configure_decode(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit decode``."""
    add_model_options(parser, sampler=False)
    parser.add_argument(
        "--latents", required=True, metavar="FILE", help="latents written by sdekit encode (.safetensors or .npz)"
    )
    _add_solver_options(parser)
    add_run_options(parser, batch_size=16, seed=False)
    add_output_options(parser, IMAGE_OUTPUTS, "a PNG grid, or .npz with the float samples and uint8 images")


def _transport(args: argparse.Namespace, upward: bool) -> int:
    out = check_output(args.out, args.overwrite, LATENT_FILES if upward else IMAGE_OUTPUTS)
    state = process_state(args.device)
    device = command_device(args, state)
    loaded = load_model(args, device)
    scheduler = registry.load_scheduler("pf-ode", loaded.config)  # the probability-flow ODE of the model's SDE
    if upward:
        source = read_data(args.data, loaded.sample_shape, split=args.split, limit=args.num_samples).x
    else:
        source = read_latents(args.latents, loaded.sample_shape)
    count = source.shape[0]
    solve = encode if upward else decode
    name = "encode" if upward else "decode"
    share = share_size(count, args.batch_size, state.process_index, state.num_processes)
    with share_progress(state, share, name, "sample") as progress:

        def batch(indices: range) -> dict[str, torch.Tensor]:
            x = source[indices.start : indices.stop].to(device)
            y = solve(loaded.model, x, scheduler, rtol=args.rtol, atol=args.atol, num_inference_steps=args.steps)
            progress.update(len(indices))
            return {"y": y.float()}

        gathered = map_batches(batch, count, args.batch_size, state=state)
    if gathered is None:
        return 0
    if upward:
        solver = f"{args.steps} fixed steps" if args.steps else f"dopri5, rtol={args.rtol:g}, atol={args.atol:g}"
        metadata = {"model": str(args.model), "data": str(args.data), "solver": solver}
        write_latents(out, gathered["y"], metadata, args.overwrite)
        print(f"wrote the latents of {count} samples to {out}")
    else:
        write_images(out, gathered["y"], args.overwrite)
        print(f"wrote {count} decoded samples to {out}")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    """Run ``sdekit encode``: every process encodes its share, the main process writes ``--out``."""
    return _transport(args, upward=True)


def run_decode(args: argparse.Namespace) -> int:
    """Run ``sdekit decode``: every process decodes its share, the main process writes ``--out``."""
    return _transport(args, upward=False)
