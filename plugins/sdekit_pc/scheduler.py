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
    ANCESTRAL_VARIANCES,
    PREDICTORS,
    AffineUpdate,
    ancestral,
    euler_maruyama,
    reverse_diffusion,
)

__all__ = ["PCScheduler"]


@dataclass(frozen=True)
class _Evaluation:
    """Everything ``step()`` needs for one model evaluation at time ``t``, as Python numbers.

    A predictor evaluation has its ``update``; a corrector evaluation has none, and takes the step size
    ``corrector_step`` (``ald``) or, when that is ``None``, one from the norms with ``corrector_alpha``.
    ``denoise`` marks the last evaluation with ``denoise_final``: it returns the model's ``x_0`` estimate.
    """

    t: float
    alpha: float
    sigma: float
    update: AffineUpdate | None = None
    corrector_alpha: float = 1.0
    corrector_step: float | None = None
    denoise: bool = False


class PCScheduler(SDEScheduler):
    """Predictor-corrector (PC) sampling of a reverse-time SDE.

    Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole, "Score-Based Generative Modeling through Stochastic
    Differential Equations", ICLR 2021 (score-SDE), section 4.2 and Algorithms 2 and 3. At each noise level
    ``t_i`` the sampler runs ``corrector_steps`` corrector (Langevin MCMC) steps, then one predictor step of a
    reverse-SDE solver from ``t_i`` to ``t_{i+1}``, all with the model evaluated at ``t_i``: the order of the
    score-SDE reference code. Each evaluation is one ``step()``, so ``timesteps`` repeats every level
    ``corrector_steps + 1`` times (in the model's units) and the scheduler keeps the phase itself.

    ``set_timesteps(n)`` lays ``n + 1`` points from ``T`` to ``sampling_eps`` on ``time_grid`` and evaluates the
    model at the first ``n``: no evaluation is spent at the data end. With ``denoise_final`` (default) the last
    level's step lands on the data end itself, as the model's ``x_0`` estimate (Tweedie's formula) without noise,
    for every predictor; without it, the last step is an ordinary predictor step onto ``sampling_eps``. Levels
    given as ``timesteps=`` are all evaluated; without ``denoise_final`` the last one then steps to the data end
    with noise (``min(0, t_last - T / (N - 1))``: on a DDPM table the virtual clean entry, for VE ``sigma = 0``).

    The predictors and correctors need ``f``, ``g`` and the SDE's discretization as numbers: this sampler
    supports SDEs whose drift is linear in ``x`` (VE, VP, sub-VP and any plugin SDE of that form) and raises
    ``ValueError`` from ``set_timesteps`` for others.

    Args:
        predictor: ``ancestral`` (default; a draw from the Gaussian posterior between two levels of the SDE's own
            kernel: DDPM's step for ``vp``, SMLD ancestral sampling for ``ve``, score-SDE eq. 4 and appendix F, and
            the same posterior for sub-VP or any linear SDE; see :func:`sdekit_pc.predictors.ancestral`),
            ``reverse_diffusion`` (the reverse of the SDE's own discretization, eq. 46), ``euler_maruyama`` (the
            reverse SDE, eq. 6, by Euler-Maruyama) or ``none``. ``ancestral`` is the default because its step follows
            the kernel's own transition at any step size, so it is DDPM on a DDPM checkpoint. The other two are
            first-order in the step: on VP they scale the signal by ``2 - sqrt(1 - b)`` or ``1 + beta(t) dt / 2``
            where the kernel's ``1 / sqrt(1 - b)`` is due, and on the digits model reverse diffusion is 10 times
            DDPM's distance at 10 model calls (``docs/benchmarks.md``).
        corrector: ``langevin`` (default; step size from ``snr`` and the norms of the score and the noise,
            Algorithms 4 and 5, with ``alpha`` from the grid's actual step), ``ald`` (annealed Langevin dynamics,
            NCSN: step size ``2 alpha (snr sigma(t))^2``) or ``none``.
        corrector_steps: corrector steps per noise level, default 1 (``M`` in the paper; a ``ScoreSdeVeScheduler``
            config's ``correct_steps``).
        snr: the corrector's signal-to-noise ratio ``r``, > 0; default 0.3. The paper tuned 0.16 for VE on
            CIFAR-10 at 1000 levels. With few levels each Langevin step has more to correct: 0.3 keeps PC within
            2x of the predictor alone at 20 calls on the oracle for VP, sub-VP and VE (0.16 does not on VP and VE)
            and does better on the digits model; VE at 50-100 calls pays for it (``docs/samplers/pc.md``).
        denoise_final: the last evaluation returns the model's ``x_0`` estimate, without noise (the reference
            code's ``noise_removal``, taken to the data end); default True.
        norm: ``per_sample`` (default: the Langevin step size of a sample uses that sample's norms only, so a
            sample never depends on its batch-mates) or ``batch`` (the reference code's batch-averaged norms).
        ancestral_variance: the ``ancestral`` predictor's noise: ``beta_tilde`` (default; the posterior variance,
            diffusers' ``DDPMScheduler`` default ``fixed_small``) or ``beta`` (the forward step's, ``fixed_large``).
        time_grid: where ``set_timesteps(n)`` puts the levels: ``uniform`` in ``t``, ``logsnr`` (uniform in log
            signal-to-noise ratio) or ``karras`` (Karras et al. 2022, eq. 5) (:mod:`sdekit.grids`); ``None``
            (default) is pc's choice, ``uniform``: the stochastic predictors do best on it at 10 and 20 model calls
            (``docs/benchmarks.md``), as their noise washes out early errors and log-spaced grids make the
            high-noise steps too long for them (Euler-Maruyama diverges there).
        rho: the ``karras`` grid's exponent, > 0; default 7.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, sigma_min, sigma_max, sde,
            sde_params, sampling_eps, prediction_type, time_input, clip_sample, clip_sample_range, check_finite:
            the shared configuration of :class:`sdekit.SDEScheduler`.
    """

    lands_past_last_level = True  # n levels of an (n + 1)-point grid; the last step lands on grid_end

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
        predictor: str = "ancestral",
        corrector: str = "langevin",
        corrector_steps: int = 1,
        snr: float = 0.3,
        denoise_final: bool = True,
        norm: str = "per_sample",
        ancestral_variance: str = "beta_tilde",
        time_grid: str | None = None,
        rho: float = 7.0,
    ) -> None:
        check_choice("predictor", predictor, PREDICTORS)
        check_choice("ancestral_variance", ancestral_variance, ANCESTRAL_VARIANCES)
        check_choice("corrector", corrector, CORRECTORS)
        check_choice("norm", norm, NORMS)
        if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
            raise ValueError(f"corrector_steps must be an integer >= 0, got {corrector_steps!r}.")
        if isinstance(snr, bool) or not isinstance(snr, (int, float)) or not math.isfinite(snr) or snr <= 0:
            raise ValueError(f"snr must be a finite number > 0 (default 0.3; the paper's 0.16 for VE), got {snr!r}.")
        if predictor == "none" and self._num_corrections(corrector, corrector_steps) == 0:
            raise ValueError(
                f"predictor='none' with corrector={corrector!r} and corrector_steps={corrector_steps} evaluates "
                "nothing; choose a predictor, or a corrector with corrector_steps >= 1."
            )
        self.setup()
        self._evaluations: list[_Evaluation] = []

    @staticmethod
    def _num_corrections(corrector: str, corrector_steps: int) -> int:
        return 0 if corrector == "none" else corrector_steps

    def _data_end(self, t_last: float) -> float:
        """The time of the data end below ``t_last``: at least one training step down, and at most 0."""
        return min(0.0, t_last - self.sde.T / max(self.sde.N - 1, 1))

    def _predictor_updates(
        self, times: list[float], steps: list[float], coeffs: list[tuple[float, float]], ends: list[tuple[float, float]]
    ) -> list[AffineUpdate]:
        """The predictor's update at each level ``times[i]`` with step ``steps[i]``, landing where the kernel has
        scale and std ``ends[i]`` (``coeffs[i]`` at the level itself)."""
        c = self.config
        if c.predictor == "reverse_diffusion":
            return reverse_diffusion(self.sde, times, steps)
        if c.predictor == "euler_maruyama":
            return euler_maruyama(self.sde, times, steps)
        alphas, sigmas = zip(*coeffs)
        next_alphas, next_sigmas = zip(*ends)
        return ancestral(alphas, sigmas, next_alphas, next_sigmas, c.ancestral_variance)

    def plan_evaluations(self, times: list[float]) -> list[float]:
        c = self.config
        corrections = self._num_corrections(c.corrector, c.corrector_steps)
        alphas, sigmas = self.sde.marginal_coeffs(torch.tensor(times, dtype=torch.float64))
        coeffs = list(zip(alphas.tolist(), sigmas.tolist()))
        # Each level steps to the next one; the last to the grid's end (sampling_eps), or for levels given as
        # timesteps to the data end, where the kernel is (alpha, sigma) = (1, 0).
        end = self.grid_end if self.grid_end is not None else self._data_end(times[-1])
        steps = [t - t_next for t, t_next in zip(times, times[1:] + [end])]
        ends = coeffs[1:] + [self.kernel_coeffs(end) if self.grid_end is not None else (1.0, 0.0)]
        if c.predictor != "none":
            updates = self._predictor_updates(times, steps, coeffs, ends)
        if corrections:
            # alpha of Algorithm 5 from the step the predictor takes next (see langevin_alpha).
            corrector_alphas = langevin_alpha(self.sde, times, steps)
        evaluations = []
        for i, (t, (alpha, sigma)) in enumerate(zip(times, coeffs)):
            if corrections:
                step = ald_step_size(c.snr, sigma, corrector_alphas[i]) if c.corrector == "ald" else None
                corrector = _Evaluation(t, alpha, sigma, corrector_alpha=corrector_alphas[i], corrector_step=step)
                evaluations += [corrector] * corrections
            if c.predictor != "none":
                evaluations.append(_Evaluation(t, alpha, sigma, update=updates[i]))
        if c.denoise_final:
            evaluations[-1] = replace(evaluations[-1], denoise=True)
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
        if e.denoise:
            # The step onto the data end: Tweedie's E[x_0 | x_t], no noise.
            return x0, x0
        x = sample.to(eps.dtype)
        score = compose_model_output(x0, eps, e.alpha, e.sigma, "score")
        noise = self.noise_like(sample, generator)
        if e.update is not None:
            return e.update.apply(x, score, noise), x0
        step = e.corrector_step
        if step is None:
            step = langevin_step_size(score, noise, self.config.snr, e.corrector_alpha, self.config.norm)
        return langevin_update(x, score, noise, step), x0
