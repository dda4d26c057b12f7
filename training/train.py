"""Train a diffusers ``UNet2DModel`` as a score model with accelerate; write a Hub-publishable pipeline folder.

    accelerate launch training/train.py                                  # the embedded default, a few minutes
    accelerate launch training/train.py --config training/configs/cifar10_vp.yaml --dataset_name cifar10
    accelerate launch training/train.py --sde ve --objective smld --max_train_steps 500 --output_dir out

Flags that mean the same as in diffusers' ``train_unconditional.py`` have its names. The objective comes from
:mod:`sdekit.losses` (continuous denoising score matching for any SDE, DDPM's ``L_simple``, SMLD's loss); the
scheduler written next to the model is the sdekit sampler ``--sampler`` configured for that same SDE, model time
and prediction type, so ``DiffusionPipeline.from_pretrained(output_dir)`` samples correctly.

Everything random is drawn from generators seeded by ``(seed, step)``, and the data order from
``(seed, epoch)``: a run resumed from a checkpoint continues exactly as the uninterrupted run does.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import SchedulerMixin, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdekit  # noqa: E402
from sdekit.losses import DenoisingLoss  # noqa: E402
from sdekit.progress import Progress  # noqa: E402
from sdekit.scheduler import shared_config  # noqa: E402

from checkpoints import TrainingState, find_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from data import EMBEDDED_DATASET, ImageTransform, TrainingImages, load_images  # noqa: E402
from evaluate import sample, save_grid  # noqa: E402
from publish import (  # noqa: E402
    PIPELINE_ENTRIES,
    HubError,
    PushError,
    create_hub_repo,
    push_folder,
    save_pipeline,
    write_model_card,
)
from run_folder import OutputFolderError, RunFolder  # noqa: E402

logger = logging.getLogger("sdekit.train")

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    },
    "small": {
        "block_out_channels": (64, 128, 128),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    },
    # DDPM's CIFAR-10 network (Ho et al. 2020, appendix B): 4 resolutions, attention at 16 x 16.
    "ddpm-cifar10": {
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "dropout": 0.1,
    },
}
"""Named ``UNet2DModel`` sizes for ``--model``; ``--model_config`` (a JSON file) gives any other."""

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
T = TypeVar("T")


class UsageError(ValueError):
    """A setting that cannot work on this machine or with these inputs; the message says what to change."""


# -- arguments --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags; defaults are the embedded preset's."""
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    a = p.add_argument
    a("--config", default=None, help="a YAML preset (e.g. training/configs/default.yaml); flags override it")
    # diffusers' train_unconditional.py names
    a("--output_dir", default="sdekit-model", help="where the pipeline, checkpoints, logs and samples go")
    a(
        "--overwrite_output_dir",
        action="store_true",
        help="start a new run in an earlier run's folder (deleting only what it wrote) or in a folder of other files",
    )
    a("--dataset_name", default=None, help="a Hub dataset (offline: must be cached)")
    a("--dataset_config_name", default=None)
    a("--train_data_dir", default=None, help="an image folder (read with datasets' imagefolder)")
    a("--image_column", default=None, help="the dataset column holding the images (default: found by type)")
    a("--cache_dir", default=None)
    a("--resolution", type=int, default=16)
    a("--center_crop", action=argparse.BooleanOptionalAction, default=True)
    a("--random_flip", action=argparse.BooleanOptionalAction, default=False)
    a("--train_batch_size", type=int, default=64)
    a("--num_epochs", type=int, default=None, help="train this many epochs (or --max_train_steps)")
    a("--max_train_steps", type=int, default=1200, help="optimizer steps; wins over --num_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=2e-3)
    a("--lr_scheduler", default="cosine")
    a("--lr_warmup_steps", type=int, default=100, help="in optimizer steps")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.0)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    a("--ema_inv_gamma", type=float, default=1.0)
    a("--ema_power", type=float, default=3 / 4)
    a("--ema_max_decay", type=float, default=0.9999)
    a(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: what `accelerate launch` / `accelerate config` says, else no",
    )
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=2)
    a("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    a("--push_to_hub", action="store_true", help="upload the output folder (without checkpoints) to the Hub")
    a("--hub_model_id", default=None, help="the Hub repository, e.g. your-name/sdekit-digits")
    a("--hub_private_repo", action="store_true")
    a("--report_to", default="tensorboard", help="an accelerate tracker, or 'none'")
    a("--logging_dir", default="logs")
    a("--seed", type=int, default=0)
    # sdekit's own
    a("--sde", default="vp", help="an SDE plugin: vp, subvp, ve or any installed one")
    a("--sde_params", type=json.loads, default=None, help="JSON parameters for the SDE (default: see --help)")
    a("--num_train_timesteps", type=int, default=1000)
    a("--beta_schedule", default="linear")
    a("--objective", default="dsm", help="dsm (continuous score matching), ddpm (L_simple) or smld")
    a("--prediction_type", default="epsilon")
    a("--weighting", default="sigma2", help="dsm only: sigma2 or likelihood")
    a("--reduce", default="mean")
    a("--channels", type=int, default=None, help="1 or 3 (default: 1 for the embedded digits, else 3)")
    a("--model", default="tiny", help=f"a UNet2DModel preset: {', '.join(MODEL_PRESETS)}")
    a("--model_config", default=None, help="a UNet2DModel config JSON instead of --model")
    a("--skip_bad_images", action="store_true", help="skip unreadable images (counted) instead of failing")
    a("--sampler", default="pf-ode", help="the sdekit sampler written into the pipeline and used for samples")
    a("--sample_steps", type=int, default=25, help="noise levels for samples during and after training")
    a("--save_images_steps", type=int, default=400, help="write a sample grid every this many steps")
    a("--num_sample_images", type=int, default=16)
    return p


def resolve_preset(config: str) -> Path | None:
    """``config`` as a YAML file, else the shipped preset of that name (``default``, ``cifar10_ve.yaml``, ...)."""
    for path in (Path(config), CONFIG_DIR / Path(config).name, CONFIG_DIR / f"{Path(config).name}.yaml"):
        if path.is_file():
            return path
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags over the ``--config`` preset over the defaults; unknown preset keys are an error."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        path = resolve_preset(first.config)
        if path is None:
            presets = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            parser.error(f"--config {first.config}: no such file, nor a shipped preset ({presets})")
        preset = yaml.safe_load(path.read_text()) or {}
        known = {action.dest for action in parser._actions}
        for key in preset:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                parser.error(f"{path}: unknown setting {key!r}{hint}")
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/sdekit-digits)")
    if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
        parser.error("--gradient_accumulation_steps and --train_batch_size must be >= 1")
    if args.max_train_steps is None and args.num_epochs is None:
        parser.error("pass --max_train_steps or --num_epochs")
    return args


