"""sdekit's built-in SDE plugins: ``ve``, ``vp`` and ``subvp`` (Song et al., 2021).

Registered in the ``sdekit.sdes`` entry-point group exactly as a third-party plugin would be.
"""

from .schedules import BETA_SCHEDULES, BetaSchedule, DiscreteBetaSchedule, LinearBetaSchedule, ddpm_betas
from .ve import VESDE
from .vp import VPSDE, SubVPSDE

__all__ = [
    "BETA_SCHEDULES",
    "BetaSchedule",
    "DiscreteBetaSchedule",
    "LinearBetaSchedule",
    "SubVPSDE",
    "VESDE",
    "VPSDE",
    "ddpm_betas",
]
