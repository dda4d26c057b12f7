"""Inpainting and colorization with any sdekit sampler: sampling with some values of the data known.

Score-SDE (Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, ICLR 2021), section 5 and appendix I.2: to sample
the unknown part of ``x`` given the known part ``y = mask * x``, run the unconditional sampler and, after every
step, overwrite the known values with ``y`` noised to the sample's new noise level,
``alpha(t) y + sigma(t) z`` (the forward kernel ``p_t(x_t | x_0)``). The unknown values then follow the reverse
SDE with the known ones sampled from their forward marginal. After the last step the known values are ``y``
itself.

A deterministic sampler (the probability-flow ODE, DDIM with ``eta = 0``) cannot undo a wrong turn that the
unknown values took before the known ones became informative; stochastic ones partly can. RePaint (Lugmayr,
Danelljan, Romero, Yu, Timofte & Van Gool, CVPR 2022, section 4.2 and Algorithm 1) adds *resampling*: after a
step from level ``t`` to level ``s``, jump back to ``t`` with the forward kernel ``q(x_t | x_s)`` and denoise
again, ``resample_steps`` times, so the two parts harmonise. Here a "step" is a group of evaluations that takes
the sample from one noise level to a lower one (a predictor-corrector level, Heun's two evaluations), and the
scheduler's state is snapshotted before the group and restored before each repeat, so any sampler (second-order,
multistep) repeats the group as it first ran it.

Colorization (appendix I.3) is the same with the known value being the gray channel of an orthonormal colour
basis (:data:`COLOR_BASIS`): the gray level of every pixel is fixed, its two colour coordinates are sampled.

:class:`Inpainting` and :class:`Colorization` are the per-step objects for a hand-written loop;
:func:`inpaint` and :func:`colorize` run the whole loop.
"""

from __future__ import annotations

import abc
import copy
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .controllable import check_image_size, check_scheduler, denoise, initial_noise, model_sample_shape
from .models import model_device_dtype
from .scheduler import SDEScheduler
from .sde import compute_dtype

__all__ = [
    "COLOR_BASIS",
    "Colorization",
    "Inpainting",
    "colorize",
    "couple_colors",
    "decouple_colors",
    "inpaint",
]

_S3, _S6, _S2 = math.sqrt(3.0), math.sqrt(6.0), math.sqrt(2.0)
COLOR_BASIS = torch.tensor(
    [[1 / _S3, 1 / _S3, 1 / _S3], [-2 / _S6, 1 / _S6, 1 / _S6], [0.0, 1 / _S2, -1 / _S2]], dtype=torch.float64
)
"""The decoupled colour basis (score-SDE appendix I.3), one basis vector per row: gray ``(1, 1, 1) / sqrt(3)``,
then two colour directions orthogonal to it and to each other. Orthonormal, so standard normal noise stays
standard normal in it and colorization can noise the gray channel on its own."""

_Level = tuple[float, float]
_DATA: _Level = (1.0, 0.0)  # (alpha, sigma) of the data itself: after the last evaluation


def decouple_colors(x: torch.Tensor) -> torch.Tensor:
    """RGB images ``(B, 3, ...)`` in the decoupled basis: channel 0 is ``(R + G + B) / sqrt(3)`` (the gray level
    times ``sqrt(3)``), channels 1 and 2 the colour. Computed in ``x``'s dtype."""
    _check_rgb(x, "x")
    return torch.einsum("ij,bj...->bi...", COLOR_BASIS.to(device=x.device, dtype=x.dtype), x)


