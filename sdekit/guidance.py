"""Sampling with any sdekit sampler, optionally guided by a time-dependent classifier.

Score-SDE (Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021), section 5, eq. 14 and appendix I.1:
to sample ``p_0(x | y)``, solve the reverse SDE with the conditional score
``grad_x log p_t(x | y) = grad_x log p_t(x) + grad_x log p_t(y | x)``, where ``p_t(y | x)`` is a classifier
trained on noisy data ``x_t``. With a guidance scale ``w`` the score becomes
``s(x, t) + w grad_x log softmax(logits(x, t))[y]`` (``w = 1``: the exact conditional; Dhariwal & Nichol 2021
call ``w > 1`` classifier scale).

Every sampler reads the score through its model output, so :class:`ClassifierGuidance` turns the output into the
score (:mod:`sdekit.parametrization`), adds the term and turns it back into the same ``prediction_type``; with
``score = -eps / sigma`` that is ``eps - w sigma grad log p(y | x)`` for epsilon models (Dhariwal & Nichol,
eq. 14). It sits between the model call and ``scheduler.step`` of any loop; :func:`sample` runs the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .controllable import check_scheduler, denoise, initial_noise, model_sample_shape
from .models import model_device_dtype
from .parametrization import convert_model_output, from_model_time
from .scheduler import SDEScheduler
from .sde import TimeLike, broadcast_time, compute_dtype

__all__ = ["Classifier", "ClassifierGuidance", "sample"]


class Classifier(Protocol):
    """A time-dependent classifier: ``classifier(x, timestep)`` returns logits ``(batch, classes)`` for noisy
    samples ``x`` at the model's timestep input ``timestep`` (a scalar or one per sample)."""

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(batch, classes)``."""


def _check_scale(guidance_scale: Any) -> float:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"guidance_scale must be a number (1: the exact conditional), got {guidance_scale!r}.")
    value = float(guidance_scale)
    if not torch.isfinite(torch.tensor(value)) or value < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}.")
    return value


def _labels(class_labels: Any, batch_size: int | None) -> torch.Tensor:
    """``class_labels`` as an int64 tensor ``(B,)`` (an int is used for every sample)."""
    if isinstance(class_labels, bool):
        raise ValueError(f"class_labels must be class indices (an int, a sequence or a tensor), got {class_labels!r}.")
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool or labels.ndim > 1:
        raise ValueError(
            f"class_labels must be integer class indices, one per sample (shape (B,)) or one for all; got "
            f"{class_labels!r}."
        )
    if labels.ndim == 0:
        if batch_size is None:
            return labels.reshape(1).to(torch.int64)
        labels = labels.expand(batch_size)
    if batch_size is not None and labels.shape[0] != batch_size:
        raise ValueError(f"class_labels has {labels.shape[0]} labels for a batch of {batch_size} samples.")
    if bool((labels < 0).any()):
        raise ValueError(f"class_labels must be >= 0, got {labels.tolist()}.")
    return labels.to(torch.int64)


class ClassifierGuidance:
    """Classifier guidance inside any sampling loop: call it on the model output before ``scheduler.step()``.

    ``guidance(model_output, timestep, sample)`` returns the output of the same ``prediction_type`` whose score is
    the model's plus ``guidance_scale * grad_x log softmax(classifier(sample, timestep))[y]`` (score-SDE eq. 14).
    The gradient is taken with autograd through the classifier, in at least float32.

    Args:
        scheduler: the sdekit scheduler of the loop: its SDE, ``time_input`` and ``prediction_type`` say how to
            convert (``epsilon``, ``v_prediction``, ``sample`` or ``score``).
        classifier: ``classifier(x, timestep)`` returning logits ``(batch, classes)``; it takes the same timestep
            input as the model.
        class_labels: the class of each sample, ``(B,)`` integers (or one int for all).
        guidance_scale: the weight ``w`` of the classifier's gradient, ``>= 0``; default 1.0 (the exact conditional
            for an exact classifier).

    Raises:
        ValueError: (when called) the logits do not have shape ``(batch, classes)``, or a label is not a class.
    """

    def __init__(
        self,
        scheduler: SDEScheduler,
        classifier: Classifier,
        class_labels: int | Sequence[int] | torch.Tensor,
        guidance_scale: float = 1.0,
    ) -> None:
        self.scheduler = check_scheduler(scheduler, "ClassifierGuidance")
        if not callable(classifier):
            raise ValueError(f"classifier must be callable as classifier(x, timestep), got {classifier!r}.")
        self.classifier = classifier
        self.class_labels = _labels(class_labels, None)
        self.guidance_scale = _check_scale(guidance_scale)
        self._checked_classes: int | None = None

    def log_prob_grad(self, sample: torch.Tensor, timestep: TimeLike) -> torch.Tensor:
        """``grad_x log softmax(classifier(x, timestep))[y]`` at ``x = sample``, in ``sample``'s compute dtype."""
        batch = sample.shape[0]
        labels = self.class_labels.to(sample.device)
        if labels.shape[0] == 1:
            labels = labels.expand(batch)
        elif labels.shape[0] != batch:
            raise ValueError(f"class_labels has {labels.shape[0]} labels for a batch of {batch} samples.")
        with torch.enable_grad():
            x = sample.detach().to(compute_dtype(sample.dtype)).requires_grad_(True)
            logits = self.classifier(x, timestep)
            if not torch.is_tensor(logits) or logits.ndim != 2 or logits.shape[0] != batch:
                shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
                raise ValueError(
                    f"the classifier returned logits of shape {shape} for a batch of {batch} samples; it must "
                    f"return (batch, classes) = ({batch}, classes)."
                )
            if self._checked_classes != logits.shape[1]:
                if bool((labels >= logits.shape[1]).any()):
                    raise ValueError(
                        f"class_labels holds {int(labels.max())}, but the classifier has {logits.shape[1]} classes "
                        f"(labels 0 to {logits.shape[1] - 1})."
                    )
                self._checked_classes = logits.shape[1]
            log_probs = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), dim=1)
            chosen = log_probs.gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, x)
        return grad

    def __call__(self, model_output: torch.Tensor, timestep: TimeLike, sample: torch.Tensor) -> torch.Tensor:
        """The guided model output, of the model output's ``prediction_type``, shape and dtype."""
        if self.guidance_scale == 0:
            return model_output
        scheduler = self.scheduler
        prediction_type = scheduler.config.prediction_type
        t = from_model_time(scheduler.sde, torch.as_tensor(timestep, device=sample.device), scheduler.time_input)
        x = sample.to(compute_dtype(sample.dtype))
        alpha, sigma = scheduler.sde.marginal_coeffs(broadcast_time(t, x))
        score = convert_model_output(model_output, x, alpha, sigma, prediction_type, "score")
        score = score + self.guidance_scale * self.log_prob_grad(sample, timestep).to(score.dtype)
        guided = convert_model_output(score, x, alpha, sigma, "score", prediction_type)
        return guided.to(model_output.dtype)


