"""Calling a model and unwrapping its output: the one place that knows how diffusers-style models answer.

A model is anything called as ``model(sample, timestep)`` that returns a tensor, a tuple whose first item is one,
or an object with a ``.sample`` tensor (``UNet2DModel``'s ``UNet2DOutput``). The samplers' helpers, the
likelihood, the losses, ``sample_ode`` and Analytic-DPM's Gamma estimation all call models through
:func:`model_prediction`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["model_device_dtype", "model_prediction"]


def model_prediction(
    model: Any, sample: torch.Tensor, timestep: float | torch.Tensor, *, expect_shape: bool = False
) -> torch.Tensor:
    """Call a diffusers-style model and return its prediction tensor.

    Args:
        model: called as ``model(sample, timestep)``; it returns a tensor, a tuple whose first item is one, or an
            object with a ``.sample`` tensor (as ``UNet2DModel`` does).
        sample: the model input.
        timestep: the model's timestep input, a number or a tensor (passed as a tensor on ``sample``'s device).
        expect_shape: also check that the prediction has ``sample``'s shape (one value per input element).

    Raises:
        TypeError: the model returned something else.
        ValueError: with ``expect_shape``, the prediction's shape differs from the input's.
    """
    output = model(sample, torch.as_tensor(timestep, device=sample.device))
    if torch.is_tensor(output):
        prediction = output
    elif torch.is_tensor(getattr(output, "sample", None)):
        prediction = output.sample
    elif isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        prediction = output[0]
    else:
        raise TypeError(
            f"the model returned {type(output).__name__}; expected a tensor, a tuple whose first item is one, or an "
            "object with a .sample tensor (as diffusers' UNet2DModel returns)."
        )
    if expect_shape and prediction.shape != sample.shape:
        raise ValueError(
            f"the model returned shape {tuple(prediction.shape)} for an input of shape {tuple(sample.shape)}; it "
            "must predict one value per input element (a model with learned variances returns twice the channels)."
        )
    return prediction


def model_device_dtype(model: Any, like: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype ``model`` takes its inputs: its ``device`` / ``dtype`` attributes (diffusers
    models), else its first parameter's, else those of the tensor ``like`` (float32 if ``like`` is not float)."""
    device, dtype = getattr(model, "device", None), getattr(model, "dtype", None)
    if not isinstance(device, torch.device) or not isinstance(dtype, torch.dtype):
        parameters = model.parameters() if isinstance(model, torch.nn.Module) else iter(())
        first = next(parameters, None)
        if first is not None:
            device, dtype = first.device, first.dtype
        else:
            device, dtype = like.device, like.dtype if like.is_floating_point() else torch.float32
    return device, dtype
