"""The README's main job (``training/demo.py``) and its evaluation module, on a tiny model and few samples."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

import sdekit
from sdekit.testing import GaussianMixture, epsilon_oracle, score_oracle

from conftest import TINY_TRAINING, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import demo  # noqa: E402
from evaluate import BUILTIN_RUNS, SamplerRun, data_floor, evaluate, sample, save_grid  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture
def progress_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress as plain lines, whatever the terminal."""
    monkeypatch.setenv("SDEKIT_PROGRESS", "lines")


def _check_run_log(log: str, labels: list[str]) -> None:
    """Each label's run reported its progress in plain lines, ending at 100%, then one line with its results."""
    assert "\r" not in log
    lines = log.splitlines()
    for label in labels:
        progress = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(label)}: +\d+% \d+/\d+ ", line)]
        done = [i for i, line in enumerate(lines) if line.startswith(f"{label}: done in ")]
        assert progress and lines[progress[-1]].startswith(f"{label}: 100% "), (label, log)
        assert len(done) == 1 and done[0] > progress[-1], (label, log)
        assert re.fullmatch(rf"{re.escape(label)}: done in [\d.]+ s, NFE \d+, Frechet [\d.]+", lines[done[0]])


def test_builtin_runs_cover_every_builtin_sampler() -> None:
    builtin = {p.name for p in sdekit.list_plugins(kind="sampler") if p.distribution == "sdekit"}
    assert builtin <= {run.sampler for run in BUILTIN_RUNS}
    assert len({run.label for run in BUILTIN_RUNS}) == len(BUILTIN_RUNS)


def _expected_nfe(run: SamplerRun) -> int:
    """Model calls per sample: Heun's two per level but the last; a Langevin corrector's one more per level."""
    if run.sampler == "pf-ode":
        return 2 * run.steps - 1
    if run.sampler == "pc" and run.options["corrector"] != "none":
        return 2 * run.steps
    return run.steps


def test_demo_trains_then_writes_a_grid_and_a_row_per_sampler(
    tmp_path: Path, progress_lines: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    flags = ["--output_dir", str(out), "--max_train_steps", "2", "--num_samples", "6", "--num_likelihood", "5"]
    table = demo.main([*flags, "--train_args", *TINY_TRAINING])
    log = capsys.readouterr().err
    phases = [
        "demo: training",
        "demo: loading",
        "demo: sampling 6 images",
        "demo: untrained",
        "demo: data floor",
        "demo: inpainting the right half of 8 held-out digits",
        "demo: likelihood of 5 held-out digits",
    ]
    starts = [next(i for i, line in enumerate(log.splitlines()) if line.startswith(p)) for p in phases]
    assert starts == sorted(starts), log
    _check_run_log(log, [run.label for run in BUILTIN_RUNS] + ["untrained"])
    assert "analytic-ddpm: estimating Gamma at the 25 levels it visits" in log
    results = (out / "results.md").read_text()
    assert table in results
    nll_lines = [line for line in results.split(table)[1].splitlines() if line.startswith("|")][2:]
    nll_rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in nll_lines}
    assert set(nll_rows) == {"trained model"}
    for cells in nll_rows.values():
        bpd, interval, nfe, seconds = (cell.strip() for cell in cells)
        low, high = (float(v) for v in interval.strip("[]").split(","))
        assert 0 < low < float(bpd) < high and int(nfe) > 0 and float(seconds) > 0
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()[2:]}
    for run in BUILTIN_RUNS:
        nfe, seconds, frechet = (cell.strip() for cell in rows[run.label])
        assert run.sampler == "sample_ode" or int(nfe) == _expected_nfe(run), run.label  # dopri5 is adaptive
        assert float(seconds) > 0 and math.isfinite(float(frechet))
        grid = Image.open(out / "grids" / f"{run.label}.png")
        assert grid.size == (3 * 168 + 4 * 4, 2 * 168 + 3 * 4)  # 6 samples of 8 x 8, 21x, on 3 x 2 with 4 px gaps
    assert {"untrained model (pf-ode-heun)", "training data (floor)"} <= set(rows)
    # Three rows of 8 digits (given, known half, inpainted), 8 x 8 pixels at 8x, 4 px gaps.
    assert Image.open(out / "grids" / "inpainting.png").size == (8 * 64 + 9 * 4, 3 * 64 + 4 * 4)
    assert (out / "model" / "model_index.json").is_file()

    # Run again, it reuses the finished training (2 steps logged once, no step trained again) and evaluates anew.
    AcceleratorState._reset_state(True)
    checkpoint = out / "model" / "checkpoint-2" / "model.safetensors"
    saved = checkpoint.stat()
    again = [*flags, "--train_args", *TINY_TRAINING]
    assert demo.run(again) == 0
    assert (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)
    assert len((out / "model" / "logs" / "loss.jsonl").read_text().splitlines()) == 2


