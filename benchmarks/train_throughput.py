"""Training throughput: images per second of ``training/train.py`` against diffusers' own example trainer.

Both trainers train the same ``UNet2DModel`` (one config JSON, from our ``--model`` presets) on the same image
folder (the embedded scikit-learn digits written out as RGB PNGs), at the same resolution, batch, optimizer (the
peer's defaults: AdamW, lr 1e-4 cosine after 500 warm-up steps, betas 0.95 / 0.999, weight decay 1e-6), gradient
clipping (1.0), EMA, random-flip setting and objective (ours ``--objective ddpm --prediction_type epsilon`` is the
peer's ``L_simple``), in float32, with no checkpoint or sample grid inside the measured steps. Each logs its loss
once per optimizer step to tensorboard through accelerate (``SummaryWriter.add_scalar``, whose event ``wall_time``
is taken at the call); the benchmark reads those events and computes, per run:

- ``median img/s``: batch / the median interval between consecutive steps, the headline number;
- ``mean img/s``: images / time summed over the same intervals (pulled down by any pause);
- ``slow``: how many of those intervals took over twice the median, and ``load``, the 1-minute load average after
  the run (about 2 for one trainer on 2 cores): both show when other processes shared the machine.

Both skip the first ``--warmup`` steps, the first step of every epoch (its interval holds the epoch's end: a new
data iterator, and the peer's sample grid after epoch 0) and the peer's smaller last batch of each epoch (ours drops
it). Runs are interleaved (ours, peer, ours, peer, ...) so that other load on the machine hits both alike; the ratio
is median over repeats of ours / median over repeats of the peer's (target: >= 1). Both are started the same way
(this interpreter, plain ``python``, default torch threads, ``HF_HUB_OFFLINE=1``).

The peer is diffusers' ``examples/unconditional_image_generation/train_unconditional.py``. It is not in the diffusers
package: take it from a diffusers checkout at the installed version's tag, and run it unmodified::

    git clone --depth 1 --branch v<diffusers version> https://github.com/huggingface/diffusers /tmp/diffusers

It needs torchvision, which does not import beside the project's torch 2.13.0 CPU build, so both trainers run in a
separate venv (git-ignored ``.venv-bench``; about 5.5 GB, the CUDA build of torch 2.14.1, which runs on the CPU;
``.[test]`` brings tensorboard)::

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-bench/bin/pip install -e '.[test]'
    .venv-bench/bin/python benchmarks/train_throughput.py --diffusers_example /tmp/diffusers
        [--model tiny small] [--steps 100] [--batch 64] [--repeats 3] [--objective ddpm dsm]

``--diffusers_example`` (or ``SDEKIT_DIFFUSERS_EXAMPLE``) is the script itself or the checkout's root. The default
(``tiny`` at 16 x 16 x 3, batch 64, 100 steps, 3 repeats) takes about three minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_TRAINER = ROOT / "training" / "train.py"
PEER_IN_CHECKOUT = Path("examples") / "unconditional_image_generation" / "train_unconditional.py"
ENV_VAR = "SDEKIT_DIFFUSERS_EXAMPLE"
BUSY_LOAD = 2.5
"""A 1-minute load average above this after a run means something else was running (one trainer makes about 2)."""
VENV_HINT = (
    "python3.11 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 && "
    ".venv-bench/bin/pip install -e '.[test]'"
)


@dataclass(frozen=True)
class Setup:
    """What both trainers share: data, model, batch, steps and the settings passed to each."""

    data_dir: Path
    num_images: int
    unet_config: Path
    batch: int
    steps: int
    warmup: int
    resolution: int
    random_flip: bool
    cache_dir: Path


@dataclass(frozen=True)
class Run:
    """One trainer run's throughput, from its tensorboard loss events."""

    trainer: str
    median_ips: float
    mean_ips: float
    intervals: int
    slow: int
    wall_s: float
    load: float


# -- set-up ---------------------------------------------------------------------------------------------------


def find_peer(given: str | None) -> Path:
    """The peer script from ``--diffusers_example`` or ``$SDEKIT_DIFFUSERS_EXAMPLE`` (the file or a checkout root);
    exits with how to get it when missing."""
    import diffusers

    where = given or os.environ.get(ENV_VAR)
    path = Path(where).expanduser() if where else None
    if path is not None and path.is_dir():
        path = path / PEER_IN_CHECKOUT
    if path is None or not path.is_file():
        tag = f"v{diffusers.__version__}"
        found = f"{path} does not exist. " if path is not None else ""
        sys.exit(
            f"train_throughput.py: error: {found}Pass --diffusers_example PATH (or set {ENV_VAR}) to diffusers' "
            f"{PEER_IN_CHECKOUT} or to a diffusers checkout holding it. It is not in the diffusers package; get the "
            f"version matching the installed diffusers with:\n"
            f"    git clone --depth 1 --branch {tag} https://github.com/huggingface/diffusers /tmp/diffusers\n"
            f"and pass --diffusers_example /tmp/diffusers (the script is run unmodified)."
        )
    return path.resolve()


