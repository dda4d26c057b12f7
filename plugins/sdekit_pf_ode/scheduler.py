"""The probability-flow ODE sampler (score-SDE eq. 13) with fixed-step Euler and Heun solvers.

Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic
Differential Equations", ICLR 2021 (below: "score-SDE"). Every SDE here has a linear drift ``f(t) x`` and the
transition kernel ``x_t = alpha(t) x_0 + sigma(t) z``, so ``f = d log(alpha) / dt`` and
``g^2 = d sigma^2 / dt - 2 f sigma^2`` (the kernel's mean and variance ODEs, Sarkka & Solin 2019 eqs. 5.50-5.51,
as in score-SDE appendix B). With ``score = -eps / sigma``, the probability-flow ODE
``dx/dt = f x - g^2 score / 2`` (score-SDE eq. 13) becomes, in ``y = x / alpha`` and ``s = sigma / alpha``,

    dy / ds = eps(x, t)

(Song, Meng & Ermon 2021, DDIM eq. 14; Karras, Aittala, Aila & Laine 2022, eq. 4 with their ``s(t) = alpha``).
The solvers step this form on the noise levels the base class gives: the same trajectories as eq. 13 in ``t``,
with a discretization error that vanishes for data concentrated at a point. Euler in this form is DDIM with
``eta = 0``; Heun is Karras et al.'s Algorithm 1.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config

from sdekit.parametrization import check_choice
from sdekit.scheduler import SDEScheduler
from sdekit.sde import SDE, linear_coefficients

__all__ = ["SOLVERS", "ProbabilityFlowScheduler"]

SOLVERS = ("euler", "heun")

# What each evaluation does (see ProbabilityFlowScheduler.plan_evaluations).
_EULER, _PREDICT, _CORRECT, _DENOISE = "euler", "predict", "correct", "denoise"


def _check_linear_drift(sde: SDE, name: str) -> None:
    """Raise ``ValueError`` unless the drift of ``sde`` is ``f(t) x`` with a scalar ``f(t)``, at a few times."""
    try:
        linear_coefficients(sde.sde, torch.linspace(sde.sampling_eps, sde.T, 5, dtype=torch.float64).tolist())
    except ValueError as err:
        raise ValueError(
            f"sde={name!r}: the probability-flow sampler needs a linear drift f(t) x with a scalar f(t), but "
            f"{type(sde).__name__}.sde() is {err}. Use sdekit.sample_ode, which integrates score-SDE eq. 13 for any "
            "drift."
        ) from None


class ProbabilityFlowScheduler(SDEScheduler):
    """Deterministic sampling by integrating the probability-flow ODE of any registered SDE.

    Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations" (ICLR 2021),
    eq. 13: ``dx = [f(x, t) - g(t)^2 score(x, t) / 2] dt`` carries the prior at ``t = T`` to the data, with no
    noise. The ODE is stepped in the scaled variables ``y = x / alpha(t)``, ``s = sigma(t) / alpha(t)``, where it
    reads ``dy/ds = eps`` (DDIM, Song, Meng & Ermon 2021, eq. 14; Karras et al. 2022, eq. 4); Euler on this form
    is DDIM with ``eta = 0``, Heun is Karras et al.'s Algorithm 1. Both converge to the exact ODE solution, with
    order 1 and 2 respectively.

    ``set_timesteps(n)`` takes the ``n`` noise levels from ``T`` down to ``sampling_eps``; the solver integrates
    the ODE across their ``n - 1`` intervals and, with ``denoise_final``, takes one more evaluation at
    ``sampling_eps`` and returns its ``x_0`` estimate (Tweedie's formula; the score-SDE reference code's
    ``denoise`` option, and the Euler step to ``s = 0``). Model evaluations (``len(timesteps)``):

    ============  ==================  ===================
    solver        denoise_final=True  denoise_final=False
    ============  ==================  ===================
    ``euler``     ``n``               ``n - 1``
    ``heun``      ``2 n - 1``         ``2 n - 2``
    ============  ==================  ===================

    Heun evaluates twice per interval: at the interval's start (Euler predictor) and at its end (trapezoidal
    corrector), so ``timesteps`` lists the inner levels twice and ``order = 2``, as diffusers'
    ``HeunDiscreteScheduler``: evaluation ``2 k`` starts interval ``k``, which keeps diffusers' img2img
    pipelines (``timesteps[t_start * order:]``) working.

    Sampling is deterministic: ``step()`` accepts ``generator`` and ignores it.

    Args:
        solver: ``heun`` (default; second order, two evaluations per interval) or ``euler`` (first order, one).
        denoise_final: end with the ``x_0`` estimate at ``sampling_eps`` (one extra evaluation); default True.
            With False the output is the ODE's state at ``sampling_eps`` and ``num_inference_steps`` must be
            at least 2.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`. With
            ``clip_sample`` the ODE's derivative comes from the clipped ``x_0``, as in diffusers'
            ``HeunDiscreteScheduler``; ``use_clipped_model_output`` changes nothing further.
    """

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
        solver: str = "heun",
        denoise_final: bool = True,
    ) -> None:
        check_choice("solver", solver, SOLVERS)
        if not isinstance(denoise_final, bool):
            raise ValueError(f"denoise_final must be True or False, got {denoise_final!r}.")
        self.setup()
        _check_linear_drift(self.sde, sde)
        self.order = 2 if solver == "heun" else 1
        self._phases: list[str] = []
        self._alphas: list[float] = []
        self._sigmas: list[float] = []
        self._steps: list[tuple[float, float]] = []
        self._start: tuple[torch.Tensor, torch.Tensor] | None = None

    def plan_evaluations(self, times: list[float]) -> list[float]:
        """Lay out the evaluations for the levels ``times`` and precompute their coefficients."""
        heun = self.config.solver == "heun"
        denoise = self.config.denoise_final
        if not denoise and len(times) < 2:
            raise ValueError(
                f"num_inference_steps={len(times)} leaves no interval to integrate with denoise_final=False; use "
                "at least 2 noise levels, or denoise_final=True."
            )
        coeffs = [self.kernel_coeffs(t) for t in times]
        for t, (_, sigma) in zip(times, coeffs):
            if not sigma > 0:
                raise ValueError(
                    f"the SDE's noise level sigma(t) is {sigma} at t={t}; the probability-flow sampler needs "
                    "sigma > 0 at every level. Raise sampling_eps (or pass timesteps above it)."
                )
        eval_times: list[float] = []
        self._phases, self._alphas, self._sigmas, self._steps = [], [], [], []

        def add(phase: str, k: int, step: tuple[float, float]) -> None:
            eval_times.append(times[k])
            self._phases.append(phase)
            self._alphas.append(coeffs[k][0])
            self._sigmas.append(coeffs[k][1])
            self._steps.append(step)

        for k in range(len(times) - 1):
            (alpha, sigma), (alpha_next, sigma_next) = coeffs[k], coeffs[k + 1]
            # y -> y + (s' - s) eps in x = alpha y: x' = (alpha' / alpha) x + (sigma' - alpha' sigma / alpha) eps.
            step = (alpha_next / alpha, sigma_next - alpha_next * sigma / alpha)
            if heun:
                add(_PREDICT, k, step)
                add(_CORRECT, k + 1, step)
            else:
                add(_EULER, k, step)
        if denoise:
            add(_DENOISE, len(times) - 1, (math.nan, math.nan))
        self._start = None
        return eval_times

    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        phase = self._phases[index]
        # The derivative dy/ds = eps = (y - x_0) / s follows the (possibly clipped) x_0, as Karras et al. do.
        x0, eps = self.x0_and_eps(model_output, sample, self._alphas[index], self._sigmas[index], True)
        if phase == _DENOISE:
            return x0, x0
        a, b = self._steps[index]
        x = sample.to(eps.dtype)
        if phase == _EULER:
            return a * x + b * eps, x0
        if phase == _PREDICT:
            self._start = (x, eps)
            return a * x + b * eps, x0
        if self._start is None:
            raise ValueError(
                f"evaluation {index} is Heun's corrector, but the predictor before it did not run; with "
                "solver='heun' start at an even index (set_begin_index(k * scheduler.order))."
            )
        start, start_eps = self._start
        self._start = None
        # Trapezoidal rule on dy/ds (Karras et al. 2022, Algorithm 1, line 8).
        return a * start + b * (0.5 * (start_eps + eps)), x0