def _mixture_images() -> tuple[GaussianMixture, torch.Tensor, torch.Tensor]:
    """Two Gaussians of 4 x 4 images inside [-1, 1], with 300 held-out and 600 training samples."""
    gen = torch.Generator().manual_seed(0)
    means = (0.3 * torch.randn(2, 16, generator=gen)).clamp(-0.7, 0.7)
    mixture = GaussianMixture(means=means, stds=torch.full((2,), 0.25), event_shape=(1, 4, 4))
    return mixture, mixture.sample(300, gen), mixture.sample(600, gen)


def test_evaluate_gives_an_exact_model_the_data_floor() -> None:
    """With the exact noise predictor of a mixture of 4 x 4 images, the pipeline's samples score at the data's own
    Frechet floor, and a wrong model far above it: the pipeline swap, Gamma estimation and metric are right."""
    mixture, heldout, training = _mixture_images()
    means = mixture.means
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config)
    pipe = DDPMPipeline(unet=epsilon_oracle(mixture, scheduler.sde), scheduler=scheduler)
    runs = [SamplerRun("ddim", "ddim", 50), SamplerRun("analytic-ddpm", "analytic-dpm", 50, {"eta": 1.0})]
    floor = sum(data_floor(training, heldout, seed) for seed in range(5)) / 5  # one draw scatters by ~20%
    rows = evaluate(pipe, heldout, runs, gamma_data=training)
    assert [r.nfe for r in rows] == [50, 50] and pipe.scheduler is scheduler  # the pipeline's own is put back
    assert all(r.frechet < 1.5 * floor for r in rows), (floor, rows)
    wrong = GaussianMixture(means=-means, stds=torch.full((2,), 0.25), event_shape=(1, 4, 4))
    off = evaluate(DDPMPipeline(unet=epsilon_oracle(wrong, scheduler.sde), scheduler=scheduler), heldout, runs[:1])
    assert off[0].frechet > 20 * floor
    with pytest.raises(ValueError, match="needs gamma_data"):
        evaluate(pipe, heldout, runs[1:], num_samples=4)


def test_evaluate_starts_ve_samplers_from_their_prior() -> None:
    """DDPMPipeline starts from unit noise; a VE sampler must start from N(0, sigma_max^2) (the deterministic ODE
    cannot forget a wrong start: from unit noise it scores 20x the floor) and then scores at the floor."""
    mixture, heldout, training = _mixture_images()
    scheduler = sdekit.load_scheduler("pf-ode", sde="ve", sigma_max=5.0, prediction_type="score")
    pipe = DDPMPipeline(unet=score_oracle(mixture, scheduler.sde), scheduler=scheduler)
    floor = sum(data_floor(training, heldout, seed) for seed in range(5)) / 5
    row = evaluate(pipe, heldout, [SamplerRun("ve", "pf-ode", 50)])[0]
    assert row.nfe == 99 and row.frechet < 1.5 * floor, (floor, row)


