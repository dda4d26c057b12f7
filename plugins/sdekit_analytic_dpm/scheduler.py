"""Analytic-DPM as an sdekit scheduler.

Bao, Li, Zhu & Zhang, "Analytic-DPM: an Analytic Estimate of the Optimal Reverse Variance in Diffusion
Probabilistic Models", ICLR 2022 (below "the paper"). On a trajectory ``0 = tau_1 < ... < tau_K = N - 1`` of the
DDPM table's levels, a step from level ``t`` to the next lower level ``s`` is

    x_s = x0_coeff x0_hat + sample_coeff x_t + sigma z,        z ~ N(0, I),

the mean of DDIM's inference kernel ``q_lambda(x_s | x_t, x_0)`` at the model's (clipped) estimate ``x0_hat``
(the paper's optimal mean, Theorem 1), with ``lambda^2 = eta^2 beta_tilde`` (eta = 1: Analytic-DDPM, eta = 0:
Analytic-DDIM) and the variance

    sigma^2 = lambda^2 + (sqrt(bbar_t / alpha_{t|s}) - sqrt(bbar_s - lambda^2))^2 (1 - Gamma_t)

(Theorem 1 with ``Gamma_t = E ||eps_theta(x_t, t)||^2 / d``, section 3), clipped by Theorem 2 and, on the step
onto ``tau_1``, by the paper's pixel rule. The last step, from ``tau_1``, returns ``x0_hat`` without noise. The
formulas are in :mod:`sdekit_analytic_dpm.kernel`; see also ``docs/samplers/analytic-dpm.md``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from sdekit.likelihood import GaussianStep, model_device_dtype, model_prediction
from sdekit.parametrization import check_choice, from_model_time, split_model_output
from sdekit.progress import Progress
from sdekit.scheduler import SDEScheduler
from sdekit.sde import VPTypeSDE, compute_dtype

from .gamma import check_gamma, format_levels, x0_batches
from .kernel import VARIANCES, LevelPair, StepKernel, level_pairs, step_kernel, step_kl
from .trajectory import TRAJECTORIES, even_levels, optimal_levels, quadratic_levels

__all__ = ["GAMMA_ESTIMATORS", "AnalyticDPMScheduler"]

GAMMA_ESTIMATORS = ("norm", "error")
"""Monte Carlo estimators of ``Gamma`` accepted by :meth:`AnalyticDPMScheduler.estimate_gamma`."""


def _check_eta_value(eta: object) -> float:
    """``eta`` as a float if it is a number in ``[0, 1]``; else ``ValueError``."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta <= 1:
        raise ValueError(
            f"eta must be a number in [0, 1] (1 is Analytic-DDPM, 0 Analytic-DDIM; lambda^2 = eta^2 beta_tilde must "
            f"not exceed the target level's variance); got {eta!r}."
        )
    return float(eta)