def sample(
    model: Any,
    scheduler: SDEScheduler,
    batch_size: int,
    *,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    classifier: Classifier | None = None,
    class_labels: int | Sequence[int] | torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    sample_shape: Sequence[int] | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """Draw ``batch_size`` samples from the model with any sdekit sampler, optionally class-conditional.

    Args:
        model: a diffusers-style model (``model(x, t).sample``) of the scheduler's ``prediction_type`` and time
            input.
        scheduler: an sdekit scheduler (``sdekit.load_scheduler(name, config)``); its timesteps are set here.
        batch_size: number of samples.
        num_inference_steps: noise levels for the scheduler.
        generator: the only randomness (a list of generators: sample ``i`` draws from generator ``i``, so it does
            not depend on the batch it is in).
        classifier: a time-dependent classifier, ``classifier(x, timestep)`` returning logits ``(batch, classes)``
            (:class:`ClassifierGuidance`); default none (unconditional sampling).
        class_labels: with ``classifier``: the class of each sample (``(batch_size,)`` integers, or one int).
        guidance_scale: weight of the classifier's gradient in the score; default 1.0.
        sample_shape: the shape of one sample; default from the model's config (``in_channels``,
            ``sample_size``), which a ``UNet2DModel`` has.
        show_progress: report progress per model evaluation (:class:`sdekit.progress.Progress`).

    Returns:
        ``(batch_size, *sample_shape)`` samples in the model's dtype, on its device.
    """
    check_scheduler(scheduler, "sample")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if (classifier is None) != (class_labels is None):
        missing = "class_labels" if classifier is not None else "classifier"
        raise ValueError(f"classifier guidance needs both classifier and class_labels; {missing} is missing.")
    shape = model_sample_shape(model) if sample_shape is None else tuple(int(s) for s in sample_shape)
    if shape is None:
        raise ValueError(
            f"the model's config gives no sample shape (in_channels, sample_size); pass sample_shape=(C, H, W) "
            f"for {type(model).__name__}."
        )
    guidance = None
    if classifier is not None:
        guidance = ClassifierGuidance(scheduler, classifier, _labels(class_labels, batch_size), guidance_scale)
    device, dtype = model_device_dtype(model, torch.empty(0))
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = initial_noise(scheduler, (batch_size, *shape), generator, device, dtype)
    return denoise(
        model, scheduler, x, generator=generator, guidance=guidance, desc="sample", show_progress=show_progress
    )
