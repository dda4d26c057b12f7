"""The sampling loop that controllable generation shares (:func:`sdekit.sample`, :func:`sdekit.inpaint`,
:func:`sdekit.colorize`), and the checks of what it is given.

The loop is the one a diffusers pipeline runs, with two places to hook in: a *guidance* that changes the model
output before ``scheduler.step`` (:class:`sdekit.guidance.ClassifierGuidance`) and a *conditioning* called on the
sample after it (:class:`sdekit.inpainting.Inpainting`), which may also repeat evaluations (RePaint's
resampling) and so chooses the timesteps. It uses only the public scheduler API.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch
from diffusers.utils.torch_utils import randn_tensor

from .models import model_prediction
from .progress import Progress
from .scheduler import SDEScheduler

__all__ = [
    "Conditioning",
    "Guidance",
    "check_image_size",
    "check_scheduler",
    "denoise",
    "initial_noise",
    "model_sample_shape",
]


class Guidance(Protocol):
    """Changes the model output before ``scheduler.step``: ``guidance(model_output, timestep, sample)``."""

    def __call__(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output to hand to ``scheduler.step`` instead of ``model_output``."""


class Conditioning(Protocol):
    """Conditions the sample: ``start(sample)`` before the first step, ``conditioning(sample)`` after every step,
    and ``timesteps()`` the evaluations to run (with repeats)."""

    num_evaluations: int

    def start(self, sample: torch.Tensor) -> torch.Tensor:
        """The starting sample, conditioned."""

    def timesteps(self) -> Iterable[torch.Tensor]:
        """The timesteps to evaluate, in order."""

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        """The sample after a step, conditioned."""


def check_scheduler(scheduler: Any, what: str) -> SDEScheduler:
    """Return ``scheduler`` if it is an sdekit scheduler; else raise ``ValueError`` saying how to get one."""
    if not isinstance(scheduler, SDEScheduler):
        raise ValueError(
            f"{what} needs an sdekit scheduler (it reads the SDE's noise levels), got {type(scheduler).__name__}; "
            "build one with sdekit.load_scheduler(name, pipe.scheduler.config)."
        )
    return scheduler


def model_sample_shape(model: Any) -> tuple[int, ...] | None:
    """The shape of one sample the model takes, ``(in_channels, height, width)`` from a ``UNet2DModel``-like
    ``config`` (``in_channels``, ``sample_size`` as a number or a pair); ``None`` if the config does not say."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    size = config.get("sample_size") if hasattr(config, "get") else getattr(config, "sample_size", None)
    channels = config.get("in_channels") if hasattr(config, "get") else getattr(config, "in_channels", None)
    if size is None or channels is None:
        return None
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(height), int(width)


def check_image_size(model: Any, image: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming both sizes if ``image`` (batch first) does not have the model's sample shape
    (when the model's config gives one)."""
    expected = model_sample_shape(model)
    if expected is not None and tuple(image.shape[1:]) != expected:
        raise ValueError(
            f"{name} has size {tuple(image.shape[1:])} (channels, height, width) but the model takes {expected}; "
            f"resize {name} to the model's size."
        )


def denoise(
    model: Any,
    scheduler: SDEScheduler,
    sample: torch.Tensor,
    *,
    generator: torch.Generator | list[torch.Generator] | None,
    guidance: Guidance | None = None,
    conditioning: Conditioning | None = None,
    desc: str = "sampling",
    show_progress: bool = True,
) -> torch.Tensor:
    """Run ``scheduler`` from ``sample`` (drawn at its first level) through all its evaluations.

    ``scheduler.set_timesteps`` must have been called. Each evaluation calls the model on
    ``scheduler.scale_model_input(sample, t)`` (:func:`sdekit.models.model_prediction`), hands the output to
    ``guidance`` if given, steps, and hands the new sample to ``conditioning`` if given. Progress is reported per
    model evaluation with :class:`sdekit.progress.Progress`.
    """
    if conditioning is not None:
        sample = conditioning.start(sample)
        timesteps: Iterable[torch.Tensor] = conditioning.timesteps()
        total = conditioning.num_evaluations
    else:
        timesteps, total = scheduler.timesteps, len(scheduler.timesteps)
    with Progress(total=total, desc=desc, unit="step", disable=not show_progress) as bar:
        for t in timesteps:
            with torch.no_grad():
                output = model_prediction(model, scheduler.scale_model_input(sample, t), t, expect_shape=True)
            if guidance is not None:
                output = guidance(output, t, sample)
            sample = scheduler.step(output, t, sample, generator=generator).prev_sample
            if conditioning is not None:
                sample = conditioning(sample)
            bar.update(1)
    return sample


def initial_noise(
    scheduler: SDEScheduler,
    shape: Sequence[int],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The starting sample: standard normal noise from ``generator`` times the prior's std
    (``scheduler.init_noise_sigma``). A list of generators gives sample ``i`` the noise of generator ``i``."""
    return randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
