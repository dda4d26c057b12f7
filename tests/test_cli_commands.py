"""The ``sdekit`` commands end to end on a tiny model folder: each runs, its outputs open and hold what the library
computes, and mistakes end in one line."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from PIL import Image
from safetensors import safe_open
from scipy.stats import t as student_t

import sdekit
from sdekit.cli import COMMANDS, UsageError, main
from sdekit.cli.files import image_grid, to_uint8, write_atomically
from sdekit.cli.likelihood import summarize
from sdekit.cli.models import load_model
from sdekit.sharding import ShardFailure, sample_generators

from conftest import tiny_unet

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def save_tiny_pipeline(folder: Path, channels: int = 1) -> Path:
    """A ``DDPMPipeline`` folder as ``save_pretrained`` (and the trainer) writes it: an 8 x 8 ``UNet2DModel`` and the
    pf-ode scheduler on the default DDPM table."""
    DDPMPipeline(unet=tiny_unet(channels), scheduler=sdekit.load_scheduler("pf-ode")).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("gray") / "model")


def _load(folder: Path) -> tuple[torch.nn.Module, dict]:
    """The model as the commands load it, its weights checked against diffusers' own loading (the commands copy
    them into fresh memory, whose alignment can change the last bit of a CPU kernel), and the scheduler config."""
    pipe = DDPMPipeline.from_pretrained(folder)
    options = argparse.Namespace(model=str(folder), sde=None, sde_params=None, prediction_type=None, time_input=None)
    model = load_model(options, torch.device("cpu")).model
    reference = pipe.unet.state_dict()
    assert model.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())
    return model, dict(pipe.scheduler.config)


def _digits(folder: Path, n: int) -> torch.Tensor:
    """The first ``n`` images of the folder, sorted by name, in [-1, 1]: what the commands read."""
    files = sorted(folder.glob("*.png"))[:n]
    return torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 127.5 - 1)[None] for f in files])


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``sdekit argv``, check that it exits with status 2 printing one line to stderr, and return that line."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdekit: error: "), lines
    return lines[0]


def test_every_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for name, command in COMMANDS.items():
        assert main([name, "--help"]) == 0
        help_text = capsys.readouterr().out
        assert command.example and f"example:\n  {command.example}" in help_text


def test_sample_writes_a_grid_and_arrays(gray_model: Path, tmp_path: Path) -> None:
    def sample(out: str, *flags: str) -> int:
        base = ["--model", str(gray_model), "--sampler", "ddim", "--option", "eta=1", "--steps", "3"]
        return main(["sample", *base, *flags, "--out", str(tmp_path / out)])

    assert sample("s.npz", "--num-samples", "5", "--batch-size", "2", "--seed", "7") == 0
    with np.load(tmp_path / "s.npz") as arrays:
        samples, images = arrays["samples"], arrays["images"]
    assert samples.shape == (5, 1, 8, 8) and samples.dtype == np.float32
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert np.array_equal(images, to_uint8(torch.from_numpy(samples)))
    assert not np.allclose(samples[0], samples[1])

    # Sample i's noise depends on (seed, i) alone: sample 3 drawn in another batch of another run is the same.
    assert sample("b.npz", "--num-samples", "4", "--batch-size", "4", "--seed", "7") == 0
    with np.load(tmp_path / "b.npz") as arrays:
        np.testing.assert_allclose(arrays["samples"], samples[:4], atol=1e-5)
    assert sample("c.npz", "--num-samples", "4", "--seed", "8") == 0
    with np.load(tmp_path / "c.npz") as arrays:
        assert not np.allclose(arrays["samples"][3], samples[3], atol=1e-2)

    assert sample("s.png", "--num-samples", "5", "--batch-size", "2", "--seed", "7") == 0
    grid = Image.open(tmp_path / "s.png")
    assert grid.mode == "L" and grid.width >= 512  # 8 x 8 samples, upscaled to be visible
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid(torch.from_numpy(samples))))
    # The first cell is sample 0, each pixel a block.
    scale = (grid.width - 4 * 4) // (3 * 8)
    cell = np.asarray(grid)[4 : 4 + 8 * scale : scale, 4 : 4 + 8 * scale : scale]
    assert np.array_equal(cell, images[0, ..., 0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz", "c.npz", "s.npz", "s.png"]  # no temporary files


def test_likelihood_prints_bits_per_dim_with_an_interval(
    gray_model: Path, digit_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nll.json"
    flags = ["--data", str(digit_folder), "--num-samples", "2", "--rtol", "1e-2", "--atol", "1e-2", "--seed", "4"]
    assert main(["likelihood", "--model", str(gray_model), *flags, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    bpd = torch.tensor(record["per_sample"]["bpd"], dtype=torch.float64)

    # The library's result on the same images, 8-bit dequantized, with sample i's generator seeded by (4, i).
    model, config = _load(gray_model)
    expected = sdekit.likelihood(
        model, _digits(digit_folder, 2), config, rtol=1e-2, atol=1e-2, dequantize=True,
        generator=sample_generators(4, range(2)),
    )  # fmt: skip
    assert torch.equal(bpd.float(), expected.bpd) and record["per_sample"]["nfe"] == expected.nfe.tolist()
    assert record["dequantized"] is True and record["num_samples"] == 2

    half = student_t.ppf(0.975, 1) * float(bpd.std()) / math.sqrt(2)
    mean = float(bpd.mean())
    assert record["bpd"] == pytest.approx(mean, abs=1e-12)
    assert record["bpd_ci95"] == pytest.approx([mean - half, mean + half], abs=1e-12)
    assert printed.startswith(f"bits/dim: {mean:.4f} +- {half:.4f} (95% interval [{mean - half:.4f}, ")
    assert "over 2 samples; dequantized 8-bit data" in printed
    assert summarize(torch.tensor([3.0]))["bpd_ci95"] == [pytest.approx(math.nan, nan_ok=True)] * 2  # one sample


def test_encode_and_decode_write_what_the_library_computes(
    gray_model: Path, digit_folder: Path, tmp_path: Path
) -> None:
    model, config = _load(gray_model)
    x = _digits(digit_folder, 4)
    latents = tmp_path / "z.safetensors"
    assert main(["encode", "--model", str(gray_model), "--data", str(digit_folder), "--num-samples", "4",
                 "--steps", "4", "--out", str(latents)]) == 0  # fmt: skip
    with safe_open(latents, "pt") as file:
        z = file.get_tensor("latents")
        assert file.metadata()["solver"] == "4 fixed steps"
    assert torch.equal(z, sdekit.encode(model, x, config, num_inference_steps=4))

    decoded = tmp_path / "x.npz"
    assert main(["decode", "--model", str(gray_model), "--latents", str(latents), "--rtol", "1e-3", "--atol", "1e-3",
                 "--out", str(decoded)]) == 0  # fmt: skip
    with np.load(decoded) as arrays:
        assert torch.equal(torch.from_numpy(arrays["samples"]), sdekit.decode(model, z, config, rtol=1e-3, atol=1e-3))

    # A dataset saved with save_to_disk holding the same images gives the same latents.
    import datasets

    images = [Image.open(path) for path in sorted(digit_folder.glob("*.png"))[:4]]
    datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()})).save_to_disk(
        tmp_path / "dataset"
    )
    assert main(["encode", "--model", str(gray_model), "--data", str(tmp_path / "dataset"), "--steps", "4",
                 "--out", str(tmp_path / "z2.safetensors")]) == 0  # fmt: skip
    with safe_open(tmp_path / "z2.safetensors", "pt") as file:
        assert torch.equal(file.get_tensor("latents"), z)

    # Latents in .npz work the same; pickle-based files are refused.
    assert main(["encode", "--model", str(gray_model), "--data", str(digit_folder), "--num-samples", "2",
                 "--steps", "2", "--out", str(tmp_path / "z.npz")]) == 0  # fmt: skip
    assert main(["decode", "--model", str(gray_model), "--latents", str(tmp_path / "z.npz"), "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 0  # fmt: skip
    assert Image.open(tmp_path / "x.png").width >= 512
    torch.save({"latents": z}, tmp_path / "z.pt")
    assert main(["decode", "--model", str(gray_model), "--latents", str(tmp_path / "z.pt"), "--out",
                 str(tmp_path / "y.png")]) == 2  # fmt: skip
    assert not (tmp_path / "y.png").exists()


def test_inpaint_and_colorize(gray_model: Path, digit_folder: Path, tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255  # the left half is known
    Image.fromarray(mask).save(tmp_path / "mask.png")
    flags = ["--sampler", "ddim", "--option", "eta=1", "--steps", "3", "--num-samples", "3"]
    out = tmp_path / "inpainted.npz"
    assert main(["inpaint", "--model", str(gray_model), *flags, "--image", str(digit_folder),
                 "--mask", str(tmp_path / "mask.png"), "--out", str(out)]) == 0  # fmt: skip
    with np.load(out) as arrays:
        result = torch.from_numpy(arrays["samples"])
    x = _digits(digit_folder, 3)
    assert torch.equal(result[..., :4], x[..., :4]) and not torch.allclose(result[..., 4:], x[..., 4:], atol=0.1)

    rgb = save_tiny_pipeline(tmp_path / "rgb", channels=3)
    out = tmp_path / "colored.npz"
    assert main(["colorize", "--model", str(rgb), *flags, "--image", str(digit_folder), "--out", str(out)]) == 0
    with np.load(out) as arrays:
        colored = torch.from_numpy(arrays["samples"])
    assert colored.shape == (3, 3, 8, 8)
    torch.testing.assert_close(colored.mean(dim=1, keepdim=True), x, atol=1e-5, rtol=0)
    assert colored.std(dim=1).max() > 0.01  # the colour is sampled, not copied from the gray level


def test_bad_masks_and_sizes_are_one_line_errors(
    gray_model: Path, digit_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    levels = np.zeros((8, 8), np.uint8)
    levels[0, 0] = 128
    Image.fromarray(levels).save(tmp_path / "gray-mask.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big-mask.png")
    out = str(tmp_path / "o.png")
    base = ["inpaint", "--model", str(gray_model), "--sampler", "ddim", "--steps", "2", "--out", out]
    assert "is not binary: it holds gray level 128" in _fails(
        capsys, [*base, "--image", str(digit_folder), "--mask", str(tmp_path / "gray-mask.png")]
    )
    assert "is 16 x 16 pixels but the model takes 8 x 8" in _fails(
        capsys, [*base, "--image", str(tmp_path / "big.png"), "--mask", str(tmp_path / "gray-mask.png")]
    )
    assert "big-mask.png is 16 x 16 pixels but the model takes 8 x 8" in _fails(
        capsys, [*base, "--image", str(digit_folder), "--mask", str(tmp_path / "big-mask.png")]
    )
    assert not (tmp_path / "o.png").exists()


def test_a_folder_without_a_scheduler_says_what_to_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_unet(1).save_pretrained(tmp_path / "bare", safe_serialization=True)  # config.json + weights, no scheduler
    out = tmp_path / "s.png"
    flags = ["--model", str(tmp_path / "bare"), "--sampler", "pf-ode", "--steps", "2", "--num-samples", "2"]
    line = _fails(capsys, ["sample", *flags, "--out", str(out)])
    assert "has no scheduler" in line and "--sde (subvp, ve, vp" in line and "--sampler (analytic-dpm, ddim" in line
    assert not out.exists()
    monkeypatch.setenv("SDEKIT_DEBUG", "1")
    with pytest.raises(UsageError, match="has no scheduler"):
        main(["sample", *flags, "--out", str(out)])
    monkeypatch.delenv("SDEKIT_DEBUG")
    assert main(["sample", *flags, "--sde", "vp", "--out", str(out)]) == 0
    assert Image.open(out).width >= 512

    # The likelihood needs no sampler, so the message asks for the SDE only.
    line = _fails(capsys, ["likelihood", "--model", str(tmp_path / "bare"), "--data", str(out)])
    assert "--sde (subvp, ve, vp" in line and "--sampler" not in line


def test_existing_outputs_are_refused_unless_overwrite(
    gray_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's file")
    flags = ["sample", "--model", str(gray_model), "--sampler", "ddim", "--steps", "2", "--num-samples", "2"]
    assert "mine.png exists; pass --overwrite to replace it" in _fails(capsys, [*flags, "--out", str(out)])
    assert out.read_bytes() == b"the user's file"
    assert main([*flags, "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).format == "PNG"
    assert "must end in .png or .npz" in _fails(capsys, [*flags, "--out", str(tmp_path / "grid.jpg")])
    assert [p.name for p in tmp_path.iterdir()] == ["mine.png"]


def test_a_failed_or_interrupted_write_leaves_nothing_behind(
    gray_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_then_fail(file: object) -> None:
        file.write(b"half of a file")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        write_atomically(tmp_path / "new.npz", half_then_fail, overwrite=False)
    (tmp_path / "old.npz").write_bytes(b"old")
    with pytest.raises(OSError):
        write_atomically(tmp_path / "old.npz", half_then_fail, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old.npz"] and (tmp_path / "old.npz").read_bytes() == b"old"

    def interrupted(*args: object, **kwargs: object) -> torch.Tensor:
        raise KeyboardInterrupt

    monkeypatch.setattr("sdekit.cli.sample.draw", interrupted)
    flags = ["sample", "--model", str(gray_model), "--sampler", "ddim", "--steps", "2", "--num-samples", "2"]
    assert main([*flags, "--out", str(tmp_path / "s.png")]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["old.npz"]


def test_models_from_the_hub_cache_and_refused_weights(
    gray_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # The cache layout huggingface_hub writes: models--<owner>--<name>/refs/main -> snapshots/<commit>/.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(gray_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    flags = ["sample", "--sampler", "ddim", "--steps", "2", "--num-samples", "2"]
    assert main([*flags, "--model", "someone/tiny", "--out", str(tmp_path / "hub.png")]) == 0
    assert "nor a Hub model in the local cache" in _fails(
        capsys, [*flags, "--model", "someone/other", "--out", str(tmp_path / "x.png")]
    )

    pickled = tmp_path / "pickled"
    shutil.copytree(gray_model, pickled)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    tiny_unet(1).save_pretrained(pickled / "unet", safe_serialization=False)
    assert "no safetensors weights" in _fails(
        capsys, [*flags, "--model", str(pickled), "--out", str(tmp_path / "x.png")]
    )
    assert not (tmp_path / "x.png").exists()


def test_another_process_failing_is_one_line_on_the_main_process(
    gray_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What map_batches raises on the processes that did not fail (tests/test_sharding.py runs it in two processes).
    def other_failed(*args: object, **kwargs: object) -> None:
        raise ShardFailure("process 1 of 2 failed: ValueError: x holds NaN or Inf.")

    monkeypatch.setattr("sdekit.cli.sample.map_batches", other_failed)
    monkeypatch.setenv("SDEKIT_PROGRESS", "off")  # the progress line of the main process's (empty) share
    flags = [
        "sample",
        "--model",
        str(gray_model),
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "s.png"),
    ]
    assert _fails(capsys, flags) == "sdekit: error: process 1 of 2 failed: ValueError: x holds NaN or Inf."
    assert not (tmp_path / "s.png").exists()
