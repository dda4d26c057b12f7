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
onto ``tau_1``, by the paper's pixel rule. The last step, from ``tau_1``, returns ``x0_hat`` without noise.

The scheduler samples and delegates: the formulas, the planned steps and their export for the bound are in
:mod:`sdekit_analytic_dpm.kernel`, the Monte Carlo estimate of ``Gamma`` (section 3) in
:mod:`sdekit_analytic_dpm.gamma`, the trajectories and the optimal one's dynamic program (section 4) in
:mod:`sdekit_analytic_dpm.trajectory`; see also ``docs/samplers/analytic-dpm.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config

from sdekit.bound import GaussianStep
from sdekit.parametrization import check_choice, from_model_time, level_to_time, time_to_level
from sdekit.scheduler import SDEScheduler
from sdekit.sde import VPTypeSDE

from .gamma import (
    GAMMA_ESTIMATORS,
    check_estimation,
    check_gamma,
    estimate_gamma_levels,
    missing_gamma_message,
    missing_levels,
    optimal_remedy,
    table_levels,
)
from .kernel import VARIANCES, PlannedStep, check_eta, plan_steps, to_gaussian_steps
from .trajectory import (
    TRAJECTORIES,
    check_num_steps,
    custom_levels,
    optimal_candidates,
    optimal_levels,
    spaced_levels,
    step_costs,
)

__all__ = ["GAMMA_ESTIMATORS", "AnalyticDPMScheduler"]


