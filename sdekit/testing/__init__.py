"""Exact-score oracles and sample-quality metrics, for sdekit's tests and for plugin authors.

A :class:`GaussianMixture` stays a mixture under every affine-Gaussian SDE, so its noisy score is closed form;
:class:`MixtureScoreModel` serves that score through a ``UNet2DModel``-like interface. A sampler that is right
gives the mixture back. :func:`check_scheduler` (the conformance kit, :mod:`sdekit.testing.conformance`) checks
a scheduler against diffusers' scheduler contract and sdekit's.
"""

from .conformance import ConformanceReport, check_scheduler, tiny_unet
from .metrics import (
    frechet_distance,
    gaussian_frechet_distance,
    mixture_frechet_distance,
    mixture_frechet_floor,
    sliced_wasserstein,
)
from .mixture import GaussianMixture, benchmark_mixture
from .oracle import MixtureScoreModel, epsilon_oracle, score_oracle

__all__ = [
    "ConformanceReport",
    "GaussianMixture",
    "MixtureScoreModel",
    "benchmark_mixture",
    "check_scheduler",
    "epsilon_oracle",
    "frechet_distance",
    "gaussian_frechet_distance",
    "mixture_frechet_distance",
    "mixture_frechet_floor",
    "score_oracle",
    "sliced_wasserstein",
    "tiny_unet",
]
