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
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdekit  # noqa: E402
from sdekit.losses import DenoisingLoss  # noqa: E402

from checkpoints import TrainingState, find_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from data import EMBEDDED_DATASET, ImageTransform, TrainingImages, load_images  # noqa: E402
from evaluate import sample, save_grid  # noqa: E402
from publish import HubError, create_hub_repo, push_folder, save_pipeline, write_model_card  # noqa: E402

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


class UsageError(ValueError):
    """A setting that cannot work on this machine or with these inputs; the message says what to change."""


# -- arguments --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The trainer's flags; defaults are the embedded preset's."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="a YAML preset (e.g. training/configs/default.yaml); flags override it")
    # diffusers' train_unconditional.py names
    a("--output_dir", default="sdekit-model", help="where the pipeline, checkpoints, logs and samples go")
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
    if args.model not in MODEL_PRESETS:
        raise UsageError(f"--model must be one of {', '.join(MODEL_PRESETS)}, got {args.model!r}.")
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


def main(argv: Sequence[str] | None = None) -> Path:
    """Train, then write the pipeline folder (and push it with ``--push_to_hub``); returns the folder."""
    args = parse_args(argv)
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
    args.mixed_precision = accelerator.mixed_precision  # the one in effect, for the logs and the model card
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would silently train in float32: say so instead.
        raise UsageError("--mixed_precision fp16 needs a GPU (on the CPU accelerate ignores it); use bf16 or no.")
    if args.push_to_hub:
        check_hub_repo(accelerator, args)

    # Data: the embedded digits are grayscale; other sources default to RGB.
    source = args.dataset_name or args.train_data_dir or EMBEDDED_DATASET
    channels = args.channels or (1 if source == EMBEDDED_DATASET else 3)
    raw = load_images(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.cache_dir)
    transform = ImageTransform(args.resolution, args.center_crop, args.random_flip, channels)
    images = TrainingImages(
        raw, transform, column=args.image_column, skip_bad_images=args.skip_bad_images, seed=args.seed
    )
    if images.skipped:
        logger.warning("skipped %d unreadable images: %s", len(images.skipped), ", ".join(images.skipped[:10]))
    sampler = EpochSampler(len(images), args.seed)
    loader = torch.utils.data.DataLoader(images, batch_size=args.train_batch_size, sampler=sampler, drop_last=True)

    # Objective and scheduler share one SDE, model time and prediction type.
    scheduler = sdekit.load_scheduler(args.sampler, **scheduler_config(args))
    objective = DenoisingLoss(
        scheduler.sde, args.objective, args.prediction_type, weighting=args.weighting, reduce=args.reduce
    )
    scheduler = sdekit.load_scheduler(args.sampler, **scheduler_config(args, objective.time_input))
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
        path = find_checkpoint(output_dir, args.resume_from_checkpoint)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", output_dir)
        else:
            state = load_checkpoint(accelerator, path)
            logger.info("resumed from %s at step %d", path, state.global_step)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("sdekit-train", config={k: str(v) for k, v in vars(args).items()})
    loss_log = output_dir / args.logging_dir / "loss.jsonl"
    if accelerator.is_main_process:
        loss_log.parent.mkdir(parents=True, exist_ok=True)

    global_step, epoch = state.global_step, state.epoch
    logger.info("training %d steps of %d images (%s, %s objective)", max_steps, len(images), args.sde, args.objective)
    while global_step < max_steps:
        sampler.set_epoch(epoch)
        images.set_epoch(epoch)
        skip = state.batch_in_epoch if epoch == state.epoch else 0
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        batch_index = skip
        window_losses: list[torch.Tensor] = []
        for batch in batches:
            batch_index += 1
            with accelerator.accumulate(unet):
                # Noise and times from (seed, step, micro-batch, process): identical after a resume.
                gen = torch.Generator(device="cpu").manual_seed(
                    ((args.seed * 1_000_003 + global_step) * 1_009 + batch_index) * 131 + accelerator.process_index
                )
                with accelerator.autocast():
                    loss = objective(unet, batch, generator=gen).loss
                accelerator.backward(loss)
                window_losses.append(loss.detach())
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            if ema is not None:
                ema.step(unet.parameters())
            global_step += 1
            step_loss = accelerator.gather(torch.stack(window_losses).mean()[None]).mean().item()
            window_losses = []
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            if accelerator.is_main_process:
                with loss_log.open("a") as f:
                    f.write(json.dumps({"step": global_step, **logs}) + "\n")
            accelerator.log(logs, step=global_step)
            at_end = global_step >= max_steps
            if args.checkpointing_steps and (global_step % args.checkpointing_steps == 0 or at_end):
                next_epoch, next_batch = (epoch + 1, 0) if batch_index >= len(loader) else (epoch, batch_index)
                save_checkpoint(
                    accelerator,
                    output_dir,
                    TrainingState(global_step, next_epoch, next_batch),
                    args.checkpoints_total_limit,
                )
            if args.save_images_steps and global_step % args.save_images_steps == 0 and accelerator.is_main_process:
                write_samples(
                    accelerator, unet, ema, scheduler, args, output_dir / "samples" / f"step-{global_step}.png"
                )
            if at_end:
                break
        state = TrainingState(global_step, epoch + 1, 0)
        epoch += 1

    # Every process records what it trained, so a multi-process run can be checked for agreement.
    fingerprint = float(sum(p.detach().double().sum() for p in accelerator.unwrap_model(unet).parameters()))
    ranks = output_dir / args.logging_dir / f"rank-{accelerator.process_index}.json"
    ranks.parent.mkdir(parents=True, exist_ok=True)
    ranks.write_text(json.dumps({"global_step": global_step, "parameter_sum": fingerprint}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(accelerator, unet, ema, scheduler, args, output_dir, source)
    accelerator.end_training()
    return output_dir


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
    images = sample(model, scheduler, args.num_sample_images, args.sample_steps, args.seed)
    picture = save_grid(images, path)
    step = int(path.stem.split("-")[-1])
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
    output_dir: Path,
    source: str,
) -> None:
    """Write a sample grid, the pipeline folder that ``DiffusionPipeline.from_pretrained(output_dir)`` loads and
    its model card; push the folder with ``--push_to_hub``."""
    model = _eval_unet(accelerator, unet, ema)
    grid = sample(model, scheduler, args.num_sample_images, args.sample_steps, args.seed)
    save_grid(grid, output_dir / "samples.png")
    save_pipeline(output_dir, model.cpu(), scheduler)
    local = {"output_dir", "cache_dir", "config", "train_data_dir", "logging_dir", "resume_from_checkpoint"}
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
    if args.push_to_hub:
        push_folder(output_dir, args.hub_model_id, private=args.hub_private_repo)


if __name__ == "__main__":
    try:
        main()
    except (HubError, UsageError) as err:  # a clear message, not a traceback: the output (if any) is intact
        sys.exit(f"train.py: error: {err}")