def test_evaluate_reports_every_run_and_leaves_the_pipeline_as_it_was(
    progress_lines: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pipeline runs, the adaptive solver (unknown NFE), Analytic-DPM with its Gamma estimate, and a VE sampler
    through :func:`sample` each show progress under their label and end with one line of results."""
    mixture, heldout, training = _mixture_images()
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config)
    pipe = DDPMPipeline(unet=epsilon_oracle(mixture, scheduler.sde), scheduler=scheduler)
    runs = [
        SamplerRun("ddim", "ddim", 10),
        SamplerRun("dopri5", "sample_ode", 0, {"rtol": 1e-2, "atol": 1e-2}),
        SamplerRun("analytic-ddim", "analytic-dpm", 10, {"eta": 0.0}),
    ]
    rows = evaluate(pipe, heldout[:20], runs, gamma_data=training)
    log = capsys.readouterr().err
    _check_run_log(log, [run.label for run in runs])
    assert "analytic-ddim: estimating Gamma at the 10 levels it visits from 500 training images" in log
    ode_lines = [line for line in log.splitlines() if line.startswith("dopri5: ")]
    assert ode_lines[-2].startswith("dopri5: 100% 100/100 % [") and ode_lines[-2].endswith(f"nfe={rows[1].nfe}")
    assert "progress_bar" not in vars(pipe) and pipe.scheduler is scheduler

    ve = sdekit.load_scheduler("pf-ode", sde="ve", sigma_max=5.0, prediction_type="score")
    ve_pipe = DDPMPipeline(unet=score_oracle(mixture, ve.sde), scheduler=ve)
    evaluate(ve_pipe, heldout[:20], [SamplerRun("ve", "pf-ode", 5)])
    _check_run_log(capsys.readouterr().err, ["ve"])


def test_sample_shows_progress_under_its_label(progress_lines: None, capsys: pytest.CaptureFixture[str]) -> None:
    scheduler = sdekit.load_scheduler("ddim", DDPMScheduler().config)
    sample(tiny_unet(channels=1), scheduler, 2, 10, seed=0)
    sample(tiny_unet(channels=1), scheduler, 2, 5, seed=0, label="samples at step 400")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == [
        *(f"sampling: {10 * k:3d}% {k}/10 step" for k in range(1, 11)),
        *(f"samples at step 400: {20 * k:3d}% {k}/5 step" for k in range(1, 6)),
    ]


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().to(torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_upscales_each_pixel_to_a_block_with_gaps_between_cells(tmp_path: Path, channels: int) -> None:
    """7 samples of 3 x 5 on a 3-column grid: every pixel an s x s block, s the smallest that reaches 512 px, and
    4 px of grey 128 around every cell; the two cells past the last sample are grey too."""
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([-1.0, -0.5, 0.5, 1.0])  # 0, 64, 191, 255: never the background's 128
    images = values[torch.randint(0, 4, (7, channels, 3, 5), generator=gen)]
    picture = save_grid(images, tmp_path / "grids" / "grid.png")
    assert Image.open(tmp_path / "grids" / "grid.png").size == picture.size
    grid = torch.from_numpy(np.asarray(picture).copy()).reshape(picture.size[1], picture.size[0], channels)
    grid = grid.permute(2, 0, 1)
    width, height = picture.size
    scale = (width - 4 * 4) // (3 * 5)
    assert width == 3 * 5 * scale + 4 * 4 and width >= 512 and 3 * 5 * (scale - 1) + 4 * 4 < 512
    assert height == 3 * 3 * scale + 4 * 4
    is_gap = torch.ones(height, width, dtype=torch.bool)
    pixels = _pixels(images)
    for i in range(7):
        top, left = 4 + (i // 3) * (3 * scale + 4), 4 + (i % 3) * (5 * scale + 4)
        cell = grid[:, top : top + 3 * scale, left : left + 5 * scale]
        blocks = pixels[i].repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        assert torch.equal(cell, blocks), i
        is_gap[top : top + 3 * scale, left : left + 5 * scale] = False
    assert bool((grid[:, is_gap] == 128).all()) and int(is_gap.sum()) == width * height - 7 * 15 * scale**2


def test_save_grid_keeps_a_wide_grid_and_checks_its_settings(tmp_path: Path) -> None:
    images = torch.zeros(4, 1, 300, 300)
    assert save_grid(images, tmp_path / "wide.png").size == (2 * 300 + 3 * 4, 2 * 300 + 3 * 4)  # no upscaling
    assert save_grid(images[:1, :, :8, :8], tmp_path / "exact.png", min_width=64, gap=0).size == (64, 64)
    with pytest.raises(ValueError, match="gap must be an integer >= 0, got -1"):
        save_grid(images, tmp_path / "bad.png", gap=-1)
    with pytest.raises(ValueError, match=r"background must be an integer grey level in \[0, 255\], got 300"):
        save_grid(images, tmp_path / "bad.png", background=300)
    with pytest.raises(ValueError, match=r"images must be \(B, C, H, W\).*got shape \(300, 300\)"):
        save_grid(images[0, 0], tmp_path / "bad.png")
