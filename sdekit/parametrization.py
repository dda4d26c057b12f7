"""Model outputs and model time: the one place that converts between them.

A model sees ``x_t = alpha(t) x_0 + sigma(t) eps`` (``alpha``, ``sigma`` from :meth:`SDE.marginal_coeffs`) and
returns one of four things (``prediction_type``):

* ``epsilon``: the noise ``eps``;
* ``sample``: the clean data ``x_0``;
* ``v_prediction``: ``v = alpha eps - sigma x_0`` (Salimans & Ho, 2022, section 4; diffusers' definition);
* ``score``: ``grad log p_t(x_t) = -eps / sigma`` (score-SDE; exact for the conditional, the
  denoising-score-matching target).

Every conversion goes through the pair ``(x_0, eps)``, which the kernel relates by ``x_t = alpha x_0 + sigma eps``.
For ``v`` the pair solves ``[alpha, sigma; -sigma, alpha] (x_0, eps) = (x_t, v)``, whose determinant is
``alpha^2 + sigma^2`` (1 for VP, not for VE or sub-VP).

The model's time input (``time_input``):

* ``ddpm``: ``t (N - 1)``, the score-SDE reference code's convention for DDPM checkpoints (``N`` = ``sde.N``);
* ``sigma``: the kernel std ``sigma(t)``, what NCSN / NCSN++ (VE) models are conditioned on;
* ``continuous``: ``t`` itself.
"""

from __future__ import annotations

import difflib

import torch

from .sde import SDE, TimeLike, broadcast_time, compute_dtype, time_tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score")
TIME_INPUTS = ("ddpm", "sigma", "continuous")

__all__ = [
    "PREDICTION_TYPES",
    "TIME_INPUTS",
    "check_choice",
    "compose_model_output",
    "convert_model_output",
    "from_model_time",
    "level_to_time",
    "model_output_to",
    "split_model_output",
    "time_to_level",
    "to_model_time",
]


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is in ``choices``; else raise ``ValueError`` naming ``name``, the choices, the closest."""
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.{hint}")


def split_model_output(
    output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(x_0, eps)`` pair that a model output of ``prediction_type`` implies at ``x_t = sample``.

    ``alpha`` and ``sigma`` are numbers or tensors that broadcast against ``sample``. Computation is in the
    tensors' dtype, or in ``sample``'s compute dtype for numbers.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if output.shape != sample.shape:
        raise ValueError(
            f"model output has shape {tuple(output.shape)} but the sample has shape {tuple(sample.shape)}; "
            "the model must return one value per sample element."
        )
    dtype = alpha.dtype if torch.is_tensor(alpha) else compute_dtype(sample.dtype)
    out = output.to(dtype)
    x = sample.to(dtype)
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - sigma * eps) / alpha
    elif prediction_type == "sample":
        x0 = out
        eps = (x - alpha * x0) / sigma
    elif prediction_type == "score":
        eps = -sigma * out
        x0 = (x - sigma * eps) / alpha
    else:  # v_prediction
        norm = alpha**2 + sigma**2
        x0 = (alpha * x - sigma * out) / norm
        eps = (sigma * x + alpha * out) / norm
    return x0, eps


def convert_model_output(
    output: torch.Tensor,
    sample: torch.Tensor,
    alpha: torch.Tensor | float,
    sigma: torch.Tensor | float,
    from_type: str,
    to_type: str,
) -> torch.Tensor:
    """Convert a model output from ``from_type`` to ``to_type`` at ``x_t = sample`` (dtypes as for
    :func:`split_model_output`)."""
    check_choice("to_type", to_type, PREDICTION_TYPES)
    if from_type == to_type and output.shape == sample.shape:
        return output.to(alpha.dtype if torch.is_tensor(alpha) else compute_dtype(sample.dtype))
    x0, eps = split_model_output(output, sample, alpha, sigma, from_type)
    return compose_model_output(x0, eps, alpha, sigma, to_type)


def compose_model_output(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float, to_type: str
) -> torch.Tensor:
    """The exact output of ``to_type`` for the pair ``(x_0, eps)`` of the kernel ``x_t = alpha x_0 + sigma eps``
    (a training target, or the last half of a conversion)."""
    check_choice("to_type", to_type, PREDICTION_TYPES)
    if to_type == "epsilon":
        return eps
    if to_type == "sample":
        return x0
    if to_type == "score":
        return -eps / sigma
    return alpha * eps - sigma * x0


def model_output_to(
    sde: SDE, output: torch.Tensor, sample: torch.Tensor, t: TimeLike, from_type: str, to_type: str
) -> torch.Tensor:
    """:func:`convert_model_output` with ``alpha`` and ``sigma`` from ``sde`` at ``t``; returns ``sample``'s dtype."""
    tt = broadcast_time(t, sample)
    alpha, sigma = sde.marginal_coeffs(tt)
    return convert_model_output(output, sample, alpha, sigma, from_type, to_type).to(sample.dtype)


def to_model_time(sde: SDE, t: TimeLike, time_input: str) -> torch.Tensor:
    """The model's timestep input for continuous time ``t`` under the ``time_input`` convention."""
    check_choice("time_input", time_input, TIME_INPUTS)
    t = time_tensor(t)
    if time_input == "ddpm":
        return t * (sde.N - 1)
    if time_input == "sigma":
        return sde.sigma(t)
    return t


def time_to_level(t: float | torch.Tensor, num_levels: int) -> int | torch.Tensor:
    """The training level ``round(t (N - 1))`` nearest continuous time ``t`` on a table of ``N = num_levels``
    levels at ``t_i = i / (N - 1)``: an ``int`` for a number, an int64 tensor for a tensor."""
    if torch.is_tensor(t):
        return torch.round(t * (num_levels - 1)).to(torch.int64)
    return round(t * (num_levels - 1))


def level_to_time(level: int | torch.Tensor, num_levels: int) -> float | torch.Tensor:
    """The continuous time ``i / (N - 1)`` of training level ``i`` on a table of ``N = num_levels`` levels
    (float64 for a tensor); the inverse of :func:`time_to_level`."""
    if torch.is_tensor(level):
        return level.to(torch.float64) / (num_levels - 1)
    return level / (num_levels - 1)


def from_model_time(sde: SDE, timestep: TimeLike, time_input: str) -> torch.Tensor:
    """Continuous time ``t`` for a model timestep; inverse of :func:`to_model_time`.

    For ``sigma`` the SDE's :meth:`~sdekit.sde.SDE.t_from_sigma` maps noise levels back (the VE SDE defines it;
    for an SDE that does not, it raises ``ValueError``).
    """
    check_choice("time_input", time_input, TIME_INPUTS)
    timestep = time_tensor(timestep)
    if time_input == "ddpm":
        return timestep / (sde.N - 1)
    if time_input == "sigma":
        return sde.t_from_sigma(timestep)
    return timestep
