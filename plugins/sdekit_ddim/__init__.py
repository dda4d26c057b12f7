"""sdekit's built-in ``ddim`` sampler: DDIM (Song, Meng & Ermon, ICLR 2021) as a diffusers scheduler.

Registered in the ``sdekit.samplers`` entry-point group exactly as a third-party plugin would be.
"""

from .scheduler import TIMESTEP_SPACINGS, DDIMSDEScheduler

__all__ = ["DDIMSDEScheduler", "TIMESTEP_SPACINGS"]
