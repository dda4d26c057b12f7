"""``--model``: from a folder or a cached Hub id to the network and the scheduler configuration that says how to run it.

Accepted layouts:

* a pipeline folder, as ``DDPMPipeline.save_pretrained`` and ``training/train.py`` write it: ``unet/`` (the model's
  ``config.json`` and safetensors weights) and ``scheduler/scheduler_config.json`` (its SDE, prediction type and
  model time; a diffusers ``DDPMScheduler`` / ``ScoreSdeVeScheduler`` config works too);
* a model folder, as ``UNet2DModel.save_pretrained`` writes it (``config.json`` and the weights), or a pipeline
  folder without ``scheduler/``: the SDE is then unknown and must be given with ``--sde`` (and the related options);
* a Hub id (``owner/name``) whose snapshot is in the local Hugging Face cache; nothing is downloaded.

Weights load from safetensors only; a folder with pickled ``.bin`` weights alone is refused.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import registry
from .base import UsageError

__all__ = ["LoadedModel", "build_scheduler", "load_model", "resolve_model_folder"]

_LATENT_COMPONENTS = ("vqvae", "vae", "text_encoder")


@dataclass
class LoadedModel:
    """A model loaded for the CLI.

    Attributes:
        model: the network in eval mode on the chosen device, float32, gradients off.
        config: the scheduler configuration (SDE, schedule, prediction type, model time) with the command line's
            overrides applied; what ``sdekit.load_scheduler(name, config)`` and :func:`sdekit.likelihood` take.
        folder: the folder it was loaded from (a cache snapshot for a Hub id).
        sample_shape: ``(channels, height, width)`` of one sample.
    """

    model: torch.nn.Module
    config: dict[str, Any]
    folder: Path
    sample_shape: tuple[int, int, int]


def resolve_model_folder(ref: str) -> Path:
    """The local folder ``--model ref`` names: ``ref`` itself if it is a folder, else the cached snapshot of the
    Hub model ``ref`` (``huggingface_hub.snapshot_download(..., local_files_only=True)``)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"--model {ref} is a file; pass the folder saved by save_pretrained or training/train.py.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except HFValidationError:
        raise UsageError(f"--model {ref} does not exist; pass a model folder or a Hub model id.") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise UsageError(
            f"--model {ref} is neither a folder nor a Hub model in the local cache (sdekit does not download); "
            f"download it first with `hf download {ref}`, or pass a folder."
        ) from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {what} {path}: {err}.") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what} {path} does not hold a JSON object.")
    return value


def _model_folder(folder: Path, ref: str) -> Path:
    """Where the denoiser's ``config.json`` is: ``unet/`` of a pipeline, or the folder itself."""
    index = folder / "model_index.json"
    if index.is_file():
        components = _read_json(index, "the pipeline index")
        latent = [name for name in _LATENT_COMPONENTS if name in components]
        if latent:
            raise UsageError(
                f"--model {ref} is a {components.get('_class_name', 'latent')} pipeline (it has {', '.join(latent)}); "
                "the sdekit command samples pixel-space models (a UNet2DModel with a scheduler)."
            )
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    if (folder / "config.json").is_file():
        return folder
    raise UsageError(
        f"--model {ref} holds no model: expected unet/config.json (a pipeline saved by save_pretrained or "
        "training/train.py) or config.json (a model saved by save_pretrained)."
    )