def couple_colors(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`decouple_colors` (the basis is orthonormal: its transpose)."""
    _check_rgb(y, "y")
    return torch.einsum("ji,bj...->bi...", COLOR_BASIS.to(device=y.device, dtype=y.dtype), y)


def _check_rgb(x: torch.Tensor, name: str) -> None:
    if x.ndim < 2 or x.shape[1] != 3:
        raise ValueError(f"{name} must hold RGB images of shape (B, 3, ...), got shape {tuple(x.shape)}.")


def _check_image(image: Any, name: str) -> torch.Tensor:
    if not torch.is_tensor(image) or not image.is_floating_point() or image.ndim < 2 or image.shape[0] < 1:
        raise ValueError(f"{name} must be a floating-point tensor of shape (B, ...) with at least one sample.")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name} holds NaN or Inf.")
    return image


def _check_mask(mask: Any, image: torch.Tensor) -> torch.Tensor:
    """``mask`` as a boolean tensor that broadcasts against ``image`` (batch and channel may be 1; the other
    dimensions must equal the image's), after checking that it is binary."""
    mask = torch.as_tensor(mask, device=image.device)
    shape, wanted = tuple(mask.shape), tuple(image.shape)
    fits = mask.ndim == image.ndim and all(m == i or (m == 1 and d < 2) for d, (m, i) in enumerate(zip(shape, wanted)))
    if not fits:
        raise ValueError(
            f"mask has size {shape} but the image has size {wanted}; the mask must have the image's size (its batch "
            "and channel dimensions may be 1)."
        )
    if mask.dtype != torch.bool:
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            example = float(mask[~binary].flatten()[0])
            raise ValueError(
                f"mask must be binary, 1 where the image is known and 0 where it is generated; it holds {example!r}. "
                "Threshold it, e.g. mask > 0.5."
            )
    return mask.bool()


def _check_resample_steps(resample_steps: Any) -> int:
    if isinstance(resample_steps, bool) or not isinstance(resample_steps, int) or resample_steps < 0:
        raise ValueError(f"resample_steps must be an integer >= 0 (0: plain replacement), got {resample_steps!r}.")
    return resample_steps


_ATOMS = (type(None), bool, int, float, complex, str, bytes)


@functools.cache
def _is_frozen_dataclass(kind: type) -> bool:
    return is_dataclass(kind) and kind.__dataclass_params__.frozen


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """A deep copy of a sampler's state that shares what cannot change: numbers, strings and frozen dataclasses
    (a plan of per-step coefficients) are shared, lists, tuples and dicts rebuilt, tensors and any other object
    copied with :func:`copy.deepcopy`. The plan is as long as the trajectory and is copied at every step, so
    sharing its immutable entries keeps a snapshot cheap."""
    kind = type(value)
    if kind in _ATOMS or _is_frozen_dataclass(kind):
        return value
    found = memo.get(id(value))
    if found is not None:
        return found
    if kind is list:
        copied: Any = []
        memo[id(value)] = copied
        copied.extend(_copy_value(item, memo) for item in value)
    elif kind is dict:
        copied = {}
        memo[id(value)] = copied
        copied.update((key, _copy_value(item, memo)) for key, item in value.items())
    elif kind is tuple:
        copied = tuple(_copy_value(item, memo) for item in value)
        memo[id(value)] = copied
    else:
        copied = copy.deepcopy(value, memo)
    return copied


@dataclass(frozen=True)
class _Segment:
    """Evaluations ``start .. end - 1``, which take the sample from the noise level of evaluation ``start`` to a
    lower one; ``jump`` is the forward kernel back, ``(scale, std)``, or ``None`` if it is not resampled."""

    start: int
    end: int
    jump: tuple[float, float] | None


class _KnownValues(abc.ABC):
    """Keeps some values of the sample on the data's forward marginal during sampling, with RePaint resampling."""

    def __init__(
        self,
        scheduler: SDEScheduler,
        generator: torch.Generator | list[torch.Generator] | None,
        resample_steps: int,
    ) -> None:
        self.scheduler = check_scheduler(scheduler, type(self).__name__)
        self.generator = generator
        self.resample_steps = _check_resample_steps(resample_steps)
        self._segments: list[_Segment] | None = None
        self._levels: tuple[list[float] | None, list[_Level]] = (None, [])
        self._ends: dict[int, int] = {}
        self._repeats = 0
        self._snapshot: dict[str, Any] | None = None
        self._seen: int | None = None
        self._calls = 0
        self._iterating = False

    @abc.abstractmethod
    def _replace(self, sample: torch.Tensor, level: _Level) -> torch.Tensor:
        """``sample`` (compute dtype) with the known values set to the data at noise level ``(alpha, sigma)``."""

    # -- the plan: which evaluations form a step, and how to jump back over it ---------------------------------

    def _level(self, index: int) -> _Level:
        """``(alpha, sigma)`` of evaluation ``index``; the data's after the last one. Computed as Python floats for
        all evaluations at once when the scheduler's plan changes, so a step reads no tensor."""
        times = self.scheduler.eval_times
        if self._levels[0] is not times:
            alphas, sigmas = self.scheduler.sde.marginal_coeffs(torch.tensor(times, dtype=torch.float64))
            self._levels = (times, list(zip(alphas.tolist(), sigmas.tolist())))
        return _DATA if index >= len(times) else self._levels[1][index]

    def _plan(self) -> list[_Segment]:
        if self._segments is not None:
            return self._segments
        if self.scheduler.num_inference_steps is None:
            raise ValueError(f"call scheduler.set_timesteps() before using {type(self).__name__}.")
        times = self.scheduler.eval_times
        order = max(int(getattr(self.scheduler, "order", 1)), 1)
        first = self.scheduler.step_index
        first = (self.scheduler.begin_index or 0) if first is None else first
        segments, start = [], first
        for j in range(first, len(times)):
            last = j + 1 == len(times)
            # A step ends once the sample is below the level it started from, after a whole number of `order`
            # evaluations (Heun's predictor lands below its level, but the step ends with its corrector).
            if last or ((j + 1 - start) % order == 0 and times[j + 1] < times[start]):
                segments.append(_Segment(start, j + 1, self._jump(self._level(start), self._level(j + 1))))
                start = j + 1
        self._segments = segments
        self._ends = {s.end: i for i, s in enumerate(segments)}
        return segments

    def _jump(self, high: _Level, low: _Level) -> tuple[float, float] | None:
        """The forward kernel ``q(x_t | x_s) = N(a x_s, v)`` from level ``low`` (s) up to ``high`` (t): with
        ``x = alpha x_0 + sigma z`` at both, ``a = alpha_t / alpha_s`` and ``v = sigma_t^2 - a^2 sigma_s^2`` (the
        kernels' means and variances compose). ``None`` without resampling or if ``low`` is not lower."""
        if self.resample_steps == 0:
            return None
        scale = high[0] / low[0]
        variance = high[1] ** 2 - scale**2 * low[1] ** 2
        if not variance > 1e-12 * high[1] ** 2:
            return None
        return scale, math.sqrt(variance)

    @property
    def num_evaluations(self) -> int:
        """Model evaluations from here to the end, repeats included (for a progress bar)."""
        segments = self._plan()
        if not segments:
            return 0
        plain = segments[-1].end - segments[0].start
        return plain + self.resample_steps * sum(s.end - s.start for s in segments if s.jump is not None)

    # -- the loop's side ----------------------------------------------------------------------------------

    def start(self, sample: torch.Tensor) -> torch.Tensor:
        """Call once after ``scheduler.set_timesteps()`` and before the first step, on the starting noise: returns
        it with the known values at the first evaluation's noise level (and, with resampling, remembers the
        scheduler's state)."""
        self._segments = None
        segments = self._plan()
        self._repeats, self._seen, self._calls = 0, self.scheduler.step_index, 0
        self._snapshot = None
        if segments and segments[0].jump is not None:
            self._take_snapshot()
        if not segments:
            return sample
        return self._replace(sample.to(compute_dtype(sample.dtype)), self._level(segments[0].start)).to(sample.dtype)

    def timesteps(self) -> Iterator[torch.Tensor]:
        """The timesteps to evaluate, in order: ``scheduler.timesteps`` with each resampled step repeated. Iterate
        over this instead of ``scheduler.timesteps`` when ``resample_steps > 0``."""
        if self._segments is None:
            raise ValueError(f"call {type(self).__name__}.start(sample) before iterating over its timesteps().")
        self._iterating = True
        try:
            while True:
                index = self.scheduler.step_index
                index = (self.scheduler.begin_index or 0) if index is None else index
                if index >= len(self.scheduler.timesteps):
                    return
                calls = self._calls
                yield self.scheduler.timesteps[index]
                if self._calls == calls:
                    raise ValueError(
                        f"after each scheduler.step(), call the {type(self).__name__} object on the new sample "
                        "before taking the next timestep."
                    )
        finally:
            self._iterating = False

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        """Call after every ``scheduler.step()`` on its ``prev_sample``: returns the sample with the known values
        at the next evaluation's noise level (after the last step: the known values themselves). With
        ``resample_steps``, at the end of a step that is to be repeated it returns the sample jumped back to the
        step's starting level and restores the scheduler's state from then."""
        index = self.scheduler.step_index
        if index is None or index == self._seen:
            raise ValueError(f"call the {type(self).__name__} object once after every scheduler.step().")
        if self.resample_steps and self._segments is None:
            raise ValueError(
                f"with resample_steps, call {type(self).__name__}.start(sample) after set_timesteps() and iterate "
                "over its timesteps()."
            )
        self._calls += 1
        self._seen = index
        x = self._replace(sample.to(compute_dtype(sample.dtype)), self._level(index))
        position = self._ends.get(index) if self.resample_steps else None
        if position is not None:
            segment = self._segments[position]
            if segment.jump is not None and self._repeats < self.resample_steps:
                if not self._iterating:
                    raise ValueError(
                        f"resample_steps repeats evaluations: iterate over {type(self).__name__}.timesteps(), not "
                        "scheduler.timesteps."
                    )
                x = self._jump_back(x, segment.jump)
                self._repeats += 1
                self._restore_snapshot()
                self._seen = self.scheduler.step_index
                return x.to(sample.dtype)
            self._repeats = 0
            following = self._segments[position + 1] if position + 1 < len(self._segments) else None
            if following is not None and following.jump is not None:
                self._take_snapshot()
        return x.to(sample.dtype)

    def _jump_back(self, x: torch.Tensor, jump: tuple[float, float]) -> torch.Tensor:
        scale, std = jump
        return scale * x + std * self._noise(x.shape, x)

    def _noise(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return randn_tensor(shape, generator=self.generator, device=like.device, dtype=like.dtype)

    def _copy_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A deep copy of a scheduler's attributes (:func:`_copy_value`), sharing its SDE and its frozen config,
        which ``step()`` does not change."""
        scheduler = self.scheduler
        shared = (getattr(scheduler, "sde", None), scheduler.__dict__.get("_internal_dict"))
        memo: dict[int, Any] = {id(obj): obj for obj in shared}
        return _copy_value(state, memo)

    def _take_snapshot(self) -> None:
        self._snapshot = self._copy_state(vars(self.scheduler))

    def _restore_snapshot(self) -> None:
        # The last repeat of a step takes the snapshot itself; earlier ones a copy, as the step changes it.
        last = self._repeats == self.resample_steps
        saved = self._snapshot if last else self._copy_state(self._snapshot)
        if last:
            self._snapshot = None
        state = vars(self.scheduler)
        state.clear()
        state.update(saved)


class Inpainting(_KnownValues):
    """Inpainting inside any sampling loop: call it on the sample after every ``scheduler.step()``.

    After each step the values where ``mask`` is 1 become ``alpha image + sigma z`` at the noise level of the next
    evaluation (fresh ``z`` from ``generator``), and after the last step ``image`` itself (score-SDE, appendix
    I.2). With ``resample_steps = U > 0``, each step from one noise level to the next is repeated ``U`` times after
    jumping back with the forward kernel (RePaint, Lugmayr et al. 2022, Algorithm 1 with jump length 1); then the
    loop must iterate over :meth:`timesteps` and call :meth:`start` on the starting noise.

    Args:
        scheduler: an sdekit scheduler; ``set_timesteps`` before :meth:`start` (or the first call).
        image: ``(B, C, H, W)`` (or any ``(B, ...)``) data with the known values; the sample has this shape.
        mask: 1 (or True) where ``image`` is known, 0 where values are generated; the image's size, with batch and
            channel dimensions that may be 1. Any other value raises ``ValueError``.
        generator: the randomness for the noised known values and the jumps back (a list: one per sample).
        resample_steps: repeats of every step, ``U``; default 0 (plain replacement).
    """

    def __init__(
        self,
        scheduler: SDEScheduler,
        image: torch.Tensor,
        mask: torch.Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        resample_steps: int = 0,
    ) -> None:
        super().__init__(scheduler, generator, resample_steps)
        image = _check_image(image, "image")
        self.mask = _check_mask(mask, image)
        self.image = image

    def _replace(self, sample: torch.Tensor, level: _Level) -> torch.Tensor:
        alpha, sigma = level
        if sample.shape != self.image.shape:
            raise ValueError(
                f"the sample has shape {tuple(sample.shape)} but the image has shape {tuple(self.image.shape)}."
            )
        known = self.image.to(sample.dtype)
        if sigma > 0:
            known = alpha * known + sigma * self._noise(tuple(sample.shape), sample)
        return torch.where(self.mask, known, sample)


class Colorization(_KnownValues):
    """Colorization inside any sampling loop: call it on the sample after every ``scheduler.step()``.

    Inpainting in the decoupled colour basis (:data:`COLOR_BASIS`, score-SDE appendix I.3): after each step the
    gray coordinate of every pixel becomes ``alpha sqrt(3) gray + sigma z`` at the next evaluation's noise level,
    and ``sqrt(3) gray`` after the last step, so the result's channel mean is ``gray``; the two colour coordinates
    are sampled. Resampling and the loop as for :class:`Inpainting`.

    Args:
        scheduler: an sdekit scheduler for an RGB model.
        gray: ``(B, 1, ...)`` gray levels, the mean of the R, G, B values wanted (e.g. ``rgb.mean(1, keepdim=True)``).
        generator, resample_steps: as for :class:`Inpainting`.
    """

    def __init__(
        self,
        scheduler: SDEScheduler,
        gray: torch.Tensor,
        *,
        generator: torch.Generator | list[torch.Generator] | None = None,
        resample_steps: int = 0,
    ) -> None:
        super().__init__(scheduler, generator, resample_steps)
        gray = _check_image(gray, "gray")
        if gray.ndim < 3 or gray.shape[1] != 1:
            raise ValueError(
                f"gray must have one channel, shape (B, 1, H, W), got {tuple(gray.shape)}; for an RGB image pass "
                "rgb.mean(1, keepdim=True)."
            )
        self.gray = gray

    def _replace(self, sample: torch.Tensor, level: _Level) -> torch.Tensor:
        alpha, sigma = level
        expected = (self.gray.shape[0], 3, *self.gray.shape[2:])
        if tuple(sample.shape) != expected:
            raise ValueError(
                f"the sample has shape {tuple(sample.shape)}; colorizing this gray image needs {expected}."
            )
        decoupled = decouple_colors(sample)
        known = _S3 * self.gray.to(sample.dtype)  # the gray coordinate of (g, g, g)
        if sigma > 0:
            known = alpha * known + sigma * self._noise(tuple(known.shape), sample)
        return couple_colors(torch.cat([known, decoupled[:, 1:]], dim=1))


def inpaint(
    model: Any,
    scheduler: SDEScheduler,
    image: torch.Tensor,
    mask: torch.Tensor,
    *,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    resample_steps: int = 0,
    show_progress: bool = True,
) -> torch.Tensor:
    """Fill in the values of ``image`` where ``mask`` is 0 with samples from the model, given the rest.

    Runs ``scheduler`` (any sdekit sampler, set to ``num_inference_steps``) from the prior with
    :class:`Inpainting` after every step (score-SDE section 5 and appendix I.2; RePaint resampling with
    ``resample_steps``).

    Args:
        model: a diffusers-style model (``model(x, t).sample``, as :func:`sdekit.models.model_prediction` calls
            it) of the scheduler's ``prediction_type`` and time input.
        scheduler: an sdekit scheduler (``sdekit.load_scheduler(name, config)``); its timesteps are set here.
        image: ``(B, C, H, W)`` images of the model's size; the result has this shape and dtype.
        mask: 1 where ``image`` is known, 0 where to generate; binary, of the image's size (batch and channel may
            be 1).
        num_inference_steps: noise levels for the scheduler.
        generator: the only randomness (a list of generators: one per sample).
        resample_steps: repeats of every step after jumping back (RePaint); default 0. Each costs the step's model
            evaluations again; deterministic samplers need it to reconcile the two parts.
        show_progress: report progress per model evaluation (:class:`sdekit.progress.Progress`).

    Returns:
        The inpainted images: equal to ``image`` where ``mask`` is 1.

    Raises:
        ValueError: the image's size is not the model's, the mask's not the image's, or the mask is not binary.
    """
    check_scheduler(scheduler, "inpaint")
    image = _check_image(image, "image")
    check_image_size(model, image, "image")
    device, dtype = model_device_dtype(model, image)
    mask = _check_mask(mask, image).to(device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    known = image.to(device=device, dtype=dtype)
    conditioning = Inpainting(scheduler, known, mask, generator=generator, resample_steps=resample_steps)
    x = initial_noise(scheduler, image.shape, generator, device, dtype)
    x = denoise(
        model, scheduler, x, generator=generator, conditioning=conditioning, desc="inpaint", show_progress=show_progress
    )
    # Exact even when the model runs in a lower precision than the image.
    return torch.where(mask, image.to(device), x.to(image.dtype))


def colorize(
    model: Any,
    scheduler: SDEScheduler,
    gray: torch.Tensor,
    *,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    resample_steps: int = 0,
    show_progress: bool = True,
) -> torch.Tensor:
    """Colour images whose gray levels are ``gray``, with samples from an RGB model.

    Runs ``scheduler`` with :class:`Colorization` after every step (score-SDE appendix I.3): the gray coordinate
    of the decoupled colour basis is fixed, the colour coordinates are sampled.

    Args:
        model: a diffusers-style RGB model (3 channels).
        scheduler: an sdekit scheduler; its timesteps are set here.
        gray: ``(B, 1, H, W)`` gray levels in the model's data range (the mean of R, G and B), of the model's
            height and width.
        num_inference_steps, generator, resample_steps, show_progress: as for :func:`inpaint`.

    Returns:
        ``(B, 3, H, W)`` RGB images, in ``gray``'s dtype, whose channel mean is ``gray`` (up to rounding).
    """
    check_scheduler(scheduler, "colorize")
    gray = _check_image(gray, "gray")
    expected = model_sample_shape(model)
    if gray.ndim != 4 or gray.shape[1] != 1 or (expected is not None and (3, *gray.shape[2:]) != expected):
        wanted = f"(1, {expected[1]}, {expected[2]})" if expected is not None and expected[0] == 3 else "(1, H, W)"
        raise ValueError(
            f"gray has size {tuple(gray.shape[1:])} but colorizing for this model (which takes {expected}) needs one "
            f"gray channel of its height and width, {wanted}; colorize needs an RGB model."
        )
    device, dtype = model_device_dtype(model, gray)
    scheduler.set_timesteps(num_inference_steps, device=device)
    conditioning = Colorization(
        scheduler, gray.to(device=device, dtype=dtype), generator=generator, resample_steps=resample_steps
    )
    x = initial_noise(scheduler, (gray.shape[0], 3, *gray.shape[2:]), generator, device, dtype)
    x = denoise(
        model,
        scheduler,
        x,
        generator=generator,
        conditioning=conditioning,
        desc="colorize",
        show_progress=show_progress,
    )
    return x.to(gray.dtype)
