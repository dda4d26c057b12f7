"""The trainer's data: embedded digits, image folders with bad files, transforms and resumable flips."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from data import BadImageError, ImageTransform, TrainingImages, embedded_digits, load_images  # noqa: E402


def test_embedded_digits_are_real_images_with_a_held_out_split() -> None:
    train, test = embedded_digits("train"), embedded_digits("test")
    assert (len(train), len(test)) == (1500, 297)
    image = train[0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    assert np.asarray(image).max() > 200  # the digits' strokes reach full intensity
    assert load_images() is not None and len(load_images(split="test")) == 297
    with pytest.raises(ValueError, match="split"):
        embedded_digits("validation")


def test_transform_scales_resizes_crops_and_flips() -> None:
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1)))  # 16 wide, 8 high
    out = ImageTransform(resolution=8, center_crop=True, channels=1)(ramp)
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    assert -1.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float(out[0, 0, 0]) < float(out[0, 0, -1])  # left-to-right ramp survives the center crop
    flipped = ImageTransform(resolution=8, channels=1, random_flip=True)(ramp, flip=True)
    assert torch.allclose(flipped, out.flip(-1))
    assert ImageTransform(resolution=8, channels=1)(ramp, flip=True).equal(out)  # no random_flip: no flip
    rgb = ImageTransform(resolution=4, center_crop=False)(ramp)
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[0], rgb[1])
    with pytest.raises(ValueError, match="channels"):
        ImageTransform(resolution=8, channels=2)


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(root / f"ok{i}.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_image_folder_bad_file_is_named_or_skipped(tmp_path: Path) -> None:
    dataset = load_images(train_data_dir=str(_folder(tmp_path)))
    transform = ImageTransform(resolution=8)
    with pytest.raises(BadImageError, match=r"broken\.png.*--skip_bad_images"):
        TrainingImages(dataset, transform)
    images = TrainingImages(dataset, transform, skip_bad_images=True)
    assert len(images) == 3 and len(images.skipped) == 1 and images.skipped[0].endswith("broken.png")
    assert images[0].shape == (3, 8, 8)


def test_flips_depend_only_on_seed_epoch_and_index() -> None:
    dataset = embedded_digits("test")
    transform = ImageTransform(resolution=8, channels=1, random_flip=True)
    a, b = TrainingImages(dataset, transform, seed=3), TrainingImages(dataset, transform, seed=3)
    b.set_epoch(1)
    b.set_epoch(0)
    assert all(torch.equal(a[i], b[i]) for i in range(20))
    b.set_epoch(1)
    assert any(not torch.equal(a[i], b[i]) for i in range(20))


def test_source_errors() -> None:
    with pytest.raises(ValueError, match="not both"):
        load_images(dataset_name="x/y", train_data_dir="somewhere")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        load_images(dataset_name="sdekit-tests/no-such-dataset")
