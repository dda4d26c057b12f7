"""The SDE protocol and the math every SDE shares.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021 (below: "score-SDE"). A forward SDE ``dx = f(x, t) dt + g(t) dw`` on
``t in [0, T]`` (eq. 5) has the reverse-time SDE ``dx = [f - g^2 score] dt + g dw_bar`` (eq. 6) and the
probability-flow ODE ``dx = [f - g^2 score / 2] dt`` (eq. 13).

Conventions shared by every SDE here:

* ``x`` has any shape ``(B, ...)``; the first dimension is the batch.
* ``t`` is a Python number, a 0-d tensor, or a 1-d tensor with one value per sample.
* Per-time coefficients come back shaped to broadcast against ``x``: ``()`` for a scalar ``t``,
  ``(B, 1, ..., 1)`` for per-sample ``t``.
* Arithmetic runs in at least float32 (float16 / bfloat16 inputs are upcast); results have ``x``'s dtype.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

TimeLike = Union[float, torch.Tensor]
ScoreFn = Callable[[torch.Tensor, TimeLike], torch.Tensor]

__all__ = [
    "SDE",
    "VPTypeSDE",
    "ReverseSDE",
    "ScoreFn",
    "TimeLike",
    "broadcast_time",
    "compute_dtype",
    "gaussian_log_prob",
    "linear_coefficients",
    "time_tensor",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for inputs of ``dtype``: float32 for half types, else ``dtype`` itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if not dtype.is_floating_point:
        return torch.float32
    return dtype


def broadcast_time(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    """Return ``t`` as a tensor on ``x``'s device, in ``x``'s compute dtype, broadcastable against ``x``.

    A scalar stays 0-d; a 1-d ``t`` with one value per sample becomes ``(B, 1, ..., 1)``.
    """
    dtype = compute_dtype(x.dtype)
    t = torch.as_tensor(t, device=x.device, dtype=dtype)
    if t.ndim == 0:
        return t
    batch = x.shape[0] if x.ndim > 0 else None
    if t.ndim == 1 and t.shape[0] == batch:
        return t.reshape((batch,) + (1,) * (x.ndim - 1))
    raise ValueError(
        f"t must be a scalar or a 1-d tensor with one value per sample; got t of shape {tuple(t.shape)} "
        f"for x of shape {tuple(x.shape)}. Pass a float or a tensor of shape ({batch},)."
    )


def time_tensor(t: TimeLike) -> torch.Tensor:
    """``t`` as a floating tensor: numbers become float64, integer tensors float32, float tensors stay as they are."""
    if not torch.is_tensor(t):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float32)


def gaussian_log_prob(z: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """Log-density of ``N(0, std^2 I)`` at each sample of ``z``, summed over all but the batch dimension."""
    z = z.to(compute_dtype(z.dtype))
    std = torch.as_tensor(std, device=z.device, dtype=z.dtype)
    dims = math.prod(z.shape[1:])
    sq = z.reshape(z.shape[0], -1).pow(2).sum(dim=1)
    return -0.5 * dims * math.log(2 * math.pi) - dims * torch.log(std) - 0.5 * sq / std**2


_PROBE_VALUES = ((1.0, 1.0), (-2.5, 0.75))


def linear_coefficients(
    evaluate: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]], times: Sequence[float]
) -> tuple[list[float], list[float]]:
    """``(a, b)`` per time such that ``evaluate(x, t) == (a x, b)``: the coefficients of an SDE function that is
    linear in ``x`` with an ``x``-independent, isotropic second part, e.g. ``sde.sde`` (``f = a x``, ``g = b``:
    VE, VP and sub-VP, score-SDE eqs. 9, 11, 17) or ``sde.discretize``.

    ``evaluate`` is called on two probe tensors with one row per time (all times at once, float64).

    Raises:
        ValueError: the first part is not linear in ``x``, or the second depends on ``x`` or is not isotropic.
    """
    t = torch.as_tensor(list(times), dtype=torch.float64)
    n = t.numel()
    probes = [torch.tensor(values, dtype=torch.float64).expand(n, 2) for values in _PROBE_VALUES]
    results = [evaluate(probe, t) for probe in probes]
    a = results[0][0].to(torch.float64)[:, 0]
    scales = [torch.broadcast_to(torch.as_tensor(b, dtype=torch.float64), (n, 2)) for _, b in results]
    b = scales[0][:, 0]
    linear = all(
        torch.allclose(first.to(torch.float64), a[:, None] * probe, rtol=1e-6, atol=1e-12)
        for (first, _), probe in zip(results, probes)
    )
    isotropic = all(torch.allclose(scale, b[:, None].expand(n, 2), rtol=1e-9, atol=0.0) for scale in scales)
    if not (linear and isotropic):
        raise ValueError(
            "not of the form (a(t) x, b(t)) with a scalar a and an x-independent, isotropic b (checked on two probe "
            "tensors)"
        )
    return a.tolist(), b.tolist()


def _probe_times(sde: SDE) -> torch.Tensor:
    """A few float64 times across ``[sampling_eps, T]`` at which a property of the kernel is checked."""
    return torch.linspace(max(sde.sampling_eps, 1e-3), sde.T, 7, dtype=torch.float64)


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


class SDE(abc.ABC):
    """A forward diffusion SDE ``dx = f(x, t) dt + g(t) dw`` on ``t in [0, T]`` with Gaussian transition kernels.

    Subclasses implement :meth:`sde`, :meth:`marginal_coeffs`, :meth:`prior_sampling` and :meth:`prior_logp`;
    :meth:`marginal_prob`, :meth:`discretize` (Euler-Maruyama) and :meth:`reverse` are derived from them.

    An SDE also declares its own conventions, which sdekit's schedulers, losses and solvers ask it for instead of
    guessing from its name; the defaults below suit an SDE with no noise-level parametrization, and each SDE
    overrides what differs:

    * :meth:`scheduler_params` / :meth:`config_params`: how it is built from a scheduler configuration;
    * :meth:`default_time_input`: the model's timestep units (``ddpm``, ``sigma`` or ``continuous``);
    * :meth:`prior_std`: the standard deviation of its isotropic Gaussian prior;
    * :attr:`is_discrete`: whether it lives on a table of training levels;
    * :meth:`sigma` and :meth:`t_from_sigma`: noise level <-> time.

    Args:
        N: number of discretization steps the SDE is usually simulated with (the reference code's ``N``).
        sampling_eps: smallest time samplers integrate down to.
    """

    T: float = 1.0

    def __init__(self, N: int, sampling_eps: float) -> None:
        _check_positive_int("N", N)
        if not (0.0 <= sampling_eps < self.T):
            raise ValueError(f"sampling_eps must lie in [0, {self.T}), got {sampling_eps!r}.")
        self.N = N
        self.sampling_eps = float(sampling_eps)

    # -- what a concrete SDE defines -------------------------------------------------------------------

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f(x, t)`` (shape of ``x``) and diffusion ``g(t)`` (broadcastable against ``x``)."""

    @abc.abstractmethod
    def marginal_coeffs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale ``alpha(t)`` and std ``sigma(t)`` of the transition kernel ``x_t = alpha x_0 + sigma z``.

        Elementwise in ``t`` (a tensor of any shape, already in the compute dtype).
        """

    @abc.abstractmethod
    def prior_sampling(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Draw ``x_T`` from the prior ``p_T``."""

    @abc.abstractmethod
    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the prior at each sample of ``z``: a tensor of shape ``(B,)``."""

    # -- what an SDE declares about itself ------------------------------------------------------------

    @classmethod
    def config_params(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments taken from a scheduler configuration's shared keys (``num_train_timesteps``,
        the DDPM table, ``sigma_min`` / ``sigma_max``, ...) when it gives no ``sde_params``.

        The default takes none: the SDE's own defaults. The VP family takes the DDPM table, the VE SDE its noise
        range; a plugin picks whatever keys describe it.
        """
        return {}

    @classmethod
    def scheduler_params(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments for the SDE a scheduler configuration describes: ``config["sde_params"]`` if
        given, else :meth:`config_params`, plus ``sampling_eps`` if the configuration sets it
        (:func:`sdekit.sde_from_config` builds the SDE from them)."""
        sde_params = config.get("sde_params")
        if sde_params is not None and not isinstance(sde_params, Mapping):
            raise ValueError(f"sde_params must be a dict of SDE parameters or None, got {sde_params!r}.")
        params = dict(sde_params) if sde_params is not None else cls.config_params(config)
        if config.get("sampling_eps") is not None:
            params["sampling_eps"] = config["sampling_eps"]
        return params

    def default_time_input(self) -> str:
        """The model's timestep units when a configuration does not say: ``continuous`` (``t`` itself) unless the
        SDE declares otherwise (``ddpm`` for the VP family, ``sigma`` for VE)."""
        return "continuous"

    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior (a scheduler's ``init_noise_sigma``).

        The default reads it off :meth:`prior_logp` at the origin: for ``N(0, s^2)`` in one dimension
        ``log p(0) = -log(2 pi) / 2 - log s``.
        """
        logp0 = self.prior_logp(torch.zeros(1, 1, dtype=torch.float64))
        return float(torch.exp(-logp0[0] - 0.5 * math.log(2 * math.pi)))

    @property
    def is_discrete(self) -> bool:
        """Whether the SDE lives on a table of ``N`` training levels at ``t_i = i / (N - 1)`` (samplers then visit
        at most ``N`` levels). Default False."""
        return False

    def sigma(self, t: TimeLike) -> torch.Tensor:
        """The noise level at time ``t``: the std of the transition kernel, ``marginal_coeffs(t)[1]``."""
        t = time_tensor(t)
        return self.marginal_coeffs(t.to(compute_dtype(t.dtype)))[1]

    def t_from_sigma(self, sigma: TimeLike) -> torch.Tensor:
        """The time whose noise level is ``sigma``: the inverse of :meth:`sigma`, where the SDE defines one.

        Raises:
            ValueError: the SDE does not define it (the default), so ``sigma`` model times cannot be mapped back.
        """
        raise ValueError(
            f"{type(self).__name__} does not define t_from_sigma(), so sigma model times cannot be mapped back to t; "
            "use time_input='ddpm' or 'continuous' with this SDE."
        )

    def is_variance_exploding(self) -> bool:
        """Whether the kernel's scale is 1 (``x_t = x_0 + sigma(t) z``): checked on ``marginal_coeffs``."""
        alpha, _ = self.marginal_coeffs(_probe_times(self))
        return bool(torch.allclose(alpha, torch.ones_like(alpha), rtol=0, atol=1e-12))

    def is_variance_preserving(self) -> bool:
        """Whether ``alpha(t)^2 + sigma(t)^2 = 1`` (the VP SDE, DDPM): checked on ``marginal_coeffs``."""
        alpha, sigma = self.marginal_coeffs(_probe_times(self))
        total = alpha**2 + sigma**2
        return bool(torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-9))

    # -- derived --------------------------------------------------------------------------------------

    def marginal_prob(self, x0: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``p_{0t}(x_t | x_0)``; the std is broadcastable against ``x0``."""
        tt = broadcast_time(t, x0)
        alpha, sigma = self.marginal_coeffs(tt)
        mean = alpha * x0.to(tt.dtype)
        return mean.to(x0.dtype), sigma.to(x0.dtype)

    def discretize(self, x: torch.Tensor, t: TimeLike, dt: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step from ``t - dt`` to ``t``: ``x_t = x + f + G z`` with ``z ~ N(0, I)``.

        The default is Euler-Maruyama, ``f = f(x, t) dt`` and ``G = g(t) sqrt(dt)``; ``dt`` defaults to ``T / N``.
        """
        dt = self.T / self.N if dt is None else dt
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (score-SDE eq. 6) or, with ``probability_flow``, the probability-flow ODE (eq. 13)."""
        return ReverseSDE(self, score_fn, probability_flow)

    def _check_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) == 0 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty sequence of positive sizes (batch first), got {shape}.")
        return shape

    def _standard_normal(
        self,
        shape: Sequence[int],
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        device = torch.device(device) if device is not None else None
        return randn_tensor(self._check_shape(shape), generator=generator, device=device, dtype=dtype)


class VPTypeSDE(SDE):
    """An SDE with drift ``-beta(t) x / 2`` whose kernel scale is ``sqrt(alpha_bar(t))`` (VP and sub-VP).

    Subclasses give ``beta(t)`` and ``log_alpha_bar(t) = -int_0^t beta(s) ds``; both elementwise in ``t``.
    """

    @abc.abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """The noise rate ``beta(t)``."""

    @abc.abstractmethod
    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``log alpha_bar(t) = -int_0^t beta(s) ds``."""

    @abc.abstractmethod
    def diffusion(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusion coefficient ``g(t)``."""

    def default_time_input(self) -> str:
        """``ddpm``: a VP-type model takes ``t (N - 1)``, a DDPM checkpoint's integer levels on a table."""
        return "ddpm"

    def alpha_bar(self, t: TimeLike) -> torch.Tensor:
        """``alpha_bar(t)``, the squared mean coefficient (DDPM's cumulative product of ``1 - beta_i``)."""
        return torch.exp(self.log_alpha_bar(time_tensor(t)))

    def log_mean_coeff(self, t: TimeLike) -> torch.Tensor:
        """``log sqrt(alpha_bar(t))``, the log of the kernel's mean coefficient."""
        return 0.5 * self.log_alpha_bar(time_tensor(t))

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``-beta(t) x / 2`` and diffusion ``g(t)``."""
        tt = broadcast_time(t, x)
        drift = -0.5 * self.beta(tt) * x.to(tt.dtype)
        return drift.to(x.dtype), self.diffusion(tt).to(x.dtype)


class ReverseSDE:
    """The reverse-time process of a forward :class:`SDE` driven by a score function.

    ``sde(x, t)`` returns drift and diffusion in forward-time coordinates: integrating from ``t`` to
    ``t - dt`` is ``x - drift * dt + diffusion * sqrt(dt) * z``. With ``probability_flow`` the diffusion is zero
    and the drift is the probability-flow ODE's (score-SDE eq. 13).
    """

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False) -> None:
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.T = forward.T
        self.N = forward.N

    def _weight(self) -> float:
        return 0.5 if self.probability_flow else 1.0

    def sde(self, x: torch.Tensor, t: TimeLike) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift ``f - w g^2 score`` (``w = 1/2`` for the ODE, else 1) and diffusion (zero for the ODE)."""
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        drift = drift - diffusion**2 * score * self._weight()
        if self.probability_flow:
            diffusion = torch.zeros_like(diffusion)
        return drift, diffusion

    def discretize(self, x: torch.Tensor, t: TimeLike, dt: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse of the forward discretization (score-SDE eq. 46): ``x_{t-dt} = x - rev_f + rev_G z``."""
        f, G = self.forward.discretize(x, t, dt)
        score = self.score_fn(x, t)
        rev_f = f - G**2 * score * self._weight()
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G
