"""sdekit's ``pf-ode`` sampler: the probability-flow ODE (Song et al., 2021, eq. 13) as a diffusers scheduler.

Registered in the ``sdekit.samplers`` entry-point group exactly as a third-party plugin would be. The adaptive
(dopri5) solver of the same ODE is :func:`sdekit.ode.sample_ode`.
"""

from .scheduler import SOLVERS, ProbabilityFlowScheduler

__all__ = ["SOLVERS", "ProbabilityFlowScheduler"]