# -- set-up -------------------------------------------------------------------------------------------


def scheduler_config(args: argparse.Namespace, objective_time_input: str | None = None) -> dict[str, Any]:
    """The sdekit scheduler configuration shared by the objective and the saved pipeline."""
    config: dict[str, Any] = {
        "sde": args.sde,
        "num_train_timesteps": args.num_train_timesteps,
        "beta_schedule": args.beta_schedule,
        "prediction_type": args.prediction_type,
    }
    if args.sde_params is not None:
        config["sde_params"] = args.sde_params
    if objective_time_input is not None:
        config["time_input"] = objective_time_input
    return config


def build_unet(args: argparse.Namespace, channels: int, time_input: str) -> UNet2DModel:
    """The model from ``--model_config`` or the ``--model`` preset; VE models embed ``log sigma`` with Fourier
    features (NCSN++'s choice), the others the DDPM sinusoidal embedding of ``t (N - 1)``."""
    if args.model_config:
        return UNet2DModel.from_config(json.loads(Path(args.model_config).read_text()))
    check_model_preset(args.model)
    fourier = {"time_embedding_type": "fourier", "flip_sin_to_cos": True} if time_input == "sigma" else {}
    return UNet2DModel(
        sample_size=args.resolution, in_channels=channels, out_channels=channels, **MODEL_PRESETS[args.model], **fourier
    )


