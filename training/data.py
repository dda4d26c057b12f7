"""Training images through 🤗 datasets: the embedded digits, a Hub dataset, or an image folder.

Images are decoded here rather than by ``datasets`` so that an unreadable file is reported by name (or skipped
and counted), and transformed with PIL alone: resize, optional center crop, optional horizontal flip, grayscale
or RGB, scaled to ``[-1, 1]``. Flips are drawn from ``(seed, epoch, index)``, so a resumed run sees exactly the
images an uninterrupted one would.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from sdekit.cli.files import image_column

__all__ = [
    "EMBEDDED_DATASET",
    "BadImageError",
    "ImageTransform",
    "TrainingImages",
    "embedded_digits",
    "load_images",
]

EMBEDDED_DATASET = "sklearn-digits"
"""Name of the embedded default: scikit-learn's 1797 handwritten 8 x 8 digits (UCI ML repository)."""

_HOLDOUT = 297  # the last images of the digits set, held out as its "test" split


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names it (``source``) and says what to do."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        super().__init__(
            f"cannot read image {source}: {reason}. Fix or remove the file, or pass --skip_bad_images to skip "
            "unreadable images."
        )


def embedded_digits(split: str = "train") -> datasets.Dataset:
    """The embedded default as a ``datasets.Dataset`` with one ``image`` column (8 x 8, grayscale).

    scikit-learn ships the digits (values 0..16), so nothing is downloaded. ``split`` is ``train`` (the first
    1500 images) or ``test`` (the last 297, for evaluating samples against data the model never saw).
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    pixels = np.round(load_digits().images / 16.0 * 255.0).astype(np.uint8)
    pixels = pixels[:-_HOLDOUT] if split == "train" else pixels[-_HOLDOUT:]
    images = [Image.fromarray(p) for p in pixels]  # uint8 2-d arrays are mode "L"
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> ``(channels, resolution, resolution)`` float tensor in ``[-1, 1]``.

    Args:
        resolution: output height and width.
        center_crop: crop the central square after resizing the short side (else resize the whole image).
        random_flip: flip horizontally when ``__call__`` is told to.
        channels: 1 (grayscale) or 3 (RGB).
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    channels: int = 3

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {self.resolution}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}.")

    def __call__(self, image: Image.Image, flip: bool = False) -> torch.Tensor:
        """Transform one image; ``flip`` applies only with ``random_flip``."""
        image = image.convert("L" if self.channels == 1 else "RGB")
        size = self.resolution
        if self.center_crop:
            scale = size / min(image.size)
            image = image.resize(
                (max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC
            )
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.BICUBIC)
        if self.random_flip and flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32).reshape(size, size, self.channels)
        return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


def _decode(item: dict | Image.Image, where: str) -> Image.Image:
    """Decode an undecoded ``datasets.Image`` value (``{"bytes", "path"}``) or pass a PIL image through."""
    if isinstance(item, Image.Image):
        return item
    source = item.get("path") or where
    try:
        data = item.get("bytes")
        image = Image.open(io.BytesIO(data) if data is not None else item["path"])
        image.load()
    except Exception as err:  # PIL raises many types for corrupt or unsupported files
        raise BadImageError(source, f"{type(err).__name__}: {err}") from err
    return image


class TrainingImages(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` image column as tensors, with unreadable images reported or skipped.

    Every image is decoded once when this is built, so a bad file fails the run before training starts (or is
    skipped, counted in ``skipped``). Item ``i`` of epoch ``e`` is flipped when the transform asks for random
    flips and a generator seeded with ``(seed, e, i)`` says so.

    Args:
        dataset: the source; ``column`` holds images (PIL, or ``datasets.Image`` values).
        transform: the :class:`ImageTransform`.
        column: the image column; default the first ``datasets.Image`` column, else ``image`` / ``img``.
        skip_bad_images: skip unreadable images instead of raising :class:`BadImageError`.
        seed: base seed of the flips.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: ImageTransform,
        column: str | None = None,
        skip_bad_images: bool = False,
        seed: int = 0,
    ) -> None:
        self.column = column or _image_column(dataset)
        raw = dataset.cast_column(self.column, datasets.Image(decode=False))[self.column]
        self.images: list[Image.Image] = []
        self.skipped: list[str] = []
        for index, item in enumerate(raw):
            try:
                self.images.append(_decode(item, f"#{index} of column {self.column!r}"))
            except BadImageError as err:
                if not skip_bad_images:
                    raise
                self.skipped.append(err.source)
        if not self.images:
            raise ValueError("the dataset holds no readable images.")
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Draw the flips of ``epoch`` from now on."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> torch.Tensor:
        flip = False
        if self.transform.random_flip:
            gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)
            flip = bool(torch.rand((), generator=gen) < 0.5)
        return self.transform(self.images[index], flip)

    def tensor(self) -> torch.Tensor:
        """Every image of the current epoch, stacked: ``(len(self), C, H, W)`` in ``[-1, 1]``."""
        return torch.stack([self[i] for i in range(len(self))])


def _image_column(dataset: datasets.Dataset) -> str:
    column = image_column(dataset)
    if column is None:
        raise ValueError(
            f"no image column found among {dataset.column_names}; pass --image_column with the column that holds "
            "images."
        )
    return column


def load_images(
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    dataset_config_name: str | None = None,
    cache_dir: str | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """The training images: a Hub dataset (``dataset_name``), an image folder (``train_data_dir``, read with
    ``datasets``' ``imagefolder``) or, with neither, the embedded digits.

    Offline (``HF_HUB_OFFLINE=1``) a Hub dataset must already be in the cache; the error says so.
    """
    if dataset_name and train_data_dir:
        raise ValueError("pass either --dataset_name or --train_data_dir, not both.")
    if train_data_dir:
        if not Path(train_data_dir).is_dir():
            state = "is not a folder" if Path(train_data_dir).exists() else "does not exist"
            raise ValueError(f"--train_data_dir {train_data_dir} {state}; pass the folder that holds the images.")
        try:
            return datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
        except FileNotFoundError as err:  # datasets' EmptyDatasetError: no file of an image type in the folder
            raise ValueError(
                f"--train_data_dir {train_data_dir} holds no image files datasets can read ({err}); put the images "
                "(.png, .jpg, ...) in it or in its subfolders."
            ) from err
    if dataset_name:
        try:
            return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
        except (ConnectionError, OSError) as err:
            raise ValueError(
                f"cannot load dataset {dataset_name!r}: {err}. Offline (HF_HUB_OFFLINE=1) it must already be in the "
                "datasets cache; otherwise check the name and the network, or use --train_data_dir."
            ) from err
    return embedded_digits(split)
