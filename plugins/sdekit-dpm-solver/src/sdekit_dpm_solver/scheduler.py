"""DPM-Solver and DPM-Solver++ as an sdekit scheduler, for every SDE whose kernel gives a log-SNR.

Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around
10 Steps", NeurIPS 2022 (below: 2022a), and "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models", 2022 (2022b). The probability-flow ODE of an SDE with the kernel ``x_t = alpha_t x_0 +
sigma_t eps`` is semi-linear; in ``lambda_t = log(alpha_t / sigma_t)`` its linear part integrates exactly, and the
solvers integrate the model's prediction (noise, or data for "++") as a polynomial through its values
(:mod:`sdekit_dpm_solver.coefficients`). Nothing here depends on which SDE it is: ``alpha`` and ``sigma`` come from
the SDE's kernel (``SDEScheduler.kernel_coeffs``), and intermediate levels back to time through the platform's
:func:`sdekit.grids.time_of_noise_to_signal`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from sdekit.grids import time_of_noise_to_signal
from sdekit.parametrization import check_choice
from sdekit.scheduler import SDEScheduler

from .coefficients import (
    MAX_ORDER,
    SINGLESTEP_NODES,
    exponential_weights,
    first_order_coefficients,
    midpoint_weights,
    multistep_orders,
    singlestep_orders,
)

__all__ = ["ALGORITHM_TYPES", "METHODS", "SOLVER_TYPES", "DPMSolverScheduler"]

ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")
"""``dpmsolver++``: the data-prediction form (Lu et al. 2022b); ``dpmsolver``: the noise-prediction form (2022a)."""

METHODS = ("multistep", "singlestep")
"""``multistep``: one evaluation per level, the earlier levels' predictions reused (2022b, section 4.2);
``singlestep``: each step of order ``k`` evaluates at ``k`` points within it (2022a, section 3.3)."""

SOLVER_TYPES = ("midpoint", "taylor")
"""How a second-order step uses its two predictions: ``midpoint``, the papers' form (the first-order weight on the
prediction interpolated at the step's midpoint in ``lambda``: DPM-Solver-2, DPM-Solver++(2S) and (2M)), or
``taylor``, the exact integral of the linear interpolant (the Taylor expansion to the first derivative). Third-order
steps always take the Taylor form: the multistep ones integrate the quadratic through three levels exactly, the
singlestep ones are DPM-Solver-3 (2022a)."""

_CLEAN = (1.0, 0.0)  # (alpha, sigma) of the clean data, where a denoise_final step lands


@dataclass(frozen=True)
class _Evaluation:
    """What ``update`` does with one model evaluation.

    ``x_next = base * x_start + sum_j weights[j] * history[j]``, where ``x_start`` is the sample at the start of
    the current step and ``history`` the predictions, newest first. ``choices`` holds the weights for each number
    of predictions the step may use (multistep: fewer when a run starts part-way, ``set_begin_index``).
    """

    alpha: float
    sigma: float
    starts_step: bool
    step_start: int
    base: float
    choices: tuple[tuple[float, ...], ...]


def _lam(alpha: float, sigma: float) -> float:
    return math.log(alpha) - math.log(sigma)


class DPMSolverScheduler(SDEScheduler):
    """DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b) of orders 1 to 3 on any sdekit SDE.

    A solver of the probability-flow ODE that integrates its linear part exactly in ``lambda = log(alpha / sigma)``
    and the model's prediction as a polynomial through ``solver_order`` of its values: the noise prediction
    (``algorithm_type="dpmsolver"``) or the data prediction (``"dpmsolver++"``, the better one for guided
    sampling). Order 1 is DDIM with ``eta = 0`` in both forms. Works on VP, sub-VP, VE and any registered SDE
    whose kernel has ``alpha > 0`` and ``sigma > 0`` at the levels visited, with ``lambda`` rising towards the data.

    ``set_timesteps(n)`` spends ``n`` model calls (``len(timesteps) == n``):

    * ``multistep``: ``n`` levels, the first ``n`` of ``n + 1`` points on ``time_grid`` from ``T`` to
      ``sampling_eps``, one evaluation each. A step of order ``k`` reuses the predictions of the ``k - 1`` levels
      before it, so the first steps are of order 1, then 2, then 3 (there is no history yet). With
      ``lower_order_final`` a run of fewer than 15 steps also lowers the order of its last steps (the last one
      order 1), as the reference implementation and diffusers do: it steadies the few-step runs.
    * ``singlestep``: steps of order ``solver_order`` whose ``k - 1`` intermediate evaluations lie at fractions of
      the step in ``lambda`` (1/2; 1/3 and 2/3) and are listed in ``timesteps``; the calls left over when ``n`` is not
      a multiple of the order go to lower-order steps at the end (DPM-Solver-fast, 2022a, section 3.4, whose last
      step is first order; with ``denoise_final`` the step to the clean data is that one), so fewer calls than the
      order give lower-order steps only. Only a step's first evaluation is on the grid, one point per step.

    With ``denoise_final`` (default) the last step goes from the last level to the clean data as the model's
    ``x_0`` estimate there (a first-order step to ``sigma = 0``, as diffusers' DPM-Solver schedulers end), and the
    other steps run between the levels. Without it, the steps run to the grid's last point, ``sampling_eps``, and
    the sample there is returned (the papers' set-up). Levels given as ``timesteps=`` are each a step's start (with
    ``denoise_final``, the last is denoised; without it, it is where the ODE stops and is not evaluated).

    Sampling is deterministic: ``step()`` accepts ``generator`` and ignores it.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`. With ``clip_sample`` the solver follows the
            clipped ``x_0`` in both forms (the noise form re-derives ``eps`` from it, as diffusers' DPM-Solver
            schedulers do with thresholding); ``use_clipped_model_output`` changes nothing further.
        solver_order: 1, 2 (default) or 3.
        algorithm_type: ``dpmsolver++`` (default: data prediction, Lu et al. 2022b) or ``dpmsolver`` (noise
            prediction, 2022a).
        method: ``multistep`` (default) or ``singlestep``.
        solver_type: the form of the second-order steps, ``midpoint`` (default: the papers' DPM-Solver-2,
            DPM-Solver++(2S) and (2M)) or ``taylor`` (the exact integral of the linear interpolant; better for
            ``singlestep`` on the oracle benchmark).
        lower_order_final: lower the order of the last steps of a multistep run of fewer than 15 steps; default True.
        denoise_final: end with the ``x_0`` estimate at the last level; default True. False integrates to
            ``sampling_eps`` and returns the sample there.
        time_grid: where ``set_timesteps(n)`` puts the levels: ``logsnr`` (evenly spaced in log-SNR, the papers'
            choice and the default for ``None``), ``uniform`` in ``t`` or ``karras`` (:mod:`sdekit.grids`).
        rho: the ``karras`` grid's exponent, > 0; default 7.
    """

    sdekit_api_version = 2

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
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        check_finite: bool = False,
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        method: str = "multistep",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        denoise_final: bool = True,
        time_grid: str | None = None,
        rho: float = 7.0,
    ) -> None:
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or not 1 <= solver_order <= MAX_ORDER:
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}.")
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("method", method, METHODS)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        for name, value in (("lower_order_final", lower_order_final), ("denoise_final", denoise_final)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        self.setup()
        self._plan: list[_Evaluation] = []
        self._end_time: float | None = None
        self._step_orders: list[int] | None = None
        self._history: list[torch.Tensor] = []
        self._start: torch.Tensor | None = None
        self._start_index: int | None = None

    @property
    def data_prediction(self) -> bool:
        """Whether the solver integrates the data prediction (``dpmsolver++``) rather than the noise prediction."""
        return self.config.algorithm_type == "dpmsolver++"

    # -- levels ---------------------------------------------------------------------------------------------

    def default_time_grid(self) -> str:
        """``logsnr``: the papers' grid, evenly spaced in ``lambda`` (Lu et al. 2022a, section 3.3)."""
        return "logsnr"

    def spaced_times(self, num_inference_steps: int) -> list[float]:
        """The step starts for ``num_inference_steps`` model calls on ``time_grid`` (see the class docstring)."""
        self.check_num_inference_steps(num_inference_steps)
        denoise = self.config.denoise_final
        if self.config.method == "multistep":
            self._step_orders = None
            levels = num_inference_steps
        else:
            self._step_orders = singlestep_orders(num_inference_steps, self.config.solver_order, denoise)
            levels = len(self._step_orders)
        times, end = self.grid_levels_and_end(levels)
        self._end_time = None if denoise else end
        return times

    def custom_times(self, timesteps: Sequence[float] | torch.Tensor) -> list[float]:
        """The levels given, each a step's start; without ``denoise_final`` the last one is where the ODE stops."""
        times = super().custom_times(timesteps)
        self._step_orders = None
        self._end_time = None
        if not self.config.denoise_final:
            if len(times) < 2:
                raise ValueError(
                    f"timesteps of {len(times)} level leave no step to take with denoise_final=False; give at least 2 "
                    "levels, or use denoise_final=True."
                )
            self._end_time = times.pop()
        return times

    # -- the plan -------------------------------------------------------------------------------------------

    def _coeffs(self, t: float) -> tuple[float, float]:
        """``(alpha, sigma)`` at ``t``, which must both be > 0 for a level the solver evaluates at."""
        alpha, sigma = self.kernel_coeffs(t)
        if not (alpha > 0 and sigma > 0 and math.isfinite(alpha) and math.isfinite(sigma)):
            raise ValueError(
                f"the SDE's kernel has alpha={alpha}, sigma={sigma} at t={t}; DPM-Solver needs alpha > 0 and sigma > 0 "
                "(a finite log-SNR) at every level it evaluates. Raise sampling_eps, or pass timesteps above it."
            )
        return alpha, sigma

    def plan_evaluations(self, times: list[float]) -> list[float]:
        """Lay out the evaluations for the step starts ``times`` and precompute every step's weights."""
        coeffs = [self._coeffs(t) for t in times]
        # The end is not evaluated at: it may be the clean data itself (sigma = 0, lambda = inf).
        end = _CLEAN if self._end_time is None else self.kernel_coeffs(self._end_time)
        if not (end[1] == 0.0 and end[0] > 0):
            end = self._coeffs(self._end_time)  # a noisy end needs a finite log-SNR like any level
        lams = [_lam(*c) for c in coeffs]
        end_lam = math.inf if end[1] == 0 else _lam(*end)
        path = [*lams, end_lam]
        for k, (now, later) in enumerate(zip(path, path[1:])):
            if not later > now:
                raise ValueError(
                    f"the log-SNR must rise from each level to the next, but it goes from {now:.6g} to {later:.6g} at "
                    f"level {k} (t={times[k]}); the levels must run from noise towards data, and the SDE's "
                    "sigma/alpha must fall along them."
                )
        if self.config.method == "multistep":
            self._plan = self._plan_multistep(coeffs, lams, end)
            eval_times = list(times)
        else:
            self._plan, eval_times = self._plan_singlestep(times, coeffs, lams, end)
        self._history, self._start, self._start_index = [], None, None
        return eval_times

    def _step_weights(
        self,
        lam_s: float,
        start: tuple[float, float],
        target: tuple[float, float],
        nodes: Sequence[float],
        order: int,
    ) -> tuple[float, tuple[float, ...]]:
        """``(base, weights)`` of a step of ``order`` from ``start`` to ``target`` (``(alpha, sigma)`` pairs) with
        predictions at ``lambda`` values ``nodes`` (the first at ``lam_s``); first order in closed form (also onto
        the clean data); ``solver_type`` chooses the form of second-order steps only."""
        data = self.data_prediction
        base, weight = first_order_coefficients(*start, *target, data)
        if len(nodes) == 1:
            return base, (weight,)
        h = _lam(*target) - lam_s
        scaled = [(n - lam_s) / h for n in nodes]
        if order == 2 and self.config.solver_type == "midpoint":
            return base, tuple(midpoint_weights(scaled, weight))
        return base, tuple(exponential_weights(h, scaled, *target, data))

    def _plan_multistep(
        self, coeffs: list[tuple[float, float]], lams: list[float], end: tuple[float, float]
    ) -> list[_Evaluation]:
        """One evaluation per level; step ``i`` goes to level ``i + 1`` (or the end) using up to ``k_i`` levels back."""
        targets = [*coeffs[1:], end]
        orders = multistep_orders(len(coeffs), self.config.solver_order, self.config.lower_order_final)
        plan = []
        for i, (start, target) in enumerate(zip(coeffs, targets)):
            order = 1 if target[1] == 0 else orders[i]  # onto the clean data (lambda = inf) only order 1 is defined
            choices = []
            for k in range(1, order + 1):
                base, weights = self._step_weights(lams[i], start, target, [lams[i - j] for j in range(k)], k)
                choices.append(weights)
            plan.append(_Evaluation(*start, True, i, base, tuple(choices)))
        return plan

    def _plan_singlestep(
        self, times: list[float], coeffs: list[tuple[float, float]], lams: list[float], end: tuple[float, float]
    ) -> tuple[list[_Evaluation], list[float]]:
        """Each step's evaluations at its start and intermediate ``lambda`` fractions (:data:`SINGLESTEP_NODES`)."""
        targets = [*coeffs[1:], end]
        # From spaced_times for the number of calls asked for; for levels given as timesteps, the solver's order.
        orders = self._step_orders or [self.config.solver_order] * len(times)
        plan: list[_Evaluation] = []
        eval_times: list[float] = []
        for i, (start, target) in enumerate(zip(coeffs, targets)):
            order = 1 if target[1] == 0 else orders[i]
            h = _lam(*target) - lams[i] if order > 1 else 0.0  # (order 1 needs no intermediate levels)
            stage_times = [times[i], *self._times_of([lams[i] + f * h for f in SINGLESTEP_NODES[order][1:]])]
            # The stages' own kernel coefficients (their times come back from lambda by bisection, to ~1e-12).
            stage_coeffs = [start, *(self._coeffs(t) for t in stage_times[1:])]
            stage_lams = [_lam(*c) for c in stage_coeffs]
            first = len(plan)
            for stage, t in enumerate(stage_times):
                last = stage == order - 1
                stage_target = target if last else stage_coeffs[stage + 1]
                # The nodes each stage interpolates: all so far for the intermediate stages; for the last stage of
                # order 3 only the start and 2/3 (DPM-Solver-3, 2022a: the 1/3 stage is first-order accurate, and
                # the node at 2/3 cancels the leading error term of the first-derivative estimate).
                used = [0, 2] if last and order == 3 else list(range(stage + 1))
                # solver_type shapes second-order steps only: the stages of DPM-Solver-3 keep the Taylor form that its
                # third order needs (2022a, section 3.3).
                nodes = [stage_lams[j] for j in used]
                base, weights = self._step_weights(lams[i], start, stage_target, nodes, order)
                # Weights over the history, newest first: the predictions of stages stage, stage - 1, ..., 0.
                full = [0.0] * (stage + 1)
                for j, w in zip(used, weights):
                    full[stage - j] = w
                plan.append(_Evaluation(*stage_coeffs[stage], stage == 0, first, base, (tuple(full),)))
                eval_times.append(t)
        return plan, eval_times

    def _times_of(self, lams: list[float]) -> list[float]:
        """The times at log-SNR values ``lams`` (``sigma / alpha = exp(-lambda)``), through the platform's inverse."""
        if not lams:
            return []
        ratios = torch.exp(-torch.tensor(lams, dtype=torch.float64))
        return time_of_noise_to_signal(self.sde, ratios).tolist()

    # -- the update -----------------------------------------------------------------------------------------

    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._plan[index]
        x0, eps = self.x0_and_eps(model_output, sample, e.alpha, e.sigma, True)
        if e.starts_step:
            if self.config.method == "singlestep":
                self._history = []
            self._start, self._start_index = sample.to(x0.dtype), index
        elif self._start_index != e.step_start:
            raise ValueError(
                f"evaluation {index} is an intermediate stage of the singlestep step that starts at evaluation "
                f"{e.step_start}, which did not run; start at a step's first evaluation (set_begin_index)."
            )
        self._history.insert(0, x0 if self.data_prediction else eps)
        del self._history[MAX_ORDER:]
        weights = e.choices[min(len(e.choices), len(self._history)) - 1]
        prev_sample = e.base * self._start
        for weight, prediction in zip(weights, self._history):
            if weight != 0.0:
                prev_sample = torch.add(prev_sample, prediction, alpha=weight)
        return prev_sample, x0
