"""The trainer never loses a user's work: a guarded output folder, clean interrupts and one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState
from diffusers import DiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import train  # noqa: E402
from checkpoints import find_checkpoint, list_checkpoints  # noqa: E402
from conftest import TINY_TRAINING, launch_two_processes  # noqa: E402
from run_folder import MANIFEST, RunFolder  # noqa: E402

TINY = TINY_TRAINING
SCRIPT = ROOT / "training" / "train.py"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _user_files(folder: Path) -> dict[str, bytes]:
    """A user's own files in ``folder``, including names the trainer writes."""
    files = {
        "README.md": b"# my notes\n",
        "samples.png": b"not really a png",
        "unet/my_weights.bin": b"\x00weights",
        "notes/todo.txt": b"keep me",
    }
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _intact(folder: Path, files: dict[str, bytes]) -> bool:
    return all((folder / name).read_bytes() == data for name, data in files.items())


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The command line in this process: exit status and what it printed to stderr."""
    AcceleratorState._reset_state(True)
    capsys.readouterr()
    status = train.run(argv)
    return status, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- the output folder -----------------------------------------------------------------------------------


def test_a_folder_of_user_files_is_refused_and_left_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    files = _user_files(out)
    status, err = _run([*TINY, "--output_dir", str(out), "--max_train_steps", "2"], capsys)
    assert status == 2 and "is not empty and holds no sdekit training run" in _error_line(err)
    assert "--overwrite_output_dir" in _error_line(err)
    # With --overwrite_output_dir it would still replace README.md, samples.png and unet/: refused, naming them.
    status, err = _run([*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--overwrite_output_dir"], capsys)
    line = _error_line(err)
    assert status == 2 and "README.md, samples.png, unet/my_weights.bin" in line and "notes" not in line
    assert _intact(out, files) and sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "notes",
        "samples.png",
        "unet",
    ]


def test_overwrite_trains_beside_unrelated_user_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("keep me")
    train.main([*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--overwrite_output_dir"])
    assert (out / "notes" / "todo.txt").read_text() == "keep me"
    recorded = set(json.loads((out / MANIFEST).read_text())["files"])
    assert "notes/todo.txt" not in recorded and "unet/diffusion_pytorch_model.safetensors" in recorded
    assert DiffusionPipeline.from_pretrained(out).unet is not None


def test_an_earlier_run_is_resumed_or_overwritten_never_mixed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    common = [*TINY, "--output_dir", str(out)]
    train.main([*common, "--max_train_steps", "4", "--checkpointing_steps", "2"])
    (out / "notes.txt").write_text("mine")
    first_run = json.loads((out / MANIFEST).read_text())["run_id"]

    status, err = _run([*common, "--max_train_steps", "3"], capsys)
    line = _error_line(err)
    assert status == 2 and "holds an earlier training run (checkpoints: checkpoint-2, checkpoint-4)" in line
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line

    AcceleratorState._reset_state(True)
    train.main([*common, "--max_train_steps", "3", "--checkpointing_steps", "3", "--overwrite_output_dir"])
    # The earlier run's checkpoints and log are gone, the user's file is not.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-3"]
    assert [json.loads(x)["step"] for x in (out / "logs" / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MANIFEST).read_text())["run_id"] != first_run


def test_latest_considers_only_the_resumed_runs_checkpoints(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path, "this-run")
    for step, run_id in ((2, "this-run"), (5, "another-run")):
        checkpoint = tmp_path / f"checkpoint-{step}"
        checkpoint.mkdir()
        state = {"global_step": step, "epoch": 0, "batch_in_epoch": step, "run_id": run_id}
        (checkpoint / "training_state.json").write_text(json.dumps(state))
    assert find_checkpoint(folder, "latest") == tmp_path / "checkpoint-2"
    assert find_checkpoint(RunFolder(tmp_path, "a-third-run"), "latest") is None


def test_a_file_added_to_the_runs_folders_stops_the_final_save(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    common = [*TINY, "--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "2"]
    train.main(common)
    (out / "unet" / "my_weights.bin").write_bytes(b"mine")
    status, err = _run([*common, "--resume_from_checkpoint", "latest"], capsys)
    assert status == 2 and "unet/my_weights.bin" in _error_line(err)
    assert (out / "unet" / "my_weights.bin").read_bytes() == b"mine"


# -- one-line errors ---------------------------------------------------------------------------------------


def _bad_image_folder(tmp_path: Path, digit_folder: Path) -> Path:
    folder = tmp_path / "images"
    shutil.copytree(digit_folder, folder)
    (folder / "digit-03.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


@pytest.mark.parametrize(
    "case",
    ["missing-data-dir", "empty-data-dir", "offline-dataset", "corrupt-image", "missing-checkpoint", "sampler", "sde"],
)
def test_user_mistakes_end_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], digit_folder: Path, case: str
) -> None:
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    flags, expected = {
        "missing-data-dir": (["--train_data_dir", str(tmp_path / "nope")], "nope does not exist"),
        "empty-data-dir": (["--train_data_dir", str(tmp_path / "empty")], "holds no image files"),
        "offline-dataset": (["--dataset_name", "no-such-user/no-such-set"], "cannot load dataset"),
        "corrupt-image": (
            ["--train_data_dir", str(_bad_image_folder(tmp_path, digit_folder))],
            "digit-03.png",
        ),
        "missing-checkpoint": (["--resume_from_checkpoint", "checkpoint-99"], "checkpoint-99 does not exist"),
        "sampler": (["--sampler", "pf_ode"], "Did you mean 'pf-ode'"),
        "sde": (["--sde", "vpp"], "Did you mean 'vp'"),
    }[case]
    status, err = _run([*TINY, "--output_dir", str(out), "--max_train_steps", "2", *flags], capsys)
    assert status == 2
    assert expected in _error_line(err)
    assert "Traceback" not in err
    # Nothing was written, so the corrected command runs in the same folder.
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], [MANIFEST])
    AcceleratorState._reset_state(True)
    train.main([*TINY, "--output_dir", str(out), "--max_train_steps", "1"])


def test_the_command_line_prints_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), *TINY, "--output_dir", str(tmp_path / "out"), "--train_data_dir", "nope"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 2
    assert (
        run.stderr.strip() == "train.py: error: --train_data_dir nope does not exist; pass the folder that holds "
        "the images."
    )
    debug = subprocess.run(cmd, capture_output=True, text=True, env={**env, "SDEKIT_DEBUG": "1"}, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError" in debug.stderr


# -- interrupts ----------------------------------------------------------------------------------------------


def _interrupt_when_logged(cmd: list[str], out: Path, steps: int, sig: int = signal.SIGINT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group and send ``sig`` to the whole group (as a terminal's Ctrl-C does)
    once ``steps`` steps are logged."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDEKIT_PROGRESS": "lines"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    log = out / "logs" / "loss.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run logged no steps in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_stops_at_a_step_with_a_checkpoint_and_the_resume_command(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "out"
    flags = [*TINY, "--output_dir", str(out), "--max_train_steps", "100", "--checkpointing_steps", "0"]
    proc = _interrupt_when_logged([sys.executable, str(SCRIPT), *flags], out, steps=3, sig=sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    # The effective configuration (mixed precision included) at the start, then progress as plain lines.
    assert "1 process(es) on cpu, mixed precision no)" in err and "  train_batch_size            8" in err
    progress = [x for x in err.splitlines() if x.startswith("training: ")]
    assert progress and all("\r" not in x and " loss=" in x and " lr=" in x and " img_s=" in x for x in progress)
    line = [x for x in err.splitlines() if x.startswith("train.py: interrupted at step ")]
    assert len(line) == 1, err[-3000:]
    step = int(line[0].split("interrupted at step ")[1].split(";")[0])
    assert 3 <= step < 100
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step}"]
    steps = [json.loads(x)["step"] for x in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    argv = shlex.split(line[0].split("resume with: ")[1])
    assert argv[0] == "python" and argv[2:] == [*flags, "--resume_from_checkpoint", "latest"]
    if sig == signal.SIGTERM:
        return
    # The printed command, run as it is, finishes the run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    resumed = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in resumed.stderr
    steps = [json.loads(x)["step"] for x in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 101))


def test_a_hard_kill_leaves_a_resumable_folder(tmp_path: Path) -> None:
    """SIGKILL (out of memory, a preempted machine) allows no clean-up: the last checkpoint still resumes, with
    the tracker's files of the killed run left in place."""
    out = tmp_path / "out"
    flags = [*TINY, "--report_to", "tensorboard", "--output_dir", str(out), "--max_train_steps", "100"]
    proc = _interrupt_when_logged([sys.executable, str(SCRIPT), *flags, "--checkpointing_steps", "2"], out, 5, 9)
    proc.communicate(timeout=300)
    assert proc.returncode == -9 and list_checkpoints(out)
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    AcceleratorState._reset_state(True)
    train.main([*flags, "--checkpointing_steps", "0", "--max_train_steps", str(step + 2), "--resume_from_checkpoint",
                "latest"])  # fmt: skip
    steps = [json.loads(x)["step"] for x in (out / "logs" / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_two_processes_stop_together_on_ctrl_c(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        *launch_two_processes(SCRIPT),
        *TINY, "--output_dir", str(out), "--max_train_steps", "2000", "--checkpointing_steps", "0",
    ]  # fmt: skip
    proc = _interrupt_when_logged(cmd, out, steps=3)
    _, err = proc.communicate(timeout=300)
    # Our processes print one resume line (the main one) and no traceback; the launcher reports its workers' exit.
    lines = [x for x in err.splitlines() if x.startswith("train.py: interrupted at step ")]
    assert len(lines) == 1, err[-3000:]
    assert "resume with: accelerate launch --multi_gpu --num_processes 2 " in lines[0]
    assert f'File "{SCRIPT}"' not in err
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{step}"]


# -- every installed sampler ---------------------------------------------------------------------------------


def test_a_third_party_sampler_trains_and_is_saved(tmp_path: Path, plugins_on_path: Path) -> None:
    out = tmp_path / "out"
    sde = ["--sde", "ve", "--sde_params", '{"sigma_min": 0.02, "sigma_max": 5.0}', "--sampler", "euler-flow"]
    train.main([*TINY, *sde, "--output_dir", str(out), "--max_train_steps", "2", "--save_images_steps", "1"])
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerFlowScheduler"
    assert (config["sigma_min"], config["sigma_max"]) == (0.02, 5.0)  # the SDE's range, through the shared keys
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "EulerFlowScheduler"
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)
    assert (out / "samples" / "step-1.png").is_file() and (out / "samples.png").is_file()


# -- the folder's bookkeeping ------------------------------------------------------------------------------------


def _claim(root: Path, **flags: bool) -> RunFolder:
    names = ["unet", "README.md", "samples", "checkpoint-*", "logs"]
    options = {"resume": False, "overwrite": False, **flags}
    return RunFolder.claim(root, written_names=names, replaced_names=["unet", "README.md", "checkpoint-*"], **options)


def test_a_user_file_in_a_folder_the_trainer_records_whole_is_never_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _claim(out)
    (out / "logs").mkdir()
    (out / "logs" / "loss.jsonl").write_text("{}")
    first.record(out / "logs")
    (out / "logs" / "my_notes.txt").write_text("mine")  # added by the user between runs
    again = _claim(out, overwrite=True)  # deletes the earlier run's files, keeps the notes
    assert not (out / "logs" / "loss.jsonl").exists() and (out / "logs" / "my_notes.txt").read_text() == "mine"
    (out / "logs" / "events").write_text("tracker")
    again.record(out / "logs")  # the trainer records its log folder whole: the notes are not its
    assert "logs/my_notes.txt" not in again.files and "logs/events" in again.files
    _claim(out, overwrite=True)
    assert (out / "logs" / "my_notes.txt").read_text() == "mine" and not (out / "logs" / "events").exists()


def test_staging_names_are_the_trainers_only_when_they_are_its_own(tmp_path: Path) -> None:
    out = tmp_path / "out"
    folder = _claim(out)
    (out / ".checkpoint-old.tmp").mkdir()
    (out / ".checkpoint-old.tmp" / "keep.txt").write_text("mine")
    (out / ".checkpoint-7.tmp").mkdir()
    (out / ".checkpoint-7.tmp" / "model.safetensors").write_text("half-written")
    folder.remove(out / ".checkpoint-7.tmp")  # a kill's leftover: the trainer's, by its name
    assert not (out / ".checkpoint-7.tmp").exists() and (out / ".checkpoint-old.tmp" / "keep.txt").is_file()
    assert folder.remove(out / ".checkpoint-old.tmp") == [".checkpoint-old.tmp/keep.txt"]  # not its own: kept


def test_another_runs_checkpoint_in_a_resumed_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _claim(out)
    (out / "checkpoint-20").mkdir()
    (out / "checkpoint-20" / "training_state.json").write_text("{}")
    with pytest.raises(ValueError, match=r"would replace files the trainer did not write \(checkpoint-20/"):
        _claim(out, resume=True)


def test_an_absolute_logging_dir_outside_the_folder_works(tmp_path: Path) -> None:
    out, logs = tmp_path / "out", tmp_path / "elsewhere" / "logs"
    train.main([*TINY, "--output_dir", str(out), "--logging_dir", str(logs), "--max_train_steps", "2"])
    assert len((logs / "loss.jsonl").read_text().splitlines()) == 2
    assert not any(f.startswith(("elsewhere", "..")) for f in json.loads((out / MANIFEST).read_text())["files"])


def test_an_interrupt_before_the_folder_is_claimed_gives_back_the_command_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    argv = [*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--overwrite_output_dir"]

    def interrupted_while_loading(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_training_images", interrupted_while_loading)
    with pytest.raises(train.Interrupted) as caught:
        train.main(argv)
    # Not '--resume_from_checkpoint latest' without '--overwrite_output_dir': that would continue the earlier run.
    assert shlex.split(caught.value.command)[2:] == argv


def test_a_second_signal_after_the_first_stops_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train.StopSignals, "REPEAT_SECONDS", 0.0)
    with train.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.received == signal.SIGINT  # the first one only asks to stop after this step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
