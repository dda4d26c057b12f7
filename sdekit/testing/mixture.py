"""A Gaussian mixture whose noisy marginals under any affine-Gaussian SDE are closed form.

If ``x_0 ~ sum_k w_k N(m_k, C_k)`` and ``x_t = alpha x_0 + sigma z``, then
``x_t ~ sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I)``. With ``C_k = U_k diag(lam_k) U_k^T`` the noisy
covariance has the same eigenvectors and eigenvalues ``alpha^2 lam_k + sigma^2``, so log-density and score
cost one rotation per component, for a different ``(alpha, sigma)`` per sample if need be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["GaussianMixture", "benchmark_mixture"]


class GaussianMixture:
    """A mixture of ``K`` Gaussians over events of shape ``event_shape`` (flattened to ``D`` values).

    Args:
        means: ``(K, D)`` component means.
        covs: ``(K, D, D)`` component covariances (symmetric positive definite), or
        stds: ``(K,)`` isotropic or ``(K, D)`` diagonal component standard deviations (no ``D x D`` storage, so
            image-sized events stay cheap). Give exactly one of ``covs`` and ``stds``.
        weights: ``(K,)`` mixture weights (normalised here); uniform by default.
        event_shape: shape of one sample, e.g. ``(1, 8, 8)``; ``(D,)`` by default.

    Everything is held in float64; methods accept any float dtype and return the input's.
    """

    def __init__(
        self,
        means: torch.Tensor,
        covs: torch.Tensor | None = None,
        stds: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        event_shape: Sequence[int] | None = None,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}.")
        k, d = means.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, D, D) and stds ((K,) or (K, D)).")
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            if covs.shape != (k, d, d):
                raise ValueError(f"covs must have shape {(k, d, d)}, got {tuple(covs.shape)}.")
            lam, rot = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
            if torch.any(lam <= 0):
                raise ValueError("every component covariance must be positive definite.")
            self._rot: torch.Tensor | None = rot
            self._lam = lam
        else:
            stds = torch.as_tensor(stds, dtype=torch.float64)
            if stds.shape == (k,):
                stds = stds[:, None].expand(k, d)
            if stds.shape != (k, d) or torch.any(stds <= 0):
                raise ValueError(f"stds must be positive with shape ({k},) or {(k, d)}, got {tuple(stds.shape)}.")
            self._rot = None
            self._lam = stds**2
        weights = (
            torch.full((k,), 1.0 / k, dtype=torch.float64)
            if weights is None
            else torch.as_tensor(weights, dtype=torch.float64)
        )
        if weights.shape != (k,) or torch.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum.")
        event_shape = (d,) if event_shape is None else tuple(int(s) for s in event_shape)
        if math.prod(event_shape) != d:
            raise ValueError(f"event_shape {event_shape} does not hold D = {d} values.")
        self.means = means
        self.weights = weights / weights.sum()
        self.event_shape = event_shape
        self.num_components = k
        self.dim = d

    # -- moments and sampling ---------------------------------------------------------------------------

    def component_covariances(self) -> torch.Tensor:
        """``(K, D, D)`` covariances ``C_k`` (built on demand; ``D x D`` per component)."""
        if self._rot is None:
            return torch.diag_embed(self._lam)
        return self._rot @ torch.diag_embed(self._lam) @ self._rot.transpose(1, 2)

    def mean(self) -> torch.Tensor:
        """The mixture mean, shape ``(D,)``."""
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """The mixture covariance ``sum_k w_k (C_k + m_k m_k^T) - m m^T``, shape ``(D, D)``."""
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.component_covariances())
        second = second + torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        return second - torch.outer(m, m)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``n`` samples of shape ``(n, *event_shape)``."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        z = z * self._lam[comp].sqrt()
        if self._rot is not None:
            z = torch.einsum("nij,nj->ni", self._rot[comp], z)
        x = self.means[comp] + z
        return x.reshape((n,) + self.event_shape).to(device=device, dtype=dtype)

    # -- noisy marginals --------------------------------------------------------------------------------

    def _components(
        self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-component log-densities ``(B, K)``, rotated residuals ``(B, K, D)`` and variances ``(B, K, D)``."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per sample; the mixture's events have {self.dim}.")
        alpha = torch.as_tensor(alpha, dtype=torch.float64, device=flat.device).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=flat.device).reshape(-1, 1, 1)
        means, lam = self.means.to(flat.device), self._lam.to(flat.device)
        resid = flat[:, None, :] - alpha * means[None]
        if self._rot is not None:
            resid = torch.einsum("kdj,bkd->bkj", self._rot.to(flat.device), resid)
        var = alpha**2 * lam[None] + sigma**2
        log_norm = -0.5 * ((resid**2 / var).sum(-1) + var.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return log_norm + self.weights.to(flat.device).log(), resid, var

    def log_prob(
        self, x: torch.Tensor, alpha: torch.Tensor | float = 1.0, sigma: torch.Tensor | float = 0.0
    ) -> torch.Tensor:
        """Exact log-density of the noisy mixture ``alpha x_0 + sigma z`` at each sample, shape ``(B,)``.

        ``alpha`` and ``sigma`` are scalars or one value per sample; the defaults give the clean mixture.
        """
        log_joint, _, _ = self._components(x, alpha, sigma)
        return torch.logsumexp(log_joint, dim=1).to(x.dtype if x.is_floating_point() else torch.float64)

    def score(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact score ``grad_x log p(x)`` of the noisy mixture, shape and dtype of ``x``.

        ``-sum_k r_k(x) Sigma_k^{-1} (x - alpha m_k)`` with responsibilities ``r_k`` and
        ``Sigma_k = alpha^2 C_k + sigma^2 I``.
        """
        log_joint, resid, var = self._components(x, alpha, sigma)
        resp = torch.softmax(log_joint, dim=1)
        weighted = resp[..., None] * resid / var
        if self._rot is not None:
            weighted = torch.einsum("kdj,bkj->bkd", self._rot.to(x.device), weighted)
        return (-weighted.sum(1)).reshape(x.shape).to(x.dtype)


def benchmark_mixture() -> GaussianMixture:
    """The data of ``benchmarks/quality_vs_nfe.py`` and of the few-step tests: eight components in 16 dimensions
    (1 x 4 x 4 images), with unequal weights and per-dimension scales from 0.05 to 0.3, drawn from seed 123.

    A plugin's sampler run on it (through :class:`~sdekit.testing.MixtureScoreModel`, 4000 samples,
    :func:`~sdekit.testing.mixture_frechet_distance` with one chunk) is comparable with the tables in
    ``docs/benchmarks.md``.
    """
    gen = torch.Generator().manual_seed(123)
    means = torch.randn(8, 16, generator=gen) * 0.8
    stds = torch.rand(8, 16, generator=gen) * 0.25 + 0.05
    weights = torch.rand(8, generator=gen) + 0.5
    return GaussianMixture(means, stds=stds, weights=weights, event_shape=(1, 4, 4))
