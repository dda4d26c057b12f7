"""``sdekit inpaint`` and ``sdekit colorize``: controllable generation (:func:`sdekit.inpaint`,
:func:`sdekit.colorize`) from image files, with any sdekit sampler."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from ..inpainting import colorize, inpaint
from ..sharding import map_batches, sample_generators, share_size
from .base import UsageError, add_model_options, add_output_options, add_run_options, non_negative_int, positive_int
from .files import IMAGE_OUTPUTS, Data, check_output, read_data, read_mask, write_images
from .models import build_scheduler, load_model
from .processes import command_device, process_state, share_progress

__all__ = [
    "COLORIZE_EXAMPLE",
    "COLORIZE_HELP",
    "INPAINT_EXAMPLE",
    "INPAINT_HELP",
    "configure_colorize",
    "configure_inpaint",
    "run_colorize",
    "run_inpaint",
]

INPAINT_HELP = "fill in the masked-out part of images with samples from a model (any sdekit sampler)"
INPAINT_EXAMPLE = "sdekit inpaint --model out --sampler pc --image photo.png --mask mask.png --out filled.png"
COLORIZE_HELP = "colour gray images with samples from an RGB model (any sdekit sampler)"
COLORIZE_EXAMPLE = "sdekit colorize --model out --sampler pc --image gray/ --out colored.png"


def _configure(parser: argparse.ArgumentParser, image_help: str) -> None:
    add_model_options(parser, sampler=True)
    parser.add_argument("--image", required=True, metavar="IMAGE", help=image_help)
    parser.add_argument("--num-samples", type=positive_int, metavar="N", help="use the first N images (default all)")
    parser.add_argument("--steps", type=positive_int, default=50, help="noise levels (num_inference_steps, default 50)")
    parser.add_argument(
        "--resample-steps",
        type=non_negative_int,
        default=0,
        metavar="R",
        help="RePaint resampling: repeat every step R times after jumping back (default 0; helps deterministic "
        "samplers)",
    )
    add_run_options(parser, batch_size=16)
    add_output_options(parser, IMAGE_OUTPUTS, "a PNG grid, or .npz with the float samples and uint8 images")


def configure_inpaint(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit inpaint``."""
    _configure(parser, "an image, an image folder or an .npz of the model's size (see sdekit likelihood --data)")
    parser.add_argument(
        "--mask",
        required=True,
        metavar="MASK",
        help="an image of the model's size, white where the image is known and black where to generate (binary), "
        "or an .npz with a 'mask' array; one mask for every image",
    )


def configure_colorize(parser: argparse.ArgumentParser) -> None:
    """The options of ``sdekit colorize``."""
    _configure(parser, "gray (or colour) images of the model's size: an image, an image folder or an .npz")


def _run(args: argparse.Namespace, what: str) -> int:
    out = check_output(args.out, args.overwrite, IMAGE_OUTPUTS)
    state = process_state(args.device)
    device = command_device(args, state)
    loaded = load_model(args, device)
    scheduler = build_scheduler(loaded, args.sampler, dict(args.option))
    channels, height, width = loaded.sample_shape
    if what == "colorize" and channels != 3:
        raise UsageError(f"colorize needs an RGB model; --model {args.model} takes {channels} channel(s).")
    data: Data = read_data(args.image, loaded.sample_shape, limit=args.num_samples, resize=False, option="--image")
    mask = read_mask(args.mask) if what == "inpaint" else None
    if mask is not None and tuple(mask.shape[-2:]) != (height, width):
        raise UsageError(
            f"--mask {args.mask} is {mask.shape[-1]} x {mask.shape[-2]} pixels but the model takes {width} x {height}; "
            "pass a mask of the model's size."
        )
    count = data.x.shape[0]
    share = share_size(count, args.batch_size, state.process_index, state.num_processes)
    with share_progress(state, share, f"{what} ({args.sampler})", "image") as progress:

        def batch(indices: range) -> dict[str, torch.Tensor]:
            images = data.x[indices.start : indices.stop].to(device)
            common: dict[str, Any] = {
                "num_inference_steps": args.steps,
                "generator": sample_generators(args.seed, indices),
                "resample_steps": args.resample_steps,
                "show_progress": False,
            }
            if mask is None:
                result = colorize(loaded.model, scheduler, images.mean(dim=1, keepdim=True), **common)
            else:
                batch_mask = mask if mask.ndim < 4 or mask.shape[0] == 1 else mask[indices.start : indices.stop]
                result = inpaint(loaded.model, scheduler, images, batch_mask, **common)
            progress.update(len(indices))
            return {"samples": result.float()}

        gathered = map_batches(batch, count, args.batch_size, state=state)
    if gathered is not None:
        write_images(out, gathered["samples"], args.overwrite)
        done = {"inpaint": "inpainted", "colorize": "colorized"}[what]
        print(f"wrote {count} {done} images ({args.sampler}) to {out}")
    return 0


def run_inpaint(args: argparse.Namespace) -> int:
    """Run ``sdekit inpaint``: every process fills in its share of the images, the main process writes ``--out``."""
    return _run(args, "inpaint")


def run_colorize(args: argparse.Namespace) -> int:
    """Run ``sdekit colorize``: every process colours its share of the images, the main process writes ``--out``."""
    return _run(args, "colorize")
