"""Predictor-corrector sampling as a diffusers scheduler (score-SDE, Algorithms 2 and 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from diffusers.configuration_utils import register_to_config

from sdekit.parametrization import check_choice, compose_model_output
from sdekit.scheduler import SDEScheduler

from .correctors import CORRECTORS, NORMS, ald_step_size, langevin_alpha, langevin_step_size, langevin_update
from .predictors import (
    PREDICTORS,
    AffineUpdate,
    ancestral_ve,
    ancestral_vp,
    euler_maruyama,
    reverse_diffusion,
)

__all__ = ["PCScheduler"]


@dataclass(frozen=True)
class _Evaluation:
    """Everything ``step()`` needs for one model evaluation at time ``t``, as Python numbers.

    A predictor evaluation has its ``update``; a corrector evaluation has none, and takes the step size
    ``corrector_step`` (``ald``) or, when that is ``None``, one from the norms with ``corrector_alpha``.
    ``add_noise`` is False only for the last evaluation with ``denoise_final``.
    """

    t: float
    alpha: float
    sigma: float
    update: AffineUpdate | None = None
    corrector_alpha: float = 1.0
    corrector_step: float | None = None
    add_noise: bool = True


class PCScheduler(SDEScheduler):
    """Predictor-corrector (PC) sampling of a reverse-time SDE.

    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic
    Differential Equations", ICLR 2021 (score-SDE), section 4.2 and Algorithms 2 and 3. At each noise level
    ``t_i`` (from ``T`` down to ``sampling_eps``) the sampler runs ``corrector_steps`` corrector (Langevin MCMC)
    steps, then one predictor step of a reverse-SDE solver from ``t_i`` to ``t_{i+1}``, all with the model
    evaluated at ``t_i``: the order of the score-SDE reference code. Each evaluation is one ``step()``, so
    ``timesteps`` repeats every level ``corrector_steps + 1`` times (in the model's units) and the scheduler
    keeps the phase itself. The last level's predictor step goes to ``min(0, t_last - T / (N - 1))``: the data
    end of the SDE, and at least one training step down (on a DDPM table, whose last level is entry 0 at
    ``t = 0``, that is the virtual clean entry, so the step is DDPM's last step; for VE it reaches
    ``sigma = 0``, as the reference code's and diffusers' ``ScoreSdeVeScheduler``'s last step do).

    The predictors and correctors need ``f``, ``g`` and the SDE's discretization as numbers: this sampler
    supports SDEs whose drift is linear in ``x`` (VE, VP, sub-VP and any plugin SDE of that form) and raises
    ``ValueError`` from ``set_timesteps`` for others.

    Args:
        predictor: ``reverse_diffusion`` (default; the reverse of the SDE's own discretization, score-SDE
            eq. 46), ``euler_maruyama`` (the reverse SDE, eq. 6, by Euler-Maruyama), ``ancestral`` (SMLD ancestral
            sampling for a variance-exploding SDE such as ``ve``, DDPM's for a variance-preserving one such as
            ``vp``; appendix F and eq. 4) or ``none``.
        corrector: ``langevin`` (default; step size from ``snr`` and the norms of the score and the noise,
            Algorithms 4 and 5), ``ald`` (annealed Langevin dynamics, NCSN: step size ``2 alpha (snr sigma(t))^2``)
            or ``none``.
        corrector_steps: corrector steps per noise level, default 1 (``M`` in the paper; a ``ScoreSdeVeScheduler``
            config's ``correct_steps``).
        snr: the corrector's signal-to-noise ratio ``r``, > 0; default 0.16 (the paper's value for VE SDEs).
        denoise_final: the last evaluation returns its update's mean, without noise (the reference code's
            ``noise_removal``); default True.
        norm: ``per_sample`` (default: the Langevin step size of a sample uses that sample's norms only, so a
            sample never depends on its batch-mates) or ``batch`` (the reference code's batch-averaged norms).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`.
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
        predictor: str = "reverse_diffusion",
        corrector: str = "langevin",
        corrector_steps: int = 1,
        snr: float = 0.16,
        denoise_final: bool = True,
        norm: str = "per_sample",
    ) -> None:
        check_choice("predictor", predictor, PREDICTORS)
        check_choice("corrector", corrector, CORRECTORS)
        check_choice("norm", norm, NORMS)
        if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}.")
        if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr) or snr <= 0:
            raise ValueError(f"snr must be a finite number > 0 (0.16 is the paper's value for VE), got {snr!r}.")
        if predictor == "none" and self._num_corrections(corrector, corrector_steps) == 0:
            raise ValueError(
                f"predictor='none' with corrector={corrector!r} and corrector_steps={corrector_steps} evaluates "
                "nothing; choose a predictor, or a corrector with corrector_steps >= 1."
            )
        self.setup()
        if predictor == "ancestral" and not (self.sde.is_variance_exploding() or self.sde.is_variance_preserving()):
            raise ValueError(
                f"predictor='ancestral' is SMLD's or DDPM's ancestral sampling, defined for a variance-exploding "
                f"(x_t = x_0 + sigma z) or a variance-preserving kernel; sde={sde!r} ({type(self.sde).__name__}) has "
                "neither. Use predictor='reverse_diffusion' or 'euler_maruyama'."
            )
        self._evaluations: list[_Evaluation] = []

    @staticmethod
    def _num_corrections(corrector: str, corrector_steps: int) -> int:
        return 0 if corrector == "none" else corrector_steps

    def _predictor_updates(self, times: list[float], steps: list[float], sigmas: list[float]) -> list[AffineUpdate]:
        """The predictor's update at each level ``times[i]`` with step ``steps[i]``.

        Levels whose steps agree to 12 significant digits (those of a uniform grid differ by float rounding only)
        share one SDE call, with the first one's step.
        """
        groups: dict[str, list[int]] = {}
        for i, dt in enumerate(steps):
            groups.setdefault(f"{dt:.12g}", []).append(i)
        updates: dict[int, AffineUpdate] = {}
        for members in groups.values():
            level_times, dt = [times[i] for i in members], steps[members[0]]
            if self.config.predictor == "reverse_diffusion":
                group = reverse_diffusion(self.sde, level_times, dt)
            elif self.config.predictor == "euler_maruyama":
                group = euler_maruyama(self.sde, level_times, dt)
            elif self.sde.is_variance_exploding():
                group = ancestral_ve(self.sde, level_times, dt, [sigmas[i] for i in members])
            else:
                group = ancestral_vp(self.sde, level_times, dt)
            updates.update(zip(members, group))
        return [updates[i] for i in range(len(times))]

    def plan_evaluations(self, times: list[float]) -> list[float]:
        c = self.config
        corrections = self._num_corrections(c.corrector, c.corrector_steps)
        alphas, sigmas = (v.tolist() for v in self.sde.marginal_coeffs(torch.tensor(times, dtype=torch.float64)))
        predicts = c.predictor != "none"
        if predicts:
            # Each step goes to the next level, dt = t_i - t_{i+1}; the last one to the data end of the SDE, at
            # least one training step down (see the class docstring).
            last = min(0.0, times[-1] - self.sde.T / max(self.sde.N - 1, 1))
            steps = [t - t_next for t, t_next in zip(times, times[1:] + [last])]
            updates = self._predictor_updates(times, steps, sigmas)
        if corrections:
            corrector_alphas = langevin_alpha(self.sde, times)
        evaluations = []
        for i, (t, alpha, sigma) in enumerate(zip(times, alphas, sigmas)):
            if corrections:
                step = ald_step_size(c.snr, sigma, corrector_alphas[i]) if c.corrector == "ald" else None
                corrector = _Evaluation(t, alpha, sigma, corrector_alpha=corrector_alphas[i], corrector_step=step)
                evaluations += [corrector] * corrections
            if predicts:
                evaluations.append(_Evaluation(t, alpha, sigma, update=updates[i]))
        if c.denoise_final:
            evaluations[-1] = replace(evaluations[-1], add_noise=False)
        self._evaluations = evaluations
        return [e.t for e in evaluations]

    def update(
        self,
        index: int,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
        use_clipped_model_output: bool,
        eta: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._evaluations[index]
        x0, eps = self.x0_and_eps(model_output, sample, e.alpha, e.sigma, use_clipped_model_output)
        x = sample.to(eps.dtype)
        score = compose_model_output(x0, eps, e.alpha, e.sigma, "score")
        if e.update is not None:
            noise = self.noise_like(sample, generator) if e.add_noise else None
            return e.update.apply(x, score, noise), x0
        # A corrector draws its noise even when it drops it: the Langevin step size needs ||z||.
        noise = self.noise_like(sample, generator)
        step = e.corrector_step
        if step is None:
            step = langevin_step_size(score, noise, self.config.snr, e.corrector_alpha, self.config.norm)
        return langevin_update(x, score, noise, step, e.add_noise), x0
