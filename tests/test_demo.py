"""The README's main job (``training/demo.py``) and its evaluation module, on a tiny model and few samples."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

import sdekit
from sdekit.testing import GaussianMixture, epsilon_oracle, score_oracle

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

import demo  # noqa: E402
from evaluate import BUILTIN_RUNS, SamplerRun, data_floor, evaluate  # noqa: E402

TINY_TRAINING = [
    "--resolution", "8", "--train_batch_size", "8", "--report_to", "none", "--save_images_steps", "0",
    "--checkpointing_steps", "0", "--sample_steps", "2", "--num_sample_images", "4", "--lr_warmup_steps", "1",
]  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_accelerate_state():  # noqa: ANN201
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


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


def test_demo_trains_then_writes_a_grid_and_a_row_per_sampler(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    table = demo.main(
        ["--output_dir", str(out), "--max_train_steps", "2", "--num_samples", "6", "--train_args", *TINY_TRAINING]
    )
    assert (out / "results.md").read_text().endswith(table + "\n")
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in table.splitlines()[2:]}
    for run in BUILTIN_RUNS:
        nfe, seconds, frechet = (cell.strip() for cell in rows[run.label])
        assert run.sampler == "sample_ode" or int(nfe) == _expected_nfe(run), run.label  # dopri5 is adaptive
        assert float(seconds) > 0 and math.isfinite(float(frechet))
        grid = Image.open(out / "grids" / f"{run.label}.png")
        assert grid.size == (3 * 8, 2 * 8)  # 6 samples of 8 x 8 on a 3 x 2 grid
    assert {"untrained model (pf-ode-heun)", "training data (floor)"} <= set(rows)
    assert (out / "model" / "model_index.json").is_file()


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