class AnalyticDPMScheduler(SDEScheduler):
    """Analytic-DPM (Bao et al., ICLR 2022): DDIM-family steps with the analytic estimate of the optimal variance.

    Runs in the unmodified diffusers pipelines like the other sdekit samplers; ``len(timesteps)`` equals
    ``num_inference_steps`` = ``K`` model calls. The analytic variance needs ``Gamma`` (``E||eps_theta(x_n, n)||^2
    / d`` at the table's levels), estimated once per model with :meth:`estimate_gamma` and stored in the config,
    so ``save_pretrained`` / ``from_pretrained`` keep it. Sampling needs it only at the trajectory's levels:
    ``estimate_gamma(model, data, timesteps="trajectory", num_inference_steps=K)`` estimates just those.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`, except that ``clip_sample`` defaults to True
            here (below). The SDE
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

    shared_default_overrides = {"clip_sample": True}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
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
        check_eta(eta)
        check_choice("variance", variance, VARIANCES)
        check_choice("trajectory", trajectory, TRAJECTORIES)
        if clip_pixel is not None and (
            isinstance(clip_pixel, bool) or not isinstance(clip_pixel, numbers.Real) or not 0 < clip_pixel < math.inf
        ):
            raise ValueError(f"clip_pixel must be a number > 0 (pixel widths) or None, got {clip_pixel!r}.")
        self.setup()
        self._check_discrete_vp()
        levels = level_to_time(torch.arange(num_train_timesteps), num_train_timesteps)
        self._log_abar = self.sde.log_alpha_bar(levels)
        if gamma is not None:
            self.register_to_config(gamma=check_gamma(gamma, num_train_timesteps, stacklevel=4))
        self._optimal_paths: dict[int, list[int]] = {}
        self._request: tuple[int | None, list[float] | None] | None = None
        self._steps: list[PlannedStep] = []

    def _check_discrete_vp(self) -> None:
        if not (isinstance(self.sde, VPTypeSDE) and self.sde.is_variance_preserving() and self.sde.is_discrete):
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

    def _gamma_at(self, levels: Sequence[int], trajectory: Sequence[int]) -> list[float]:
        """``Gamma`` at ``levels``, which belong to the sampling ``trajectory`` (its table levels); where it is
        missing, a ``ValueError`` that says how to estimate it at the trajectory's levels alone and what it costs."""
        gamma = self.config.gamma
        missing = missing_levels(gamma, levels)
        if missing:
            visited = sorted(set(trajectory))
            spaced = self.config.trajectory != "optimal" and visited == self._trajectory(len(visited))
            num_levels = self.config.num_train_timesteps
            raise ValueError(missing_gamma_message(gamma, missing, visited, num_levels, spaced))
        return [gamma[level] for level in levels]

    def _estimation_levels(
        self, timesteps: Sequence[int] | str | None, num_inference_steps: int | None, num_samples: int, batch_size: int
    ) -> list[int]:
        """The ascending table levels that ``estimate_gamma`` estimates; for ``timesteps='trajectory'``, those that
        sampling will visit: ``num_inference_steps`` levels of the configured trajectory or, without it, those of
        the last ``set_timesteps()``. A ``ValueError`` if neither is given, or if the levels are those of the
        optimal trajectory, which Gamma itself chooses."""
        num_levels = self.config.num_train_timesteps
        if not isinstance(timesteps, str):
            if num_inference_steps is not None:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps!r} only says which trajectory timesteps='trajectory' "
                    "estimates; pass timesteps='trajectory' with it, or drop it."
                )
            return table_levels(timesteps, num_levels)
        if timesteps != "trajectory":
            raise ValueError(
                f"timesteps must be None (all levels), 'trajectory' (the levels sampling visits) or a list of "
                f"table levels, got {timesteps!r}."
            )
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
            times = self.custom_times(planned)
        elif self.config.trajectory == "optimal":
            raise ValueError(
                "timesteps='trajectory' cannot tell the levels of trajectory='optimal' before Gamma is known: a "
                "dynamic program chooses them from Gamma at every candidate level (Bao et al. 2022, section 4). "
                + optimal_remedy(num_levels, num_samples, batch_size)
            )
        else:
            times = self.spaced_times(num_inference_steps)
        return sorted(time_to_level(t, num_levels) for t in times)

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

        The estimate, the paper's section 3, is :func:`sdekit_analytic_dpm.gamma.estimate_gamma_levels`; this method
        chooses its levels, stores the values and plans a trajectory set by ``set_timesteps()`` again with them.
        Costs ``num_samples`` model evaluations per level, in ``ceil(num_samples / batch_size)`` model calls: a
        10-step trajectory's 10 levels with 1000 samples are 10,000 evaluations (100 calls of 100), all 1000 levels
        100 times as many. Values outside ``[0, 1]`` warn and are clipped; data outside
        ``[-clip_sample_range, clip_sample_range]`` (with ``clip_sample``) warn.

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
                ``1 - mean ||eps - eps_theta||^2 / d``, with the same expectation for the exact noise predictor but
                a far smaller error where ``Gamma`` is near 1 (see :func:`~sdekit_analytic_dpm.gamma.
                estimate_gamma_levels`); ``error`` is never above 1.
            show_progress: report progress with :class:`sdekit.progress.Progress` (a bar on a terminal, a line per
                10% elsewhere); default True.
            num_inference_steps: with ``timesteps="trajectory"``, the number of sampling steps ``K``: estimate the
                ``K`` levels of the configured trajectory, then plan it as ``set_timesteps(K)`` does. Default
                ``None``: the trajectory of the last ``set_timesteps()`` (a ``ValueError`` if there was none).

        Returns:
            The (clipped) estimates at ``timesteps``, float64.
        """
        num_levels = self.config.num_train_timesteps
        check_estimation(num_samples, batch_size, estimator)
        levels = self._estimation_levels(timesteps, num_inference_steps, num_samples, batch_size)
        estimate = estimate_gamma_levels(
            model,
            data,
            self._log_abar,
            levels,
            self.model_timesteps(level_to_time(torch.tensor(levels), num_levels)),
            self.config.prediction_type,
            num_samples,
            batch_size,
            generator=generator,
            column=column,
            estimator=estimator,
            show_progress=show_progress,
            data_range=self.config.clip_sample_range if self.config.clip_sample else None,
            stacklevel=3,
        )
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

    # -- planning -----------------------------------------------------------------------------------------

    def _trajectory(self, num_steps: int) -> list[int]:
        """The ascending levels of the configured trajectory with ``num_steps`` levels; the optimal ones are cached
        per ``K`` (one dynamic program gives every ``K`` up to its own)."""
        num_levels, gamma = self.config.num_train_timesteps, self.config.gamma
        if self.config.trajectory != "optimal":
            return spaced_levels(self.config.trajectory, num_levels, num_steps)
        if num_steps not in self._optimal_paths:
            candidates = optimal_candidates(gamma, num_levels, num_steps)
            bounds = self._max_covariance(), self._pixel_bound()
            costs = step_costs(self._log_abar, gamma, candidates, self.config.variance, *bounds)
            paths = optimal_levels(costs, num_steps)
            self._optimal_paths.update({k: [candidates[i] for i in path] for k, path in paths.items()})
        return self._optimal_paths[num_steps]

    def _max_covariance(self) -> float | None:
        """Theorem 2's bound ``((b - a) / 2)^2`` for data in ``[-clip_sample_range, clip_sample_range]``."""
        return self.config.clip_sample_range**2 if self.config.clip_sample else None

    def _pixel_bound(self) -> float | None:
        """The pixel rule's variance bound ``(clip_pixel (b - a) / 255 sqrt(pi / 2))^2``, or ``None``."""
        if self.config.clip_pixel is None or not self.config.clip_sample:
            return None
        pixel = 2 * self.config.clip_sample_range / 255
        return (self.config.clip_pixel * pixel * math.sqrt(math.pi / 2)) ** 2

    def check_eta(self, eta: float | None) -> None:
        if eta is not None:
            check_eta(eta)

    def custom_times(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """The levels given in model units: at least 2 strictly decreasing table levels in ``[0, N - 1]`` (integers
        for ``ddpm`` model time); they should end at 0."""
        num_levels = self.config.num_train_timesteps
        given = torch.as_tensor(timesteps, dtype=torch.float64).flatten().cpu()
        exact = from_model_time(self.sde, given, self.time_input) * (num_levels - 1)
        return [level_to_time(n, num_levels) for n in custom_levels(given, exact, num_levels)]

    def spaced_times(self, num_inference_steps: int) -> list[float]:
        """``K = num_inference_steps`` levels from ``N - 1`` down to 0 following ``trajectory``."""
        num_levels = self.config.num_train_timesteps
        check_num_steps(num_inference_steps, num_levels)
        return [level_to_time(n, num_levels) for n in self._trajectory(num_inference_steps)[::-1]]

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

    def plan_evaluations(self, times: list[float]) -> list[float]:
        num_levels = self.config.num_train_timesteps
        descending = [time_to_level(t, num_levels) for t in times]
        variance = self.config.variance
        gamma: list[float | None] = [None] * len(descending)
        if variance == "analytic":
            gamma[:-1] = self._gamma_at(descending[:-1], descending)
        elif self.config.gamma is not None:
            gamma = [self.config.gamma[level] for level in descending]
        bounds = self._max_covariance(), self._pixel_bound()
        self._steps = plan_steps(descending, self._log_abar, gamma, self.config.eta, variance, *bounds)
        return list(times)

    # -- the update ---------------------------------------------------------------------------------------

    def update(
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
        x0, _ = self.x0_and_eps(model_output, sample, step.alpha, step.sigma, False)
        if step.target is None:
            return x0, x0  # the last step: x0_hat, no noise
        if eta is not None and eta != self.config.eta:
            step = step.at(eta, self.config.variance, self._max_covariance())
        prev_sample = torch.add(step.x0_coeff * x0, sample.to(x0.dtype), alpha=step.sample_coeff)
        if step.std > 0:
            prev_sample.add_(self.noise_like(sample, generator), alpha=step.std)
        return prev_sample, x0

    # -- the variational bound ----------------------------------------------------------------------------

    def gaussian_steps(self, variance: str | None = None, eta: float | None = None) -> list[GaussianStep]:
        """The reverse kernels of the trajectory of the last ``set_timesteps()``, for :func:`sdekit.nll_bound`.

        One :class:`sdekit.bound.GaussianStep` per model call, the decoder (from the first level onto the
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
        eta = self.config.eta if eta is None else check_eta(eta)
        gamma = None
        if variance == "analytic":
            levels = [step.level for step in self._steps]
            gamma = self._gamma_at(levels, levels)
        timesteps = self.timesteps.tolist()
        return to_gaussian_steps(self._steps, timesteps, self._log_abar, eta, variance, self._max_covariance(), gamma)
