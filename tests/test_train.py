"""The accelerate trainer: presets, smoke runs per objective, exact resume, atomic checkpoints, two processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import train  # noqa: E402
from checkpoints import list_checkpoints  # noqa: E402
from conftest import TINY_TRAINING, launch_two_processes, run_process_tree  # noqa: E402

TINY = TINY_TRAINING


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _losses(out: Path) -> dict[int, float]:
    """Logged loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    lines = (out / "logs" / "loss.jsonl").read_text().splitlines()
    return {entry["step"]: entry["loss"] for entry in map(json.loads, lines)}


def test_presets_load_and_flags_override(tmp_path: Path) -> None:
    for preset in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        args = train.parse_args(["--config", str(preset)])
        assert args.sde in ("vp", "subvp", "ve")
    args = train.parse_args(["--config", "default.yaml", "--max_train_steps", "7"])
    assert args.max_train_steps == 7 and args.channels == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"learning_rat": 0.1}))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(bad)])
    with pytest.raises(SystemExit):
        train.parse_args(["--push_to_hub"])  # needs --hub_model_id


@pytest.mark.parametrize(
    "flags",
    [
        ["--sde", "vp", "--objective", "dsm"],
        ["--sde", "subvp", "--objective", "dsm", "--sde_params", '{"beta_min": 0.1, "beta_max": 20.0}'],
        ["--sde", "ve", "--objective", "dsm", "--sampler", "pc"],
        ["--sde", "ve", "--objective", "smld", "--sampler", "pc"],
        ["--sde", "vp", "--objective", "ddpm", "--prediction_type", "v_prediction", "--sampler", "ddim"],
    ],
    ids=["vp-dsm", "subvp-dsm", "ve-dsm", "ve-smld", "ddpm-v"],
)
def test_smoke_run_writes_a_loadable_pipeline(tmp_path: Path, flags: list[str]) -> None:
    out = tmp_path / "out"
    train.main([*TINY, *flags, "--output_dir", str(out), "--max_train_steps", "3", "--checkpointing_steps", "2"])
    assert sorted(p.name for p in list_checkpoints(out)) == ["checkpoint-2", "checkpoint-3"]
    assert len(_losses(out)) == 3 and all(torch.isfinite(torch.tensor(v)) for v in _losses(out).values())
    pipe = DiffusionPipeline.from_pretrained(out)
    sampler = flags[flags.index("--sampler") + 1] if "--sampler" in flags else "pf-ode"
    assert type(pipe.scheduler) is train.sdekit.get_sampler_class(sampler)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert (out / "samples.png").is_file() and "sdekit" in (out / "README.md").read_text()


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def _assert_same_run(a: Path, b: Path) -> None:
    """Same per-step losses and final weights, to far below the ~1e-3 a different data order gives."""
    la, lb = _losses(a), _losses(b)
    assert la.keys() == lb.keys() and all(la[k] == pytest.approx(lb[k], rel=1e-6, abs=1e-8) for k in la)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def _epoch_flags(folder: Path, accumulation: int) -> list[str]:
    # 20 images in batches of 8: 2 batches an epoch, so 2 / accumulation optimizer steps an epoch.
    return [
        *TINY, "--train_data_dir", str(folder), "--channels", "1", "--random_flip",
        "--gradient_accumulation_steps", str(accumulation), "--checkpoints_total_limit", "10",
    ]  # fmt: skip


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_before_an_epoch_boundary_continues_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digit_folder: Path, accumulation: int
) -> None:
    # One step an epoch with accumulation 2, two without; checkpoint-3 lies before the boundary either way for
    # accumulation 1 (mid-epoch 1) and on it for 2, and the resumed run crosses several more.
    common = [*_epoch_flags(digit_folder, accumulation), "--max_train_steps", "7", "--checkpointing_steps", "3"]
    whole = tmp_path / "whole"
    train.main([*common, "--output_dir", str(whole)])

    parts = tmp_path / "parts"
    real_write = train.LossLog.write

    def killed_at_step_6(self, step, values):  # noqa: ANN001, ANN202
        if step == 6:
            raise KeyboardInterrupt("killed after logging step 5, long after checkpoint-3")
        return real_write(self, step, values)

    monkeypatch.setattr(train.LossLog, "write", killed_at_step_6)
    with pytest.raises(train.Interrupted):
        train.main([*common, "--output_dir", str(parts), "--checkpointing_steps", "3"])
    assert sorted(_losses(parts)) == [1, 2, 3, 4, 5] and [p.name for p in list_checkpoints(parts)] == ["checkpoint-3"]
    monkeypatch.setattr(train.LossLog, "write", real_write)
    AcceleratorState._reset_state(True)
    train.main([*common, "--output_dir", str(parts), "--resume_from_checkpoint", "latest"])

    lines = (parts / "logs" / "loss.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 8))  # steps 4 and 5 are not logged twice
    _assert_same_run(whole, parts)


def test_a_different_data_order_is_seen(tmp_path: Path, digit_folder: Path) -> None:
    """The comparison above can fail: another epoch order (another seed for the shuffle only) changes the run."""
    common = [*_epoch_flags(digit_folder, 1), "--max_train_steps", "4", "--checkpointing_steps", "0"]
    train.main([*common, "--output_dir", str(tmp_path / "a")])
    AcceleratorState._reset_state(True)
    real_iter = train.EpochSampler.__iter__
    train.EpochSampler.__iter__ = lambda self: iter(list(real_iter(self))[::-1])
    try:
        train.main([*common, "--output_dir", str(tmp_path / "b")])
    finally:
        train.EpochSampler.__iter__ = real_iter
    with pytest.raises(AssertionError):
        _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_two_processes_resume_before_an_epoch_boundary_exactly(tmp_path: Path, digit_folder: Path) -> None:
    # Each process takes one of the two batches an epoch: one optimizer step an epoch, so the resumed run from
    # checkpoint-2 crosses three epoch boundaries.
    common = [*_epoch_flags(digit_folder, 1), "--max_train_steps", "5", "--checkpointing_steps", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _launch_two(common, whole)
    shutil.copytree(whole, parts)
    _launch_two([*common, "--resume_from_checkpoint", "checkpoint-2"], parts)
    _assert_same_run(whole, parts)
    ranks = [json.loads((parts / "logs" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["global_step"] == 5


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    common = [*TINY, "--output_dir", str(out), "--checkpointing_steps", "2", "--max_train_steps", "4"]
    real_save_state = train.Accelerator.save_state

    def half_written(self, output_dir=None, **kwargs):  # noqa: ANN001, ANN202
        if str(output_dir).endswith(".checkpoint-4.tmp"):
            Path(output_dir).mkdir(parents=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"truncated")
            raise KeyboardInterrupt("killed while saving checkpoint-4")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(train.Accelerator, "save_state", half_written)
    with pytest.raises(train.Interrupted):
        train.main(common)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / ".checkpoint-4.tmp").is_dir()
    monkeypatch.setattr(train.Accelerator, "save_state", real_save_state)
    AcceleratorState._reset_state(True)
    train.main([*common, "--resume_from_checkpoint", "latest"])
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not (out / ".checkpoint-4.tmp").exists()
    assert sorted(_losses(out)) == [1, 2, 3, 4]


def test_mixed_precision_trains_in_bf16_and_refuses_fp16_on_the_cpu(tmp_path: Path) -> None:
    common = [*TINY, "--max_train_steps", "3", "--checkpointing_steps", "0"]
    train.main([*common, "--output_dir", str(tmp_path / "fp32"), "--mixed_precision", "no"])
    AcceleratorState._reset_state(True)
    train.main([*common, "--output_dir", str(tmp_path / "bf16"), "--mixed_precision", "bf16"])
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    # bf16 autocast really ran (the losses move by its rounding) and trained the same model (they stay close).
    assert fp32 != bf16 and bf16.keys() == fp32.keys()
    assert all(abs(bf16[k] - fp32[k]) < 0.05 * fp32[k] for k in fp32)
    weights = load_file(tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())  # fp32 master weights
    assert "| mixed_precision | bf16 |" in (tmp_path / "bf16" / "README.md").read_text()
    AcceleratorState._reset_state(True)
    fp16 = [*common, "--output_dir", str(tmp_path / "fp16"), "--mixed_precision", "fp16"]
    if torch.cuda.is_available():
        train.main(fp16)
        assert len(_losses(tmp_path / "fp16")) == 3
    else:  # accelerate would silently train in float32 here
        with pytest.raises(train.UsageError, match="fp16 needs a GPU"):
            train.main(fp16)


def test_learning_rate_schedule_counts_optimizer_steps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train.main([
        *TINY, "--output_dir", str(out), "--gradient_accumulation_steps", "2", "--max_train_steps", "4",
        "--lr_warmup_steps", "2", "--lr_scheduler", "linear", "--learning_rate", "0.01", "--checkpointing_steps", "0",
    ])  # fmt: skip
    lrs = [json.loads(line)["lr"] for line in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    # Warm-up over 2 optimizer steps, then linear decay to 0 at step 4 (not 4 x 2 micro-batches).
    assert lrs == pytest.approx([0.005, 0.01, 0.005, 0.0])


def _launch_two(
    flags: list[str], out: Path, script: Path = ROOT / "training" / "train.py"
) -> subprocess.CompletedProcess[str]:
    cmd = [*launch_two_processes(script), *flags, "--output_dir", str(out)]
    run = run_process_tree(cmd, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


# train.py's command line, with a count of the DDP modules still alive when the process group is destroyed.
COUNTING_TRAINER = """
import gc, sys
sys.path.insert(0, {training!r})
import accelerate
from torch.nn.parallel import DistributedDataParallel
import train

end_training = accelerate.Accelerator.end_training

def counting(self):
    live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    with open(f"{{sys.argv[-1]}}.ddp-{{self.process_index}}", "w") as f:
        f.write(str(live))
    return end_training(self)

accelerate.Accelerator.end_training = counting
sys.exit(train.run(sys.argv[1:]))
"""


def test_two_processes_step_the_same_model_and_let_go_of_it_before_the_process_group(tmp_path: Path) -> None:
    """Both processes train the same model. No DDP module outlives ``end_training``: a DDP reducer freed after
    the Gloo process group was destroyed takes the group down with the GIL held, and a worker thread that needs
    the GIL then hangs the process at exit (pytorch/pytorch#56297; seen once in this test)."""
    out = tmp_path / "out"
    script = tmp_path / "counting_train.py"
    script.write_text(COUNTING_TRAINER.format(training=str(ROOT / "training")))
    _launch_two([*TINY, "--max_train_steps", "3", "--checkpointing_steps", "0"], out, script)
    ranks = [json.loads((out / "logs" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert ranks[0] == ranks[1] and ranks[0]["global_step"] == 3
    assert DiffusionPipeline.from_pretrained(out).unet is not None
    assert [(tmp_path / f"out.ddp-{i}").read_text() for i in range(2)] == ["0", "0"]
