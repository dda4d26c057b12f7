"""sdekit's built-in ``analytic-dpm`` sampler: Analytic-DPM (Bao, Li, Zhu & Zhang, ICLR 2022) as a diffusers
scheduler, with the Monte Carlo estimate of ``Gamma`` and the optimal trajectory.

Registered in the ``sdekit.samplers`` entry-point group exactly as a third-party plugin would be.
"""

from .gamma import GAMMA_ESTIMATORS
from .kernel import VARIANCES
from .scheduler import AnalyticDPMScheduler
from .trajectory import TRAJECTORIES

__all__ = ["AnalyticDPMScheduler", "GAMMA_ESTIMATORS", "TRAJECTORIES", "VARIANCES"]