def _gamma_cost(num_levels: int, num_samples: int = 1000, batch_size: int = 100) -> str:
    """The cost of :meth:`AnalyticDPMScheduler.estimate_gamma` at ``num_levels`` levels, in words.

    Every level evaluates the model once per data sample, in ``ceil(num_samples / batch_size)`` batched calls:
    ``"10 levels x 1000 samples = 10,000 model evaluations, i.e. 10 x ceil(1000 / batch_size) = 100 model calls
    at batch_size=100"``.
    """
    calls = num_levels * -(-num_samples // batch_size)
    return (
        f"{num_levels} levels x {num_samples} samples = {num_levels * num_samples:,} model evaluations, i.e. "
        f"{num_levels} x ceil({num_samples} / batch_size) = {calls:,} model calls at batch_size={batch_size}"
    )


def _level_list(levels: Sequence[int]) -> str | None:
    """``levels`` as a Python list literal, or ``None`` if too long to quote in a message."""
    return f"[{', '.join(map(str, levels))}]" if len(levels) <= 20 else None


@dataclass(frozen=True)
class _Step:
    """One evaluation's precomputed data: the table at both levels and the coefficients at the config's eta."""

    level: int
    target: int | None  # None: the data
    alpha: float  # sqrt(abar_t)
    sigma: float  # sqrt(bbar_t)
    pair: LevelPair | None  # floats; None for the last step
    gamma: float | None
    max_variance: float | None  # the pixel rule's bound on the step onto tau_1
    x0_coeff: float
    sample_coeff: float
    std: float


class AnalyticDPMScheduler(SDEScheduler):
    """Analytic-DPM (Bao et al., ICLR 2022): DDIM-family steps with the analytic estimate of the optimal variance.

    Runs in the unmodified diffusers pipelines like the other sdekit samplers; ``len(timesteps)`` equals
    ``num_inference_steps`` = ``K`` model calls. The analytic variance needs ``Gamma`` (``E||eps_theta(x_n, n)||^2
    / d`` at the table's levels), estimated once per model with :meth:`estimate_gamma` and stored in the config,
    so ``save_pretrained`` / ``from_pretrained`` keep it. Sampling needs it only at the trajectory's levels:
    ``estimate_gamma(model, data, timesteps="trajectory", num_inference_steps=K)`` estimates just those.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample_range, check_finite: the shared
            configuration of :class:`sdekit.scheduler.SDEScheduler` (defaults 1000, 0.0001, 0.02, ``"linear"``,
            ``None``, 0.01, 50.0, ``"vp"``, ``None``, ``None``, ``"epsilon"``, ``None``, 1.0, ``False``). The SDE
            must be ``vp`` on a discrete DDPM table with ``num_train_timesteps`` levels; ``sampling_eps`` is not
            used (trajectories end at the first level).
        clip_sample: the data lie in ``[-clip_sample_range, clip_sample_range]``: clip ``x0_hat`` to that range,
            bound the covariance estimate by Theorem 2 and apply the pixel rule; default True (the paper's setting).
        eta: DDIM's noise scale in ``[0, 1]``, ``lambda^2 = eta^2 beta_tilde``; default 1.0 (Analytic-DDPM; 0 is
            Analytic-DDIM, still stochastic). ``step(eta=...)`` overrides it for one call (``DDIMPipeline`` passes
            its own, default 0).
        variance: ``analytic`` (default), ``beta_tilde`` (``lambda^2`` itself: DDPM's ``beta_tilde`` at eta = 1,
            DDIM at eta = 0) or ``beta`` (DDPM's ``beta_{t|s}``); the latter two are the paper's baselines.
        gamma: ``Gamma_n`` for ``n = 0..N-1`` (``None`` entries where not estimated), or ``None`` (default). Set
            by :meth:`estimate_gamma`; a list of the wrong length, or values outside ``[0, 1]``, warn and are
            cut / clipped.
        trajectory: ``even`` (default), ``quadratic`` or ``optimal`` (the paper's dynamic program over the
            expected KL of each step, from ``gamma``; cached per ``K``). All start at level ``N - 1`` and end at 0.
        clip_pixel: the pixel rule: on the step onto the first level the analytic standard deviation is at most
            ``clip_pixel`` pixel widths ``2 clip_sample_range / 255`` in mean absolute value, i.e.
            ``sigma <= clip_pixel (2 clip_sample_range / 255) sqrt(pi / 2)``; default 2.0; ``None`` disables it.
    """

    integer_timesteps = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | np.ndarray | None = None,
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        sde: str = "vp",
        sde_params: dict | None = None,
        sampling_eps: float | None = None,
        prediction_type: str = "epsilon",
        time_input: str | None = None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        check_finite: bool = False,
        eta: float = 1.0,
        variance: str = "analytic",
        gamma: Sequence[float | None] | None = None,
        trajectory: str = "even",
        clip_pixel: float | None = 2.0,
    ) -> None:
        _check_eta_value(eta)
        check_choice("variance", variance, VARIANCES)
        check_choice("trajectory", trajectory, TRAJECTORIES)
        if clip_pixel is not None and (
            isinstance(clip_pixel, bool) or not isinstance(clip_pixel, numbers.Real) or not 0 < clip_pixel < math.inf
        ):
            raise ValueError(f"clip_pixel must be a number > 0 (pixel widths) or None, got {clip_pixel!r}.")
        self._setup()
        self._check_discrete_vp()
        levels = torch.arange(num_train_timesteps, dtype=torch.float64) / (num_train_timesteps - 1)
        self._log_abar = self.sde.log_alpha_bar(levels)
        if gamma is not None:
            self.register_to_config(gamma=check_gamma(gamma, num_train_timesteps, stacklevel=4))
        self._optimal_paths: dict[int, list[int]] = {}
        self._request: tuple[int | None, list[float] | None] | None = None
        self._steps: list[_Step] = []

    def _check_discrete_vp(self) -> None:
        preserving = isinstance(self.sde, VPTypeSDE) and all(
            abs(alpha**2 + sigma**2 - 1) < 1e-9 for alpha, sigma in map(self._coeffs, (0.1, 0.5, 0.9))
        )
        if not preserving or not self._is_discrete():
            raise ValueError(
                f"sde={self.config.sde!r} ({self.sde!r}) is not a variance-preserving SDE on a discrete DDPM table; "
                "Analytic-DPM's variances are defined on the table's levels. Use sde='vp' with the DDPM schedule "
                "(beta_start / beta_end / beta_schedule / trained_betas), no continuous sde_params."
            )
        if self.sde.N != self.config.num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps={self.config.num_train_timesteps} but the SDE's table has N={self.sde.N} "
                "levels; make them equal."
            )

    # -- Gamma --------------------------------------------------------------------------------------------

    def _gamma_at(self, levels: Sequence[int], purpose: str, trajectory: Sequence[int]) -> list[float]:
        """``Gamma`` at ``levels``, which belong to the sampling ``trajectory`` (its table levels); where it is
        missing, a ``ValueError`` that says how to estimate it at the trajectory's levels alone and what it costs."""
        gamma = self.config.gamma
        missing = [level for level in levels if gamma is None or gamma[level] is None]
        if not missing:
            return [gamma[level] for level in levels]
        num_levels = self.config.num_train_timesteps
        visited = sorted(set(trajectory))
        if gamma is None:
            head = (
                f"{purpose} needs Gamma_n = E||eps_theta(x_n, n)||^2 / d at the levels it visits, and this scheduler "
                "has none."
            )
            todo = visited
        else:
            head = f"{purpose} needs Gamma at timesteps {format_levels(missing)}, which were not estimated."
            todo = sorted(set(missing))
        quoted = _level_list(todo)
        call = "scheduler.estimate_gamma(model, data, num_samples=1000, "
        if todo == visited and self.config.trajectory != "optimal" and todo == self._trajectory(len(todo)):
            how = f"{call}timesteps='trajectory', num_inference_steps={len(todo)})"
            if quoted is not None:
                how += f", which estimates timesteps={quoted}"
        elif quoted is not None:
            how = f"{call}timesteps={quoted})"
        else:
            how = f"{call}timesteps=[...]) with these {len(todo)} levels ({format_levels(todo)})"
        raise ValueError(
            f"{head} Estimate it once per model at only these {len(todo)} levels: {how}. That costs "
            f"{_gamma_cost(len(todo))}; all {num_levels} levels (timesteps=None) would cost "
            f"{num_levels * 1000:,} model evaluations. data holds x_0 in the model's range (a tensor, a "
            "datasets.Dataset or an iterable of batches). Gamma is stored in the config, so save_pretrained() keeps "
            "it. Without Gamma, use variance='beta_tilde' or 'beta'."
        )

    def _optimal_remedy(self, num_samples: int, batch_size: int) -> str:
        """How to get the ``Gamma`` that the optimal trajectory needs, with the costs."""
        last = self.config.num_train_timesteps - 1
        grid = len(range(0, last, 10)) + 1
        return (
            f"Estimate Gamma at all {last + 1} levels with scheduler.estimate_gamma(model, data, "
            f"num_samples={num_samples}) ({_gamma_cost(last + 1, num_samples, batch_size)}), or at a grid of "
            f"candidate levels that includes 0 and {last}, e.g. timesteps=[*range(0, {last}, 10), {last}] (the "
            f"program then chooses among them; {_gamma_cost(grid, num_samples, batch_size)}). Or use "
            "trajectory='even' or 'quadratic', whose levels do not depend on Gamma, and estimate only those with "
            "timesteps='trajectory', num_inference_steps=K."
        )

    def _trajectory_levels(self, num_inference_steps: int | None, num_samples: int, batch_size: int) -> list[int]:
        """The ascending table levels that sampling will visit, for ``estimate_gamma(timesteps='trajectory')``.

        Those of ``num_inference_steps`` levels on the configured trajectory; without it, those of the last
        ``set_timesteps()``. A ``ValueError`` if neither is given, or if the levels are those of the optimal
        trajectory, which Gamma itself chooses.
        """
        planned = None
        if num_inference_steps is None:
            if self._request is None:
                raise ValueError(
                    "timesteps='trajectory' estimates Gamma at the levels you will sample, but no trajectory is "
                    "planned: pass num_inference_steps=K, the number of sampling steps (the pipeline's "
                    "num_inference_steps)."
                )
            num_inference_steps, planned = self._request
        if planned is not None:
            times = self._custom_times(planned)
        elif self.config.trajectory == "optimal":
            raise ValueError(
                "timesteps='trajectory' cannot tell the levels of trajectory='optimal' before Gamma is known: a "
                "dynamic program chooses them from Gamma at every candidate level (Bao et al. 2022, section 4). "
                + self._optimal_remedy(num_samples, batch_size)
            )
        else:
            times = self._spaced_times(num_inference_steps)
        last = self.config.num_train_timesteps - 1
        return sorted(round(t * last) for t in times)

    def estimate_gamma(
        self,
        model: Any,
        data: Any,
        num_samples: int = 1000,
        batch_size: int = 100,
        timesteps: Sequence[int] | str | None = None,
        generator: torch.Generator | None = None,
        column: str | None = None,
        estimator: str = "norm",
        show_progress: bool = True,
        num_inference_steps: int | None = None,
    ) -> torch.Tensor:
        """Estimate ``Gamma_n = E ||eps_theta(x_n, n)||^2 / d`` by Monte Carlo and store it in the config.

        The paper's section 3: ``x_n = sqrt(abar_n) x_0 + sqrt(bbar_n) eps`` for every data sample ``x_0`` and a
        fresh ``eps`` at every level, the model's output converted to ``eps`` for any ``prediction_type``. Costs
        ``num_samples`` model evaluations per level, in ``ceil(num_samples / batch_size)`` model calls: a 10-step
        trajectory's 10 levels with 1000 samples are 10,000 evaluations (100 calls of 100), all 1000 levels
        100 times as many. Values outside ``[0, 1]`` warn and are clipped; data outside
        ``[-clip_sample_range, clip_sample_range]`` (with ``clip_sample``) warn. A trajectory planned by
        ``set_timesteps()`` is planned again with the new values.

        Args:
            model: the noise-prediction network: ``model(x_n, timestep)`` returns a tensor, a tuple or an object
                with ``.sample`` (``UNet2DModel``), of this scheduler's ``prediction_type`` and ``time_input``.
            data: ``x_0`` in the model's range: a tensor ``(n, ...)``, a ``datasets.Dataset`` (tensors in a column,
                e.g. after ``with_format("torch")`` or a transform) or an iterable of batches (tensors, dicts or
                ``(x_0, labels)`` tuples). The first ``num_samples`` samples are used: shuffle beforehand.
            num_samples: the number of data samples ``M``; default 1000.
            batch_size: samples per model call; default 100.
            timesteps: the table levels (integers in ``[0, N - 1]``) to estimate; ``"trajectory"``, the ``K``
                levels that sampling will visit (see ``num_inference_steps``; level 0 included, which the bound's
                decoder uses); default ``None``, all ``N``. Other levels keep their current values. The levels of
                ``trajectory="optimal"`` are chosen from Gamma at every candidate level, so they are unknown until
                it is estimated: ``"trajectory"`` then raises ``ValueError`` (unless the last ``set_timesteps()``
                gave its own ``timesteps``).
            generator: the source of the noise.
            column: for datasets / dict batches with several columns, the one holding ``x_0``; default ``None``.
            estimator: ``norm`` (default), the paper's ``mean ||eps_theta||^2 / d``; or ``error``,
                ``1 - mean ||eps - eps_theta||^2 / d``. Both have the same expectation for the exact noise predictor
                ``E[eps | x_n]`` (it is an orthogonal projection, so ``E ||eps||^2 = E ||eps_theta||^2 +
                E ||eps - eps_theta||^2``), but the variances need ``1 - Gamma``, which ``error`` estimates with a
                relative error of about ``sqrt(2 / (d M))`` at every level, while ``norm``'s grows like
                ``1 / (1 - Gamma)`` at high noise (in low dimension it can exceed 100%, and the optimal trajectory
                then exploits levels clipped to ``Gamma = 1``). For an imperfect model ``error`` gives the
                variance ``lambda^2 + x0_coeff^2 E ||x_0 - x0_theta||^2 / d`` that minimises the step's KL for the
                model's own mean. ``error`` is never above 1.
            show_progress: report progress with :class:`sdekit.progress.Progress` (a bar on a terminal, a line per
                10% elsewhere); default True.
            num_inference_steps: with ``timesteps="trajectory"``, the number of sampling steps ``K``: estimate the
                ``K`` levels of the configured trajectory, then plan it as ``set_timesteps(K)`` does. Default
                ``None``: the trajectory of the last ``set_timesteps()`` (a ``ValueError`` if there was none).

        Returns:
            The (clipped) estimates at ``timesteps``, float64.
        """
        num_levels = self.config.num_train_timesteps
        check_choice("estimator", estimator, GAMMA_ESTIMATORS)
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if isinstance(timesteps, str):
            if timesteps != "trajectory":
                raise ValueError(
                    f"timesteps must be None (all levels), 'trajectory' (the levels sampling visits) or a list of "
                    f"table levels, got {timesteps!r}."
                )
            levels = self._trajectory_levels(num_inference_steps, num_samples, batch_size)
        elif num_inference_steps is not None:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r} only says which trajectory timesteps='trajectory' "
                "estimates; pass timesteps='trajectory' with it, or drop it."
            )
        else:
            levels = list(range(num_levels)) if timesteps is None else sorted({int(n) for n in timesteps})
            if timesteps is not None and (
                not levels or levels[0] < 0 or levels[-1] >= num_levels or any(n != int(n) for n in timesteps)
            ):
                raise ValueError(
                    f"timesteps must be integers in [0, {num_levels - 1}] (table levels), got {timesteps!r}."
                )
        alphas, sigmas = self._log_abar[levels].mul(0.5).exp(), (-torch.expm1(self._log_abar[levels])).sqrt()
        model_times = self._model_timesteps(torch.tensor(levels, dtype=torch.float64) / (num_levels - 1))
        sums: torch.Tensor | None = None
        low = high = None
        count = dim = 0
        total = len(levels) * -(-num_samples // batch_size)
        with Progress(total=total, desc="Gamma", unit="call", disable=not show_progress) as bar:
            for x0 in x0_batches(data, num_samples, batch_size, column):
                device, dtype = model_device_dtype(model, x0)
                work = compute_dtype(dtype)
                x0 = x0.to(device=device, dtype=work)
                low = x0.min() if low is None else torch.minimum(low, x0.min())
                high = x0.max() if high is None else torch.maximum(high, x0.max())
                if sums is None:
                    sums = torch.zeros(len(levels), dtype=torch.float64, device=x0.device)
                for i in range(len(levels)):
                    noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=work)
                    x_n = float(alphas[i]) * x0 + float(sigmas[i]) * noise
                    with torch.no_grad():
                        output = model_prediction(model, x_n.to(dtype), model_times[i])
                    _, eps = split_model_output(
                        output, x_n, float(alphas[i]), float(sigmas[i]), self.config.prediction_type
                    )
                    if estimator == "error":
                        eps = eps - noise
                    sums[i] += eps.to(torch.float64).pow(2).sum()
                    bar.update(1)
                count += x0.shape[0]
                dim = x0[0].numel()
        if sums is None:
            raise ValueError("the data gave no samples; Gamma cannot be estimated.")
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            if float(low) < -limit - 1e-6 or float(high) > limit + 1e-6:
                warnings.warn(
                    f"the data lie in [{float(low):.4g}, {float(high):.4g}], outside the configured data range "
                    f"[-{limit}, {limit}] (clip_sample_range); give x_0 in the model's range (images scaled to "
                    "[-1, 1]), or the estimated Gamma and variances will not match the model's training.",
                    stacklevel=2,
                )
        estimate = (sums / (count * dim)).cpu()
        if estimator == "error":
            estimate = 1 - estimate
        if not bool(torch.isfinite(estimate).all()):
            bad = [level for level, ok in zip(levels, torch.isfinite(estimate).tolist()) if not ok]
            raise ValueError(f"the model returned NaN or Inf at timesteps {format_levels(bad)}; Gamma not stored.")
        gamma = list(self.config.gamma) if self.config.gamma is not None else [None] * num_levels
        for level, value in zip(levels, estimate.tolist()):
            gamma[level] = value
        gamma = check_gamma(gamma, num_levels, stacklevel=3)
        self.register_to_config(gamma=gamma)
        self._optimal_paths = {}
        if num_inference_steps is not None:
            self.set_timesteps(num_inference_steps, device=self.timesteps.device)
        elif self._request is not None:
            steps, planned = self._request
            self.set_timesteps(steps, device=self.timesteps.device, timesteps=planned)
        return torch.tensor([gamma[level] for level in levels], dtype=torch.float64)

    # -- trajectories -------------------------------------------------------------------------------------

    def _trajectory(self, num_steps: int) -> list[int]:
        """The ascending levels of the configured trajectory with ``num_steps`` levels."""
        num_levels = self.config.num_train_timesteps
        name = self.config.trajectory
        if name == "even":
            return even_levels(num_levels, num_steps)
        if name == "quadratic":
            return quadratic_levels(num_levels, num_steps)
        if num_steps not in self._optimal_paths:
            self._optimal_paths.update(self._solve_optimal(num_steps))
        return self._optimal_paths[num_steps]

    def _step_costs(self, levels: Sequence[int]) -> torch.Tensor:
        """The optimal trajectory's step costs over candidate ``levels`` (ascending table levels).

        ``costs[i, j]`` is twice the expected KL per dimension of the step from ``levels[j]`` down to ``levels[i]``
        (:func:`sdekit_analytic_dpm.kernel.step_kl`) with this scheduler's variance and clipping, at eta = 1: the
        paper's ``J(s, t)`` (section 4) for the analytic variance. DDIM's eta = 0 has an infinite bound, so every
        eta uses the eta = 1 costs (and ``step(eta=...)`` may change eta after the trajectory is chosen).

        Args:
            levels: candidate levels; ``Gamma`` must be known at all of them.
        """
        known = self.config.gamma
        missing = [level for level in levels if known is None or known[level] is None]
        if missing:
            raise ValueError(
                "trajectory='optimal' chooses its levels by a dynamic program over Gamma at every candidate level "
                f"(Bao et al. 2022, section 4), and Gamma is missing at timesteps {format_levels(missing)}. "
                + self._optimal_remedy(1000, 100)
            )
        gamma = torch.tensor([known[level] for level in levels], dtype=torch.float64)
        log_abar = self._log_abar[list(levels)]
        pair = level_pairs(log_abar[None, :], log_abar[:, None])
        pixel = self._pixel_bound()
        max_variance = None
        if pixel is not None and levels[0] == 0:  # the pixel rule bounds the steps onto the first level (row 0)
            max_variance = torch.full((len(levels), 1), math.inf, dtype=torch.float64)
            max_variance[0] = pixel
        kernel = step_kernel(pair, gamma[None, :], 1.0, self.config.variance, self._max_covariance(), max_variance)
        return step_kl(kernel)

    def _solve_optimal(self, num_steps: int) -> dict[int, list[int]]:
        gamma = self.config.gamma
        candidates = list(range(self.config.num_train_timesteps))
        if gamma is not None:
            known = [level for level in candidates if gamma[level] is not None]
            if known and known[0] == 0 and known[-1] == candidates[-1]:
                candidates = known
        if num_steps > len(candidates):
            raise ValueError(
                f"the optimal trajectory with num_inference_steps={num_steps} needs as many levels with Gamma "
                f"estimated; only {len(candidates)} have it."
            )
        paths = optimal_levels(self._step_costs(candidates), num_steps)
        return {k: [candidates[i] for i in path] for k, path in paths.items()}

    # -- planning -----------------------------------------------------------------------------------------

    def _max_covariance(self) -> float | None:
        """Theorem 2's bound ``((b - a) / 2)^2`` for data in ``[-clip_sample_range, clip_sample_range]``."""
        return self.config.clip_sample_range**2 if self.config.clip_sample else None

    def _pixel_bound(self) -> float | None:
        """The pixel rule's variance bound ``(clip_pixel (b - a) / 255 sqrt(pi / 2))^2``, or ``None``."""
        if self.config.clip_pixel is None or not self.config.clip_sample:
            return None
        pixel = 2 * self.config.clip_sample_range / 255
        return (self.config.clip_pixel * pixel * math.sqrt(math.pi / 2)) ** 2

    def _check_eta(self, eta: float | None) -> None:
        if eta is not None:
            _check_eta_value(eta)

    def _kernel(self, step: _Step, eta: float, variance: str) -> StepKernel:
        return step_kernel(step.pair, step.gamma, eta, variance, self._max_covariance(), step.max_variance)

    def _custom_times(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """The levels given in model units: at least 2 strictly decreasing table levels in ``[0, N - 1]`` (integers
        for ``ddpm`` model time); they should end at 0."""
        num_levels = self.config.num_train_timesteps
        given = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        exact = from_model_time(self.sde, given, self.time_input) * (num_levels - 1)
        levels = exact.round()
        if (
            given.numel() < 2
            or not bool(torch.all(levels[1:] < levels[:-1]))
            or not bool(torch.all((levels - exact).abs() < 1e-6))
            or levels[0] > num_levels - 1
            or levels[-1] < 0
        ):
            raise ValueError(
                f"timesteps must be at least 2 strictly decreasing table levels in [0, {num_levels - 1}] (model "
                f"units); got {given.tolist()}."
            )
        return [int(n) / (num_levels - 1) for n in levels]

    def _spaced_times(self, num_inference_steps: int) -> list[float]:
        """``K = num_inference_steps`` levels from ``N - 1`` down to 0 following ``trajectory``."""
        num_levels = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}.")
        if not 2 <= num_inference_steps <= num_levels:
            raise ValueError(
                f"num_inference_steps must be between 2 and num_train_timesteps={num_levels}: the trajectory "
                f"runs from level {num_levels - 1} down to level 0 (both included); got {num_inference_steps}."
            )
        return [n / (num_levels - 1) for n in self._trajectory(num_inference_steps)[::-1]]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """As :meth:`sdekit.SDEScheduler.set_timesteps`; a request that succeeds is remembered, so that
        ``estimate_gamma`` plans it again with the new Gamma and ``estimate_gamma(timesteps="trajectory")`` estimates
        its levels. One that fails (e.g. for want of Gamma) forgets the previous one.

        Args:
            num_inference_steps: ``K``, the number of levels and model calls, ``2 <= K <= num_train_timesteps``;
                the levels follow ``trajectory``, from ``N - 1`` down to 0.
            device: where ``timesteps`` live.
            timesteps: the levels instead, in the model's timestep units, strictly decreasing, at least 2.
        """
        self._request = None
        super().set_timesteps(num_inference_steps, device=device, timesteps=timesteps)
        planned = None if timesteps is None else torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()
        self._request = (num_inference_steps, planned)

    def _plan(self, times: list[float]) -> list[float]:
        num_levels = self.config.num_train_timesteps
        descending = [round(t * (num_levels - 1)) for t in times]
        variance = self.config.variance
        gamma: list[float | None] = [None] * len(descending)
        if variance == "analytic":
            gamma[:-1] = self._gamma_at(descending[:-1], "variance='analytic'", descending)
        elif self.config.gamma is not None:
            gamma = [self.config.gamma[level] for level in descending]
        pixel = self._pixel_bound()
        self._steps = []
        for index, level in enumerate(descending):
            log_t = self._log_abar[level]
            alpha, sigma = float(log_t.mul(0.5).exp()), float((-torch.expm1(log_t)).sqrt())
            if index == len(descending) - 1:
                self._steps.append(_Step(level, None, alpha, sigma, None, gamma[index], None, 1.0, 0.0, 0.0))
                continue
            target = descending[index + 1]
            tensors = level_pairs(log_t, self._log_abar[target])
            pair = LevelPair(**{f.name: float(getattr(tensors, f.name)) for f in dataclasses.fields(LevelPair)})
            max_variance = pixel if index == len(descending) - 2 else None
            step = _Step(level, target, alpha, sigma, pair, gamma[index], max_variance, 0.0, 0.0, 0.0)
            kernel = self._kernel(step, self.config.eta, variance)
            std = math.sqrt(kernel.variance)
            self._steps.append(
                dataclasses.replace(step, x0_coeff=kernel.x0_coeff, sample_coeff=kernel.sample_coeff, std=std)
            )
        return list(times)

    # -- the update ---------------------------------------------------------------------------------------

    def _step(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._steps[index]
        # The mean is the posterior form x0_coeff x0_hat + sample_coeff x_t, i.e. DDIM's eq. 12 with the noise
        # re-derived from the clipped x0_hat: use_clipped_model_output is always in effect.
        x0, _ = self._x0_eps(model_output, sample, step.alpha, step.sigma, False)
        if step.target is None:
            return x0, x0  # the last step: x0_hat, no noise
        x0_coeff, sample_coeff, std = step.x0_coeff, step.sample_coeff, step.std
        if eta is not None and eta != self.config.eta:
            kernel = self._kernel(step, eta, self.config.variance)
            x0_coeff, sample_coeff, std = kernel.x0_coeff, kernel.sample_coeff, math.sqrt(kernel.variance)
        prev_sample = torch.add(x0_coeff * x0, sample.to(x0.dtype), alpha=sample_coeff)
        if std > 0:
            prev_sample.add_(self._noise(sample, generator), alpha=std)
        return prev_sample, x0

    # -- the variational bound ----------------------------------------------------------------------------

    def gaussian_steps(self, variance: str | None = None, eta: float | None = None) -> list[GaussianStep]:
        """The reverse kernels of the trajectory of the last ``set_timesteps()``, for :func:`sdekit.nll_bound`.

        One :class:`sdekit.likelihood.GaussianStep` per model call, the decoder (from the first level onto the
        data) last. The decoder's variance: ``analytic``, Theorem 1 for that step (``lambda = 0``), i.e.
        ``Cov_{tau_1}`` clipped by Theorem 2; ``beta``, ``bbar_{tau_1}`` (DDPM's ``sigma_1^2 = beta_1``);
        ``beta_tilde``, the full chain's ``beta_tilde`` of the step from level ``tau_1 + 1`` to ``tau_1`` (DDPM's
        posterior variance at its first level is 0; Nichol & Dhariwal 2021 and the paper's code use this one).

        Args:
            variance: ``analytic``, ``beta_tilde`` or ``beta``; default ``None``, the config's.
            eta: DDIM's noise scale in ``[0, 1]``; default ``None``, the config's.
        """
        if not self._steps:
            raise ValueError("call set_timesteps() first: the steps belong to a trajectory.")
        variance = self.config.variance if variance is None else check_choice("variance", variance, VARIANCES)
        eta = self.config.eta if eta is None else _check_eta_value(eta)
        if variance == "analytic":
            levels = [step.level for step in self._steps]
            gamma = self._gamma_at(levels, "variance='analytic'", levels)
        steps: list[GaussianStep] = []
        for index, (step, timestep) in enumerate(zip(self._steps, self.timesteps.tolist())):
            if step.target is not None:
                if variance == "analytic":
                    step = dataclasses.replace(step, gamma=gamma[index])
                kernel = self._kernel(step, eta, variance)
                prev = self._steps[index + 1]
                steps.append(
                    GaussianStep(
                        timestep,
                        step.alpha,
                        step.sigma,
                        prev.alpha,
                        prev.sigma,
                        kernel.x0_coeff,
                        kernel.sample_coeff,
                        kernel.variance,
                        kernel.posterior_variance,
                    )
                )
                continue
            log_abar = self._log_abar
            if variance == "analytic":
                covariance = step.sigma**2 / step.alpha**2 * (1 - gamma[index])
                limit = self._max_covariance()
                decoder = min(covariance, limit) if limit is not None else covariance
            elif variance == "beta":
                decoder = step.sigma**2
            else:
                above = level_pairs(log_abar[step.level + 1], log_abar[step.level])
                decoder = float(above.bbar_s / above.bbar_t * above.beta_ts)
            steps.append(GaussianStep(timestep, step.alpha, step.sigma, 1.0, 0.0, 1.0, 0.0, decoder, 0.0))
        return steps
