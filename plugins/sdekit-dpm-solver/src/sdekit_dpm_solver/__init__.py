"""sdekit-dpm-solver: DPM-Solver and DPM-Solver++ (Lu et al. 2022) for every sdekit SDE, as a diffusers scheduler.

A separately packaged sdekit plugin: installing the distribution registers the sampler ``dpm-solver`` in the
``sdekit.samplers`` entry-point group, so ``sdekit.load_scheduler("dpm-solver", pipe.scheduler.config)``, the
``sdekit`` command's ``--sampler`` and the trainer's ``--sampler`` find it. It is built on sdekit's public extension
API only (:class:`sdekit.SDEScheduler`); the update's numbers are in :mod:`sdekit_dpm_solver.coefficients`.
"""

from .scheduler import ALGORITHM_TYPES, METHODS, SOLVER_TYPES, DPMSolverScheduler

__all__ = ["ALGORITHM_TYPES", "METHODS", "SOLVER_TYPES", "DPMSolverScheduler", "__version__"]
__version__ = "0.1.0"