def check_interpreter() -> None:
    """Exit with the venv recipe when this interpreter cannot run the peer (it needs torchvision)."""
    try:
        import tensorboard  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as err:
        sys.exit(
            f"train_throughput.py: error: {err}. Both trainers run in this interpreter and diffusers' example needs "
            f"torchvision (and tensorboard for the logs); torchvision does not import beside the project's torch "
            f"2.13.0 CPU build. Make a separate venv and run the benchmark with it:\n    {VENV_HINT}"
        )


def export_digits(folder: Path) -> int:
    """Write the embedded training images (scikit-learn's 8 x 8 digits) as RGB PNGs; returns how many."""
    sys.path.insert(0, str(ROOT / "training"))
    from data import load_images

    folder.mkdir(parents=True, exist_ok=True)
    images = load_images()["image"]
    for index, image in enumerate(images):
        image.convert("RGB").save(folder / f"{index:05d}.png")
    return len(images)


def write_unet_config(model: str, resolution: int, folder: Path) -> int:
    """Write ``folder/config.json``, the ``UNet2DModel`` config of our ``model`` preset (3 channels); returns its
    parameter count."""
    sys.path.insert(0, str(ROOT / "training"))
    from diffusers import UNet2DModel

    from train import MODEL_PRESETS

    if model not in MODEL_PRESETS:
        sys.exit(f"train_throughput.py: error: --model {model!r}: choose from {', '.join(MODEL_PRESETS)}")
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, **MODEL_PRESETS[model])
    unet.save_config(folder)  # diffusers' own config.json, as a Hub model folder holds it
    return sum(p.numel() for p in unet.parameters())


# -- the two trainers -----------------------------------------------------------------------------------------


def shared_flags(setup: Setup) -> list[str]:
    """Flags with the same name and meaning in both trainers."""
    flags = [
        "--train_data_dir", str(setup.data_dir),
        "--cache_dir", str(setup.cache_dir),
        "--resolution", str(setup.resolution),
        "--center_crop",
        "--train_batch_size", str(setup.batch),
        "--gradient_accumulation_steps", "1",
        "--learning_rate", "1e-4",
        "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "500",
        "--adam_beta1", "0.95",
        "--adam_beta2", "0.999",
        "--adam_weight_decay", "1e-6",
        "--adam_epsilon", "1e-8",
        "--use_ema",
        "--ema_inv_gamma", "1.0",
        "--ema_power", "0.75",
        "--ema_max_decay", "0.9999",
        "--mixed_precision", "no",
    ]  # fmt: skip
    return flags + (["--random_flip"] if setup.random_flip else [])


def our_command(setup: Setup, objective: str, output_dir: Path) -> list[str]:
    """``training/train.py`` for ``setup.steps`` optimizer steps, no checkpoint, no sample grid while training."""
    return [sys.executable, str(OUR_TRAINER), *shared_flags(setup),
            "--output_dir", str(output_dir),
            "--model_config", str(setup.unet_config), "--channels", "3",
            "--objective", objective, "--prediction_type", "epsilon",
            "--max_train_steps", str(setup.steps),
            "--checkpointing_steps", "0", "--save_images_steps", "0",
            "--sample_steps", "2", "--num_sample_images", "4",
            "--report_to", "tensorboard"]  # fmt: skip


def peer_steps_per_epoch(setup: Setup) -> int:
    """The peer keeps the last, smaller batch of an epoch (its DataLoader has no ``drop_last``)."""
    return math.ceil(setup.num_images / setup.batch)


def our_steps_per_epoch(setup: Setup) -> int:
    """Ours drops the last, smaller batch of an epoch."""
    return setup.num_images // setup.batch