class EpochSampler(torch.utils.data.Sampler[int]):
    """A shuffle fixed by ``(seed, epoch)``, so resuming mid-epoch replays the same order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle as epoch ``epoch`` from now on."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=gen).tolist())

    def __len__(self) -> int:
        return self.size


# -- training -----------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM: at a step boundary, after writing a checkpoint, or (outside the
    training loop) wherever it was; the command resumes from the latest checkpoint, or starts over if none.

    Attributes:
        step: the last optimizer step done and saved (``None`` when stopped outside the training loop).
        checkpoint: the checkpoint that holds it (``None`` outside the training loop).
        command: the exact command that continues the run.
    """

    def __init__(self, step: int | None, checkpoint: Path | None, command: str) -> None:
        self.step, self.checkpoint, self.command = step, checkpoint, command
        where = "interrupted" if step is None else f"interrupted at step {step}"
        super().__init__(f"{where}; resume with: {command}")


class StopSignals:
    """While active, SIGINT and SIGTERM only record that a stop was asked for, so that the training loop can stop
    at the next step boundary with a complete checkpoint. The handlers in place before are restored on exit.

    A signal more than :attr:`REPEAT_SECONDS` after the first one (a second Ctrl-C) stops at once, with
    ``KeyboardInterrupt``; repeats within that time are the same request delivered twice (``accelerate launch``
    forwards the terminal's signal to processes that already received it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 2.0

    def __init__(self) -> None:
        self.received: int | None = None
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received, self._first = signum, time.monotonic()
            logger.warning(
                "%s received: stopping after this step (signal again to stop at once)", signal.Signals(signum).name
            )
        elif time.monotonic() - self._first > self.REPEAT_SECONDS:
            self.__exit__()
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def resume_command(argv: Sequence[str], args: argparse.Namespace, claimed: bool = True) -> str:
    """The command that continues this run: this script with the same flags and ``--resume_from_checkpoint
    latest``, under ``accelerate launch`` (with its process count) if it was started that way. Before the output
    folder is ``claimed`` nothing of this run exists yet, so the command is the one given (an
    ``--overwrite_output_dir`` kept, so that an earlier run is not continued instead)."""
    kept: list[str] = []
    drop_next = False
    for arg in argv:
        if not claimed:
            kept.append(arg)
        elif drop_next:
            drop_next = False
        elif arg == "--resume_from_checkpoint":
            drop_next = True
        elif not arg.startswith("--resume_from_checkpoint=") and arg != "--overwrite_output_dir":
            kept.append(arg)
    if args.mixed_precision != "no" and not any(a.split("=")[0] == "--mixed_precision" for a in kept):
        kept += ["--mixed_precision", args.mixed_precision]  # it came from the launcher or accelerate's config
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        launcher = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)]
    elif "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by `accelerate launch`
        launcher = ["accelerate", "launch"]
    else:
        launcher = ["python"]
    script = Path(__file__)
    shown = os.path.relpath(script) if script.is_relative_to(Path.cwd()) else str(script)
    resume = ["--resume_from_checkpoint", "latest"] if claimed else []
    return shlex.join([*launcher, shown, *kept, *resume])


REPLACED_NAMES: tuple[str, ...] = (*PIPELINE_ENTRIES, "README.md", "samples.png")
"""What a run replaces whole in ``--output_dir`` at its end: the pipeline, the model card, the final grid."""


def written_names(args: argparse.Namespace) -> list[str]:
    """Top-level names the run writes in ``--output_dir``: :data:`REPLACED_NAMES`, grids, checkpoints and logs."""
    names = [*REPLACED_NAMES, "samples", "checkpoint-*"]
    logging_dir = Path(args.logging_dir)
    if not logging_dir.is_absolute():
        names.append(logging_dir.parts[0])
    return names


def _on_main(accelerator: Accelerator, action: Callable[[], T]) -> T:
    """Run ``action`` on the main process only; its result, or the user error it raised, reaches every process."""
    result, problem = None, None
    if accelerator.is_main_process:
        try:
            result = action()
        except (ValueError, HubError) as err:  # a UsageError or a bad --resume_from_checkpoint: the user's to fix
            problem = str(err)
    result, problem = broadcast_object_list([result, problem])
    if problem is not None:
        raise UsageError(problem)
    return result


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse, before anything is set up, inputs that cannot work; raises :class:`UsageError`."""
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        state = "is not a folder" if Path(args.train_data_dir).exists() else "does not exist"
        raise UsageError(f"--train_data_dir {args.train_data_dir} {state}; pass the folder that holds the images.")
    if args.model_config is not None and not Path(args.model_config).is_file():
        raise UsageError(f"--model_config {args.model_config} does not exist; pass a UNet2DModel config JSON file.")
    if args.model_config is None:
        check_model_preset(args.model)