def _load_network(model_dir: Path, ref: str, device: torch.device) -> torch.nn.Module:
    import diffusers
    from diffusers import ModelMixin

    config = _read_json(model_dir / "config.json", "the model config")
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise UsageError(
            f"--model {ref}: {model_dir / 'config.json'} names the class {name!r}, which is not a diffusers model."
        )
    if not any(model_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        found = f" (it has {', '.join(pickled)}, pickled weights, which sdekit never loads)" if pickled else ""
        raise UsageError(
            f"--model {ref} has no safetensors weights in {model_dir}{found}; save the model with "
            "save_pretrained(..., safe_serialization=True)."
        )
    try:
        model = cls.from_pretrained(model_dir, use_safetensors=True, torch_dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load the model in {model_dir}: {' '.join(str(err).split())}") from None
    # Weights may come as views into the file's memory map, at whatever offsets the file has (a plain run), or in
    # freshly allocated memory (diffusers under a distributed launch). Vectorized CPU kernels can round differently
    # for operands aligned differently, so every tensor is copied into fresh memory: the model then computes the
    # same bits however it was loaded, and a sharded run gives exactly a one-process run's output.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return model.to(device).eval().requires_grad_(False)


def _sample_shape(model: torch.nn.Module, ref: str) -> tuple[int, int, int]:
    config = getattr(model, "config", {})
    channels, size = config.get("in_channels"), config.get("sample_size")
    if isinstance(size, int):
        size = (size, size)
    if not isinstance(channels, int) or not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise UsageError(
            f"--model {ref}: its config gives no in_channels and sample_size, so the shape of a sample is unknown."
        )
    return channels, int(size[0]), int(size[1])


def _available(kind: str) -> str:
    names = sorted({p.name for p in registry.list_plugins(kind=kind) if p.status == "ok"})
    return ", ".join(names)


def _missing_scheduler(ref: str, sampler: bool) -> UsageError:
    sampler_part = f" and the sampler with --sampler ({_available('sampler')})" if sampler else ""
    return UsageError(
        f"--model {ref} has no scheduler (no scheduler/scheduler_config.json), so the SDE its model was trained with "
        f"is unknown: pass it with --sde ({_available('sde')}){sampler_part}, e.g. "
        f"{'--sampler pf-ode ' if sampler else ''}--sde vp for a DDPM model; add --prediction-type if the model "
        'does not predict epsilon, and --sde-params for a continuous SDE (e.g. \'{"beta_min": 0.1, "beta_max": '
        "20}')."
    )


def _scheduler_config(folder: Path, model_dir: Path, ref: str, args: argparse.Namespace) -> dict[str, Any]:
    path = folder / "scheduler" / "scheduler_config.json"
    overrides = {
        key: value
        for key, value in (
            ("sde", args.sde),
            ("sde_params", args.sde_params),
            ("prediction_type", args.prediction_type),
            ("time_input", args.time_input),
        )
        if value is not None
    }
    if model_dir == folder or not path.is_file():
        if args.sde is None:
            raise _missing_scheduler(ref, sampler=hasattr(args, "sampler"))
        return {"prediction_type": "epsilon", **overrides}
    config = _read_json(path, "the scheduler config")
    if overrides:
        # The saved config described the model's SDE; an override replaces the description as a whole.
        if "sde" in overrides or "sde_params" in overrides:
            config.pop("sde_params", None)
        config.update(overrides)
    return config


def load_model(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    """Load ``args.model`` onto ``device`` with its scheduler configuration (and ``args``' SDE overrides).

    Raises:
        UsageError: the folder or Hub id cannot be found, holds no model or no safetensors weights, or has no
            scheduler while ``--sde`` is missing (the message says which options to pass).
    """
    folder = resolve_model_folder(args.model)
    model_dir = _model_folder(folder, args.model)
    config = _scheduler_config(folder, model_dir, args.model, args)
    model = _load_network(model_dir, args.model, device)
    return LoadedModel(model, config, folder, _sample_shape(model, args.model))


def build_scheduler(loaded: LoadedModel, name: str, options: dict[str, Any] | None = None) -> Any:
    """The sampler plugin ``name`` configured for ``loaded``'s model (``sdekit.load_scheduler(name, config,
    **options)``); its errors (an unknown name with the closest one, an unknown option with the accepted ones) are
    ``ValueError``s that say what to change."""
    try:
        return registry.load_scheduler(name, loaded.config, **(options or {}))
    except TypeError as err:  # a setting of the wrong type reaching the constructor
        raise UsageError(f"--sampler {name}: {err}") from None
