"""The CLI's files: data read in (image folders, datasets, ``.npz`` arrays, latents) and outputs written out.

Outputs are never half-written and never replace a file by accident: :func:`check_output` refuses an existing
path unless ``--overwrite`` was given, and :func:`write_atomically` writes to a hidden temporary file in the same
folder and renames it into place only once it is complete (a rename within a folder is atomic), removing it if
anything fails. Nothing is unpickled: arrays are read with ``numpy.load(allow_pickle=False)`` and tensors from
safetensors.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .base import UsageError

__all__ = [
    "IMAGE_OUTPUTS",
    "LATENT_FILES",
    "Data",
    "check_output",
    "image_column",
    "image_grid",
    "read_data",
    "read_latents",
    "read_mask",
    "to_uint8",
    "write_atomically",
    "write_images",
    "write_latents",
]

IMAGE_OUTPUTS = (".png", ".npz")
"""What samples are written as: a PNG grid, or the arrays."""

LATENT_FILES = (".safetensors", ".npz")
"""What latents are stored in (safetensors preferred; neither can hold code)."""


# -- outputs ---------------------------------------------------------------------------------------------------


def check_output(path: str, overwrite: bool, suffixes: Sequence[str], option: str = "--out") -> Path:
    """``path`` as a ``Path`` once it is known to be writable as asked.

    Raises:
        UsageError: its suffix is not one of ``suffixes``; it is a folder; it exists and ``overwrite`` is off.
    """
    out = Path(path).expanduser()
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"{option} {path} must end in {' or '.join(suffixes)}.")
    if out.is_dir():
        raise UsageError(f"{option} {path} is a folder; pass a file path.")
    if out.exists() and not overwrite:
        raise UsageError(f"{option} {path} exists; pass --overwrite to replace it, or choose another path.")
    return out


def write_atomically(path: Path, write: Callable[[IO[bytes]], None], overwrite: bool) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file beside it, then rename it into place.

    The folder is created if missing. If ``write`` fails (or the process is interrupted), the temporary file is
    removed and ``path`` is as it was.

    Raises:
        UsageError: ``path`` appeared while writing and ``overwrite`` is off.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if path.exists() and not overwrite:
            raise UsageError(f"--out {path} was created by something else meanwhile; pass --overwrite to replace it.")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Samples in ``[-1, 1]`` (``(B, C, H, W)``, clipped) as 8-bit images ``(B, H, W, C)``."""
    pixels = ((samples.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def image_grid(
    samples: torch.Tensor, *, min_width: int = 512, gap: int = 4, background: int = 128, columns: int | None = None
) -> Any:
    """Samples in ``[-1, 1]`` (``(B, C, H, W)``, ``C`` 1 or 3) as one PIL image, large enough to look at.

    ``columns`` columns (default ``ceil(sqrt(B))``), filled row by row; each pixel becomes a ``k x k`` block with
    the smallest integer ``k`` that makes the grid at least ``min_width`` pixels wide; ``gap`` pixels of grey
    ``background`` around and between the cells.
    """
    from PIL import Image

    if samples.ndim != 4 or samples.shape[0] < 1 or samples.shape[1] not in (1, 3):
        raise ValueError(f"samples must be (B, C, H, W) with B >= 1 and C 1 or 3, got {tuple(samples.shape)}.")
    pixels = torch.from_numpy(to_uint8(samples))  # (B, H, W, C)
    count, height, width, channels = pixels.shape
    cols = math.ceil(math.sqrt(count)) if columns is None else columns
    rows = math.ceil(count / cols)
    scale = max(1, math.ceil((min_width - (cols + 1) * gap) / (cols * width)))
    pixels = pixels.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    cell_h, cell_w = height * scale, width * scale
    grid = torch.full(
        (rows * cell_h + (rows + 1) * gap, cols * cell_w + (cols + 1) * gap, channels), background, dtype=torch.uint8
    )
    for i in range(count):
        top, left = gap + (i // cols) * (cell_h + gap), gap + (i % cols) * (cell_w + gap)
        grid[top : top + cell_h, left : left + cell_w] = pixels[i]
    array = grid.numpy()
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def write_images(path: Path, samples: torch.Tensor, overwrite: bool) -> None:
    """Write samples (``(B, C, H, W)`` in the model's ``[-1, 1]`` range) to ``path``: a PNG grid (upscaled, see
    :func:`image_grid`) for ``.png``; for ``.npz``, ``samples`` (float32 ``(B, C, H, W)``, as sampled) and
    ``images`` (uint8 ``(B, H, W, C)``, clipped to ``[-1, 1]`` and scaled to 0-255, as FID tools take them)."""
    if path.suffix.lower() == ".png":
        picture = image_grid(samples)
        write_atomically(path, lambda file: picture.save(file, format="PNG"), overwrite)
    else:
        arrays = {"samples": samples.detach().cpu().float().numpy(), "images": to_uint8(samples)}
        write_atomically(path, lambda file: np.savez(file, **arrays), overwrite)


def write_latents(path: Path, latents: torch.Tensor, metadata: dict[str, str], overwrite: bool) -> None:
    """Write ``latents`` under the name ``latents``: safetensors (with ``metadata``) or ``.npz``."""
    latents = latents.detach().cpu().float().contiguous()
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import save

        payload = save({"latents": latents}, metadata=metadata)
        write_atomically(path, lambda file: file.write(payload), overwrite)
    else:
        write_atomically(path, lambda file: np.savez(file, latents=latents.numpy()), overwrite)


# -- inputs ----------------------------------------------------------------------------------------------------


def _load_npz(path: Path, option: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read {option} {path} as an .npz file without pickles: {err}.") from None


def read_latents(path: str, shape: tuple[int, int, int], option: str = "--latents") -> torch.Tensor:
    """The ``latents`` tensor of a ``.safetensors`` or ``.npz`` file, checked against the model's sample shape."""
    file = Path(path).expanduser()
    if file.suffix.lower() not in LATENT_FILES:
        raise UsageError(f"{option} {path} must be a {' or '.join(LATENT_FILES)} file (written by sdekit encode).")
    if not file.is_file():
        raise UsageError(f"{option} {path} does not exist.")
    if file.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(file)
        except (SafetensorError, OSError) as err:
            raise UsageError(f"cannot read {option} {path}: {err}.") from None
        latents = tensors.get("latents")
    else:
        arrays = _load_npz(file, option)
        latents = torch.from_numpy(arrays["latents"]) if "latents" in arrays else None
    if latents is None:
        raise UsageError(f"{option} {path} holds no tensor named 'latents' (as sdekit encode writes).")
    if latents.ndim != 4 or tuple(latents.shape[1:]) != shape or not latents.is_floating_point():
        raise UsageError(
            f"{option} {path} holds latents of shape {tuple(latents.shape)} ({latents.dtype}); the model takes "
            f"float samples of shape (N, {', '.join(map(str, shape))})."
        )
    return latents.float()


@dataclass
class Data:
    """Data read for a command: ``x`` is ``(N, C, H, W)`` in ``[-1, 1]``; ``eight_bit`` says whether it holds 8-bit
    levels (images) rather than continuous values; ``description`` names it in messages."""

    x: torch.Tensor
    eight_bit: bool
    description: str


def _to_tensor(image: Any, shape: tuple[int, int, int], resize: bool, name: str) -> torch.Tensor:
    """A PIL image in the model's channels, scaled to ``[-1, 1]``. If its size differs from the model's, it is
    resized (short side) and centre-cropped, as ``training/train.py`` prepares its data, or with ``resize`` off
    refused with an error naming both sizes."""
    from PIL import Image

    channels, height, width = shape
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        if not resize:
            raise UsageError(
                f"{name} is {image.width} x {image.height} pixels but the model takes {width} x {height}; resize it "
                "to the model's size."
            )
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(resized, Image.BICUBIC)
        left, top = (image.width - width) // 2, (image.height - height) // 2
        image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
    return torch.from_numpy(array.transpose(2, 0, 1) / 127.5 - 1.0)


def _open_image(path: Path, shape: tuple[int, int, int], resize: bool, name: str) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return _to_tensor(image, shape, resize, name)
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        if isinstance(err, UsageError):
            raise
        raise UsageError(f"cannot read image {path}: {err}; fix or remove the file.") from None


def _image_suffixes() -> set[str]:
    from PIL import Image

    return {suffix.lower() for suffix in Image.registered_extensions()}


def _image_files(folder: Path) -> list[Path]:
    suffixes = _image_suffixes()
    files = [
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _read_folder(
    folder: Path, shape: tuple[int, int, int], limit: int | None, resize: bool, option: str
) -> torch.Tensor:
    files = _image_files(folder)
    if not files:
        raise UsageError(f"{option} {folder} holds no image files (.png, .jpg, ...), also in its subfolders.")
    return torch.stack([_open_image(path, shape, resize, f"image {path}") for path in files[:limit]])


def image_column(dataset: Any) -> str | None:
    """The name of a ``datasets`` dataset's image column: the first feature of type ``datasets.Image``, else a
    column named ``image`` or ``img``; ``None`` if there is none (the caller says what to pass instead)."""
    import datasets

    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in ("image", "img"):
        if name in dataset.column_names:
            return name
    return None


def _read_dataset(
    source: str, split: str, shape: tuple[int, int, int], limit: int | None, resize: bool, option: str
) -> torch.Tensor:
    import datasets

    folder = Path(source).expanduser()
    try:
        if folder.is_dir():  # written by Dataset.save_to_disk / DatasetDict.save_to_disk
            loaded = datasets.load_from_disk(str(folder))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UsageError(f"{option} {source} has no split {split!r}; pass --split ({', '.join(loaded)}).")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(source, split=split)
    except UsageError:
        raise
    except (ConnectionError, OSError, ValueError) as err:
        raise UsageError(
            f"cannot load dataset {source!r} (split {split!r}): {' '.join(str(err).split())}. sdekit reads Hub "
            "datasets from the local datasets cache; pass an image folder or a cached dataset name."
        ) from None
    column = image_column(loaded)
    if column is None:
        raise UsageError(f"the dataset has no image column (columns: {', '.join(loaded.column_names)}).")
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    images = loaded[column]
    if not images:
        raise UsageError(f"{option} {source} (split {split!r}) is empty.")
    return torch.stack([_to_tensor(image, shape, resize, f"image {i} of {source}") for i, image in enumerate(images)])


def _read_arrays(path: Path, shape: tuple[int, int, int], limit: int | None, option: str) -> Data:
    arrays = _load_npz(path, option)
    if "images" in arrays:  # uint8 (N, H, W, C), as sdekit sample writes them
        images = arrays["images"]
        channels, height, width = shape
        if images.dtype != np.uint8 or images.shape[1:] != (height, width, channels):
            raise UsageError(
                f"{option} {path}: 'images' has shape {images.shape} ({images.dtype}); the model takes uint8 images of "
                f"shape (N, {height}, {width}, {channels})."
            )
        x = torch.from_numpy(images[:limit].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0)
        return Data(x, True, f"{path} (8-bit images)")
    if "samples" in arrays:
        samples = arrays["samples"]
        if samples.shape[1:] != shape or samples.dtype.kind != "f":
            raise UsageError(
                f"{option} {path}: 'samples' has shape {samples.shape} ({samples.dtype}); the model takes float "
                f"samples of shape (N, {', '.join(map(str, shape))})."
            )
        return Data(torch.from_numpy(samples[:limit].astype(np.float32)), False, f"{path} (continuous samples)")
    raise UsageError(f"{option} {path} holds neither 'images' nor 'samples' (as sdekit sample writes them).")


def read_data(
    source: str,
    shape: tuple[int, int, int],
    *,
    split: str = "test",
    limit: int | None = None,
    resize: bool = True,
    option: str = "--data",
) -> Data:
    """The data ``source`` names, at the model's sample ``shape``, at most ``limit`` items, in a fixed order.

    ``source`` is an image file, an image folder (every image below it, sorted by path), a dataset folder written
    by ``save_to_disk``, an ``.npz`` file (``images``: uint8 ``(N, H, W, C)``; else ``samples``: float
    ``(N, C, H, W)``, as ``sdekit sample`` writes them) or a Hub dataset name in the local datasets cache (its
    ``split``). Images are converted to the model's channels; one of another size is resized and centre-cropped to
    the model's (``resize``) or refused with both sizes named. ``option`` names the source in messages.
    """
    path = Path(source).expanduser()
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise UsageError(f"{option} {source} does not exist.")
        data = _read_arrays(path, shape, limit, option)
    elif path.is_file() and path.suffix.lower() in _image_suffixes():
        data = Data(_open_image(path, shape, resize, f"{option} {source}")[None], True, str(path))
    elif path.is_dir() and not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = Data(_read_folder(path, shape, limit, resize, option), True, f"the images in {source}")
    elif path.exists() and not path.is_dir():
        raise UsageError(f"{option} {source} is not an image, an image folder, an .npz file or a dataset.")
    elif not path.exists() and (source.endswith(("/", os.sep)) or source.startswith(("/", ".", "~"))):  # a path
        raise UsageError(f"{option} {source} does not exist; pass an image folder, an .npz file or a dataset.")
    else:
        data = Data(_read_dataset(source, split, shape, limit, resize, option), True, f"dataset {source} ({split})")
    if data.x.shape[0] == 0:
        raise UsageError(f"{option} {source} holds no samples.")
    return data


def read_mask(source: str, option: str = "--mask") -> torch.Tensor:
    """A mask, 1 where the image is known and 0 where it is generated, as a float tensor ``(1, 1, H, W)`` or, from
    an ``.npz`` file's ``mask`` array, in that array's shape. An image file is read as gray levels: white (255)
    is 1, black (0) is 0; any other level is refused rather than thresholded behind the user's back."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise UsageError(f"{option} {source} does not exist; pass an image (white: known, black: generate) or .npz.")
    if path.suffix.lower() == ".npz":
        arrays = _load_npz(path, option)
        if "mask" not in arrays:
            raise UsageError(f"{option} {source} holds no array named 'mask'.")
        return torch.from_numpy(arrays["mask"].astype(np.float32))
    from PIL import Image

    try:
        with Image.open(path) as image:
            levels = np.asarray(image.convert("L"))
    except OSError as err:
        raise UsageError(f"cannot read {option} {source}: {err}.") from None
    other = levels[(levels != 0) & (levels != 255)]
    if other.size:
        raise UsageError(
            f"{option} {source} is not binary: it holds gray level {int(other[0])} ({other.size} pixels are neither "
            "black nor white); use white (255) where the image is known and black (0) where to generate."
        )
    return torch.from_numpy(levels.astype(np.float32) / 255.0)[None, None]