def check_model_preset(name: str) -> None:
    """Raise :class:`UsageError` unless ``name`` is one of :data:`MODEL_PRESETS` (naming the closest one)."""
    if name not in MODEL_PRESETS:
        close = difflib.get_close_matches(name, MODEL_PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"--model must be one of {', '.join(MODEL_PRESETS)}, got {name!r}{hint}.")


def load_training_images(args: argparse.Namespace, channels: int) -> TrainingImages:
    """The training set as tensors; a missing dataset, an empty folder or an unreadable image is a
    :class:`UsageError` that says what to change."""
    try:
        raw = load_images(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
        transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, channels)
        return TrainingImages(
            raw, transform, column=args.image_column, skip_bad_images=args.skip_bad_images, seed=args.seed
        )
    except ValueError as err:  # BadImageError, an unknown offline dataset, a wrong column, no images
        raise UsageError(str(err)) from err


def pipeline_scheduler(args: argparse.Namespace, time_input: str) -> SchedulerMixin:
    """The ``--sampler`` scheduler for the trained model, configured as diffusers' ``from_config`` does: it takes
    the keys of the shared configuration it knows (SDE, schedule, prediction type, model time) and drops the rest,
    so any installed sampler works here."""
    config = shared_config(scheduler_config(args, time_input))
    # SDE parameters that are also shared keys (a VE range) are repeated there, for samplers that read those keys.
    config.update({k: v for k, v in (args.sde_params or {}).items() if k in config})
    takes = inspect.signature(sdekit.get_sampler_class(args.sampler).__init__).parameters
    return sdekit.load_scheduler(args.sampler, {k: v for k, v in config.items() if k in takes})


def log_configuration(args: argparse.Namespace, accelerator: Accelerator, images: int, max_steps: int) -> None:
    """Log the effective configuration (every flag after presets and the launcher, mixed precision included)."""
    per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    logger.info(
        "training %d steps of %d images each (%d images, %d process(es) on %s, mixed precision %s)",
        max_steps,
        per_step,
        images,
        accelerator.num_processes,
        accelerator.device,
        args.mixed_precision,
    )
    width = max(map(len, vars(args)))
    logger.info("configuration:\n%s", "\n".join(f"  {k:<{width}} {v}" for k, v in sorted(vars(args).items())))


