"""sdekit's ``pc`` sampler: predictor-corrector sampling (Song et al., 2021) as a diffusers scheduler.

Registered in the ``sdekit.samplers`` entry-point group as ``pc``; use it through
``sdekit.load_scheduler("pc", pipe.scheduler.config)``. The predictors and correctors are small functions in
:mod:`sdekit_pc.predictors` and :mod:`sdekit_pc.correctors`.
"""

from .correctors import CORRECTORS, NORMS
from .predictors import ANCESTRAL_VARIANCES, PREDICTORS
from .scheduler import PCScheduler

__all__ = ["ANCESTRAL_VARIANCES", "CORRECTORS", "NORMS", "PCScheduler", "PREDICTORS"]