def peer_command(setup: Setup, script: Path, output_dir: Path) -> list[str]:
    """diffusers' example for enough whole epochs to cover ``setup.steps``; it samples (2 steps, 4 images) and saves
    only after epoch 0 and the last epoch, and never checkpoints."""
    epochs = math.ceil(setup.steps / peer_steps_per_epoch(setup))
    return [sys.executable, str(script), *shared_flags(setup),
            "--output_dir", str(output_dir),
            "--model_config_name_or_path", str(setup.unet_config),
            "--prediction_type", "epsilon", "--ddpm_num_steps", "1000", "--ddpm_beta_schedule", "linear",
            "--num_epochs", str(epochs),
            "--checkpointing_steps", str(10**9),
            "--save_images_epochs", str(10**9), "--save_model_epochs", str(10**9),
            "--ddpm_num_inference_steps", "2", "--eval_batch_size", "4",
            "--logger", "tensorboard"]  # fmt: skip


def run_trainer(command: list[str], log: Path) -> tuple[float, float]:
    """Run one trainer to the end (output in ``log``); returns its wall time and the machine's 1-minute load average
    at its end (about 1 with nothing else running); exits with the log's tail on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    output_dir = Path(command[command.index("--output_dir") + 1])
    shutil.rmtree(output_dir, ignore_errors=True)  # a reused --workdir: one run's events per folder
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    wall = time.perf_counter() - start
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        sys.exit(f"train_throughput.py: error: {command[1]} exited with {code}; the end of {log}:\n{tail}")
    return wall, os.getloadavg()[0]


# -- measurement ----------------------------------------------------------------------------------------------


def loss_wall_times(logging_dir: Path) -> dict[int, float]:
    """``{step: wall_time}`` of the ``loss`` scalar in the one tensorboard event file under ``logging_dir`` with it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = []
    for path in sorted(logging_dir.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        if "loss" in events.Tags()["scalars"]:
            found.append({e.step: e.wall_time for e in events.Scalars("loss")})
    if len(found) != 1:
        sys.exit(
            f"train_throughput.py: error: expected one event file with a loss scalar in {logging_dir}, found "
            f"{len(found)}"
        )
    return found[0]


def throughput(
    trainer: str,
    wall_times: dict[int, float],
    setup: Setup,
    steps_per_epoch: int,
    partial_last: bool,
    process: tuple[float, float],
) -> Run:
    """Images/s from the intervals between consecutive steps ``warmup + 1 .. steps``, leaving out each epoch's first
    step (its interval holds the epoch's end) and, with ``partial_last``, each epoch's last, smaller batch."""
    missing = [k for k in range(1, setup.steps + 1) if k not in wall_times]
    if missing:
        sys.exit(f"train_throughput.py: error: {trainer} logged no loss for steps {missing[:5]}...")
    intervals = []
    for step in range(max(setup.warmup, 1) + 1, setup.steps + 1):
        if (step - 1) % steps_per_epoch == 0:
            continue
        if partial_last and step % steps_per_epoch == 0 and setup.num_images % setup.batch:
            continue
        intervals.append(wall_times[step] - wall_times[step - 1])
    if not intervals:
        sys.exit("train_throughput.py: error: no step left to measure; raise --steps or lower --warmup")
    return Run(
        trainer=trainer,
        median_ips=setup.batch / statistics.median(intervals),
        mean_ips=setup.batch * len(intervals) / sum(intervals),
        intervals=len(intervals),
        slow=sum(interval > 2 * statistics.median(intervals) for interval in intervals),
        wall_s=process[0],
        load=process[1],
    )


def measure_ours(setup: Setup, objective: str, work: Path, tag: str) -> Run:
    """One run of ``training/train.py``."""
    out = work / f"ours-{objective}-{tag}"
    process = run_trainer(our_command(setup, objective, out), work / f"ours-{objective}-{tag}.log")
    times = loss_wall_times(out / "logs")
    return throughput(f"sdekit train.py ({objective})", times, setup, our_steps_per_epoch(setup), False, process)


def measure_peer(setup: Setup, script: Path, work: Path, tag: str) -> Run:
    """One run of diffusers' example."""
    out = work / f"peer-{tag}"
    process = run_trainer(peer_command(setup, script, out), work / f"peer-{tag}.log")
    times = loss_wall_times(out / "logs")
    return throughput("diffusers train_unconditional.py", times, setup, peer_steps_per_epoch(setup), True, process)


# -- report ---------------------------------------------------------------------------------------------------


def print_header() -> None:
    """The column names of :func:`print_run`."""
    print(
        f"{'run':<5}{'trainer':<36}{'median img/s':>14}{'mean img/s':>12}{'steps':>7}{'slow':>6}{'wall s':>8}"
        f"{'load':>6}",
        flush=True,
    )


def print_run(repeat: int, run: Run) -> None:
    """One line per run. ``steps``: the intervals measured; ``slow``: how many took over twice the median (pauses,
    mostly from other processes); ``wall s``: the whole process, start-up and final save included; ``load``: the
    1-minute load average at its end."""
    print(
        f"{repeat + 1:<5}{run.trainer:<36}{run.median_ips:>14.1f}{run.mean_ips:>12.1f}{run.intervals:>7}{run.slow:>6}"
        f"{run.wall_s:>8.1f}{run.load:>6.2f}",
        flush=True,
    )


def summarize(runs: list[Run], peer_name: str) -> dict[str, float]:
    """Print the median over repeats per trainer and each of ours against the peer; returns the ratios."""
    names = list(dict.fromkeys(run.trainer for run in runs))
    median = {n: statistics.median(r.median_ips for r in runs if r.trainer == n) for n in names}
    mean = {n: statistics.median(r.mean_ips for r in runs if r.trainer == n) for n in names}
    print(f"\n{'median over repeats':<36}{'median img/s':>14}{'mean img/s':>12}{'ours / diffusers':>18}")
    ratios = {}
    for name in names:
        ratio = median[name] / median[peer_name]
        shown = "" if name == peer_name else f"{ratio:.3f}"
        if name != peer_name:
            ratios[name] = ratio
        print(f"{name:<36}{median[name]:>14.1f}{mean[name]:>12.1f}{shown:>18}")
    return ratios


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, set up the shared data and models, run the interleaved repeats, print the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers_example", default=None, help=f"the peer script or a diffusers checkout (${ENV_VAR})")
    p.add_argument("--model", nargs="+", default=["tiny"], help="our UNet presets to compare on (e.g. tiny small)")
    p.add_argument("--batch", type=int, default=64, help="--train_batch_size of both")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps measured in each run")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs of each trainer")
    p.add_argument("--objective", nargs="+", default=["ddpm"], choices=["ddpm", "dsm"], help="our objective(s)")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--workdir", default=None, help="keep data, configs, outputs and logs here (default: a temp dir)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch and --repeats must be >= 1, --steps >= 2, --warmup >= 0")

    check_interpreter()
    script = find_peer(args.diffusers_example)
    import diffusers
    import torch

    keep = contextlib.nullcontext(args.workdir) if args.workdir else None
    with keep or tempfile.TemporaryDirectory(prefix="sdekit-throughput-") as folder:
        work = Path(folder).resolve()
        work.mkdir(parents=True, exist_ok=True)
        num_images = export_digits(work / "data" / "train")
        if num_images < args.batch:
            p.error(f"--batch {args.batch} is larger than the {num_images} training images")
        digest = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
        print(f"peer: {script} (sha256 {digest}...)")
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
            f"diffusers {diffusers.__version__}; python {sys.executable}"
        )
        ratios: dict[str, dict[str, float]] = {}
        for model in args.model:
            config = work / f"unet-{model}" / "config.json"
            params = write_unet_config(model, args.resolution, config.parent)
            setup = Setup(
                work / "data",
                num_images,
                config,
                args.batch,
                args.steps,
                args.warmup,
                args.resolution,
                args.random_flip,
                work / "datasets-cache",
            )
            print(
                f"\nUNet `{model}` ({params / 1e6:.2f} M parameters), {args.resolution}x{args.resolution}x3, batch "
                f"{args.batch}, {num_images} images, steps {args.warmup + 1}..{args.steps} measured, random flip "
                f"{'on' if args.random_flip else 'off'}, EMA on, float32, {args.repeats} interleaved repeats"
            )
            print_header()
            runs: list[Run] = []
            for repeat in range(args.repeats):
                for objective in args.objective:
                    runs.append(measure_ours(setup, objective, work, f"{model}-{repeat}"))
                    print_run(repeat, runs[-1])
                runs.append(measure_peer(setup, script, work, f"{model}-{repeat}"))
                print_run(repeat, runs[-1])
            ratios[model] = summarize(runs, runs[-1].trainer)
            busiest = max(run.load for run in runs)
            if busiest > BUSY_LOAD:
                print(
                    f"note: the load average reached {busiest:.1f} (about 2 is this benchmark alone): other processes "
                    "shared the cores, so the img/s are low and noisy; the interleaved ratio is what to read, and a "
                    "re-run on a quiet machine gives the absolute numbers"
                )
        print("\nratio ours / diffusers (median img/s, median over repeats; target >= 1.0):")
        for model, by_trainer in ratios.items():
            for name, ratio in by_trainer.items():
                print(f"  {model:<8}{name:<36}{ratio:.3f}")


if __name__ == "__main__":
    main()