def main(argv: Sequence[str] | None = None) -> Path:
    """Train, then write the pipeline folder (and push it with ``--push_to_hub``); returns the folder.

    Raises:
        UsageError: an input or setting the user must change (the message says how).
        Interrupted: SIGINT or SIGTERM stopped the run at a step boundary; a checkpoint holds it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    check_inputs(args)
    output_dir = Path(args.output_dir)
    # With no accelerator device, say so: accelerate then runs several processes (launched with
    # `accelerate launch --multi_gpu --num_processes N`) as a gloo process group on the CPU.
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(
        cpu=no_device,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    args.mixed_precision = accelerator.mixed_precision  # the one in effect, for the logs and the model card
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would silently train in float32: say so instead.
        raise UsageError("--mixed_precision fp16 needs a GPU (on the CPU accelerate ignores it); use bf16 or no.")

    claimed: list[RunFolder] = []  # filled once --output_dir is claimed
    try:
        return _train(args, accelerator, resume_command(argv, args), claimed)
    except KeyboardInterrupt:  # outside the training loop, where a stop cannot wait for a step boundary
        raise Interrupted(None, None, resume_command(argv, args, claimed=bool(claimed))) from None


def claim_output_dir(accelerator: Accelerator, args: argparse.Namespace) -> RunFolder:
    """Claim ``--output_dir`` on the main process (see :meth:`RunFolder.claim`); every process gets the run's
    folder, or the :class:`UsageError` that says why it cannot be used."""
    folder, problem = None, None
    if accelerator.is_main_process:
        try:
            folder = RunFolder.claim(
                args.output_dir,
                resume=args.resume_from_checkpoint is not None,
                overwrite=args.overwrite_output_dir,
                written_names=written_names(args),
                replaced_names=(*REPLACED_NAMES, "checkpoint-*"),
            )
        except OutputFolderError as err:
            problem = str(err)
    run_id, problem = broadcast_object_list([folder.run_id if folder else None, problem])
    if problem is not None:
        raise UsageError(problem)
    return folder if folder is not None else RunFolder(Path(args.output_dir), run_id)


def _train(args: argparse.Namespace, accelerator: Accelerator, command: str, claimed: list[RunFolder]) -> Path:
    output_dir = Path(args.output_dir)
    if args.push_to_hub:
        check_hub_repo(accelerator, args)

    # Data: the embedded digits are grayscale; other sources default to RGB.
    source = args.dataset_name or args.train_data_dir or EMBEDDED_DATASET
    channels = args.channels or (1 if source == EMBEDDED_DATASET else 3)
    images = load_training_images(args, channels)
    if images.skipped:
        logger.warning("skipped %d unreadable images: %s", len(images.skipped), ", ".join(images.skipped[:10]))
    sampler = EpochSampler(len(images), args.seed)
    loader = torch.utils.data.DataLoader(images, batch_size=args.train_batch_size, sampler=sampler, drop_last=True)
    if len(loader) < accelerator.num_processes * args.gradient_accumulation_steps:
        raise UsageError(
            f"{len(images)} images make {len(loader)} batches of {args.train_batch_size}, fewer than one optimizer "
            f"step needs ({accelerator.num_processes * args.gradient_accumulation_steps}); lower "
            "--train_batch_size or --gradient_accumulation_steps."
        )

    # Objective and scheduler share one SDE, model time and prediction type.
    try:
        sde = sdekit.sde_from_config(scheduler_config(args))
        objective = DenoisingLoss(
            sde, args.objective, args.prediction_type, weighting=args.weighting, reduce=args.reduce
        )
        scheduler = pipeline_scheduler(args, objective.time_input)
    except ValueError as err:  # an unknown SDE or sampler (with the closest name), a bad parameter
        raise UsageError(str(err)) from err
    folder = claim_output_dir(accelerator, args)  # everything checked: from here on the run writes
    claimed.append(folder)
    set_seed(args.seed)  # the model's initial weights
    unet = build_unet(args, channels, objective.time_input)
    ema = None
    if args.use_ema:
        ema = EMAModel(
            unet.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=unet.config,
        )
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    updates_per_epoch = max(len(loader) // args.gradient_accumulation_steps, 1)
    max_steps = args.max_train_steps or args.num_epochs * updates_per_epoch
    # The schedule counts optimizer steps and is stepped once per optimizer step, on every process (it is not
    # handed to accelerate, which would step it per micro-batch and per process).
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_steps
    )
    accelerator.register_for_checkpointing(lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)

    state = TrainingState(0, 0, 0)
    if args.resume_from_checkpoint:
        found = _on_main(accelerator, lambda: find_checkpoint(folder, args.resume_from_checkpoint))
        if found is None:
            logger.info("no checkpoint of this run in %s: starting from scratch", output_dir)
        else:
            state = load_checkpoint(accelerator, found)
            logger.info("resumed from %s at step %d", found, state.global_step)
    log_configuration(args, accelerator, len(images), max_steps)
    if accelerator.is_main_process and args.report_to != "none":
        # Steps after the checkpoint were logged by the interrupted run; tensorboard hides them from here on.
        purge = {"tensorboard": {"purge_step": state.global_step + 1}} if args.report_to == "tensorboard" else {}
        accelerator.init_trackers("sdekit-train", config={k: str(v) for k, v in vars(args).items()}, init_kwargs=purge)
        record_logs(folder, args)  # the tracker's files, at once: a run killed before its first step leaves them
    loss_log = LossLog(output_dir / args.logging_dir / "loss.jsonl", folder if accelerator.is_main_process else None)
    loss_log.truncate(state.global_step)

    try:
        global_step = train_loop(
            TrainingParts(accelerator, unet, ema, optimizer, lr_scheduler, loader, sampler, images, objective),
            args,
            state,
            max_steps,
            folder,
            loss_log,
            scheduler,
            command,
        )
    except Interrupted as stop:
        # The traceback's frames hold the prepared model; let it go before the process group (see end_run).
        traceback.clear_frames(stop.__traceback__)
        del unet, optimizer, loader, lr_scheduler
        end_run(accelerator, folder, args)
        raise

    # Every process records what it trained, so a multi-process run can be checked for agreement.
    fingerprint = float(sum(p.detach().double().sum() for p in accelerator.unwrap_model(unet).parameters()))
    ranks = output_dir / args.logging_dir / f"rank-{accelerator.process_index}.json"
    ranks.parent.mkdir(parents=True, exist_ok=True)
    ranks.write_text(json.dumps({"global_step": global_step, "parameter_sum": fingerprint}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.record(*sorted(ranks.parent.glob("rank-*.json")))
        record_logs(folder, args)  # the trackers' files so far
        try:
            folder.check_no_foreign(REPLACED_NAMES)
        except OutputFolderError as err:
            raise UsageError(f"{err} The trained model is in {find_checkpoint(folder, 'latest')}.") from err
        finish(accelerator, unet, ema, scheduler, args, folder, source)
    del unet, optimizer, loader, lr_scheduler  # before the process group goes (see end_run)
    end_run(accelerator, folder, args)
    return output_dir


def end_run(accelerator: Accelerator, folder: RunFolder, args: argparse.Namespace) -> None:
    """Close the trackers (flushing their files) and the process group; record the log folder's files.

    The caller drops its own references to the prepared model first, and accelerate's go here, so that the
    process group's last reference is the one ``destroy_process_group`` releases, which torch does without the
    GIL. Otherwise a multi-process (DDP) model's reducer keeps the Gloo group alive until the model is freed with
    the GIL held, and the group's destructor then waits for worker threads that need the GIL: a two-process run
    was seen to hang at exit that way (pytorch/pytorch#56297).
    """
    accelerator.free_memory()  # accelerate's references to the prepared model, optimizer and loader; gc.collect()
    accelerator.end_training()
    if accelerator.is_main_process:
        record_logs(folder, args)


def record_logs(folder: RunFolder, args: argparse.Namespace) -> None:
    """Record the files in ``--logging_dir`` (the loss log, the trackers' files) if it lies in the output folder."""
    logs = folder.root / args.logging_dir
    if logs.is_dir() and logs.is_relative_to(folder.root):
        folder.record(logs)


@dataclass(frozen=True)
class TrainingParts:
    """What the training loop steps: the prepared model, optimizer, schedule and data, and the objective."""

    accelerator: Accelerator
    unet: torch.nn.Module
    ema: EMAModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    loader: torch.utils.data.DataLoader
    sampler: EpochSampler
    images: TrainingImages
    objective: DenoisingLoss


class LossLog:
    """``logs/loss.jsonl``: one JSON line per optimizer step, written by the main process (``folder`` given)."""

    def __init__(self, path: Path, folder: RunFolder | None) -> None:
        self.path, self.folder = path, folder

    def truncate(self, step: int) -> None:
        """Forget the steps after ``step`` (logged by a run that was interrupted later than its checkpoint)."""
        if self.folder is None or not self.path.is_file():
            return
        lines = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        partial = self.path.with_name(self.path.name + ".tmp")
        partial.write_text("".join(line + "\n" for line in lines))
        partial.replace(self.path)

    def write(self, step: int, values: dict[str, float]) -> None:
        """Append step ``step``'s values."""
        if self.folder is None:
            return
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if new:
            self.folder.record(self.path)


def train_loop(
    parts: TrainingParts,
    args: argparse.Namespace,
    state: TrainingState,
    max_steps: int,
    folder: RunFolder,
    loss_log: LossLog,
    scheduler: SchedulerMixin,
    command: str,
) -> int:
    """Train from ``state`` to ``max_steps``; returns the last step. Raises :class:`Interrupted` (after saving a
    checkpoint) when SIGINT or SIGTERM arrives."""
    accelerator, unet, ema = parts.accelerator, parts.unet, parts.ema
    global_step, epoch = state.global_step, state.epoch
    first_step, started = global_step, time.monotonic()
    per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    checkpoint = None
    with (
        StopSignals() as stop,
        Progress(max_steps, "training", "step", initial=global_step, disable=not accelerator.is_main_process) as bar,
    ):
        while global_step < max_steps:
            # accelerate's loader sets its sampler's epoch from a pass counter of its own at every pass, which a
            # resumed run restarts at 0: give it the run's epoch, so the order is a function of (seed, epoch).
            parts.loader.set_epoch(epoch)
            parts.sampler.set_epoch(epoch)
            parts.images.set_epoch(epoch)
            skip = state.batch_in_epoch if epoch == state.epoch else 0
            batches = accelerator.skip_first_batches(parts.loader, skip) if skip else parts.loader
            batch_index = skip
            window_losses: list[torch.Tensor] = []
            for batch in batches:
                batch_index += 1
                with accelerator.accumulate(unet):
                    # Noise, times and the global generator (dropout) from (seed, step, micro-batch, process):
                    # identical after a resume.
                    seed = ((args.seed * 1_000_003 + global_step) * 1_009 + batch_index) * 131
                    seed += accelerator.process_index
                    torch.manual_seed(seed)
                    gen = torch.Generator(device="cpu").manual_seed(seed)
                    with accelerator.autocast():
                        loss = parts.objective(unet, batch, generator=gen).loss
                    accelerator.backward(loss)
                    window_losses.append(loss.detach())
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                    parts.optimizer.step()
                    parts.optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                parts.lr_scheduler.step()
                if ema is not None:
                    ema.step(unet.parameters())
                global_step += 1
                # One gather (and one host sync) per step brings every process's loss and stop request.
                asked = torch.tensor(float(stop.received is not None), device=accelerator.device)
                stats = accelerator.gather(torch.stack([torch.stack(window_losses).mean().float(), asked])[None])
                losses, asks = stats.T.tolist()
                window_losses = []
                stopping = max(asks) > 0
                logs = {"loss": sum(losses) / len(losses), "lr": parts.lr_scheduler.get_last_lr()[0]}
                if ema is not None:
                    logs["ema_decay"] = ema.cur_decay_value
                loss_log.write(global_step, logs)
                accelerator.log(logs, step=global_step)
                rate = (global_step - first_step) * per_step / max(time.monotonic() - started, 1e-9)
                bar.update(1, loss=logs["loss"], lr=logs["lr"], img_s=round(rate, 1))
                at_end = global_step >= max_steps
                if stopping or args.checkpointing_steps and (global_step % args.checkpointing_steps == 0 or at_end):
                    at_epoch_end = batch_index >= len(parts.loader)
                    next_epoch, next_batch = (epoch + 1, 0) if at_epoch_end else (epoch, batch_index)
                    checkpoint = save_checkpoint(
                        accelerator,
                        folder,
                        TrainingState(global_step, next_epoch, next_batch),
                        args.checkpoints_total_limit,
                    )
                    if accelerator.is_main_process:
                        record_logs(folder, args)
                if args.save_images_steps and global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                    grid = folder.root / "samples" / f"step-{global_step}.png"
                    write_samples(accelerator, unet, ema, scheduler, args, grid)
                    folder.record(grid)
                if stopping:
                    raise Interrupted(global_step, checkpoint, command)
                if at_end:
                    break
            state = TrainingState(global_step, epoch + 1, 0)
            epoch += 1
    return global_step


def check_hub_repo(accelerator: Accelerator, args: argparse.Namespace) -> None:
    """Create the ``--hub_model_id`` repo before training (main process), so that a missing token or an unreachable
    Hub stops every process now instead of after the run. Raises :class:`publish.HubError` on every process."""
    problem = None
    if accelerator.is_main_process:
        try:
            create_hub_repo(args.hub_model_id, private=args.hub_private_repo)
        except HubError as err:
            problem = str(err)
    problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise HubError(problem)


def _eval_unet(accelerator: Accelerator, unet: torch.nn.Module, ema: EMAModel | None) -> UNet2DModel:
    """A copy of the model with the EMA weights (or the trained ones) for sampling and saving."""
    model = accelerator.unwrap_model(unet)
    copy = UNet2DModel.from_config(model.config).to(accelerator.device)
    copy.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(copy.parameters())
    return copy.eval()


def write_samples(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    ema: EMAModel | None,
    scheduler: sdekit.SDEScheduler,
    args: argparse.Namespace,
    path: Path,
) -> Path:
    """Sample the current (EMA) model, save a PNG grid and log it to the trackers."""
    model = _eval_unet(accelerator, unet, ema)
    step = int(path.stem.split("-")[-1])
    images = sample(model, scheduler, args.num_sample_images, args.sample_steps, args.seed, label=f"samples {step}")
    picture = save_grid(images, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            layout = "HW" if picture.mode == "L" else "HWC"
            tracker.writer.add_image("samples", np.asarray(picture), step, dataformats=layout)
    return path


def finish(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    ema: EMAModel | None,
    scheduler: sdekit.SDEScheduler,
    args: argparse.Namespace,
    folder: RunFolder,
    source: str,
) -> None:
    """Write a sample grid, the pipeline folder that ``DiffusionPipeline.from_pretrained(output_dir)`` loads and
    its model card, recording each in ``folder``; push the folder with ``--push_to_hub``."""
    output_dir = folder.root
    model = _eval_unet(accelerator, unet, ema)
    grid = sample(model, scheduler, args.num_sample_images, args.sample_steps, args.seed, label="final samples")
    save_grid(grid, output_dir / "samples.png")
    folder.record(output_dir / "samples.png")
    save_pipeline(output_dir, model.cpu(), scheduler)
    folder.record(*(output_dir / name for name in PIPELINE_ENTRIES))
    local = {
        "output_dir", "cache_dir", "config", "train_data_dir", "logging_dir", "resume_from_checkpoint",
        "overwrite_output_dir",
    }  # fmt: skip
    write_model_card(
        output_dir,
        sde=args.sde,
        objective=args.objective,
        dataset=args.dataset_name or (Path(args.train_data_dir).name if args.train_data_dir else source),
        hyperparameters={k: v for k, v in vars(args).items() if k not in local},
        sample_grid=output_dir / "samples.png",
        hub_model_id=args.hub_model_id,
        sampler=args.sampler,
    )
    folder.record(output_dir / "README.md")
    if args.push_to_hub:
        push_folder(output_dir, args.hub_model_id, private=args.hub_private_repo)


def run(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main` with a user's mistake, an interrupt or a failed upload reported in one line
    (by the main process) instead of a traceback. Returns the exit status: 0 done, 2 a setting or input to
    change, 130 interrupted (resumable), 1 the upload failed (the output is complete). ``SDEKIT_DEBUG=1`` shows the
    traceback instead."""
    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        main(argv)
    except (UsageError, HubError, Interrupted) as err:
        if os.environ.get("SDEKIT_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(err, Interrupted):
            status, line = 130, f"train.py: {err}"
        else:
            status, line = (1 if isinstance(err, PushError) else 2), f"train.py: error: {err}"
        if rank0:
            print(line, file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(run())
