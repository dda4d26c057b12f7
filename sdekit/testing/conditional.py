"""Exact answers for controllable generation on a :class:`GaussianMixture`.

* :class:`MixturePosteriorClassifier`: the time-dependent component posterior ``p(k | x_t)``, an exact classifier
  for classifier guidance. Under ``x_t = alpha x_0 + sigma z`` component ``k`` becomes
  ``N(alpha m_k, alpha^2 C_k + sigma^2 I)``, so ``log p(k | x_t) = log w_k + log N_k(x_t) - log p(x_t)``, and
  ``grad_x log p(k | x_t)`` is the term classifier guidance adds to the score (score-SDE, eq. 14 / appendix I.1).
* :func:`masked_conditional`: the exact conditional of the hidden coordinates given the known ones, what
  inpainting samples: a Gaussian mixture whose weights are the components' likelihoods of the known values and
  whose components are the Gaussian conditionals (Bishop, *Pattern Recognition and Machine Learning*, eqs.
  2.81-2.82).
* :func:`color_mixture` and :func:`decoupled_mixture`: a small RGB mixture, and the same distribution in the
  decoupled colour basis of :mod:`sdekit.inpainting`, where colorization is inpainting of the gray channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..inpainting import COLOR_BASIS
from ..parametrization import TIME_INPUTS, check_choice, from_model_time
from ..sde import SDE, TimeLike
from .mixture import GaussianMixture

__all__ = [
    "MaskedConditional",
    "MixturePosteriorClassifier",
    "class_mixture",
    "color_mixture",
    "decoupled_mixture",
    "half_mask_mixture",
    "masked_conditional",
]

# Rows of a 4 x 4 Hadamard matrix: four +-1 patterns, any two differing in exactly two entries.
_PATTERNS = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)


class MixturePosteriorClassifier(torch.nn.Module):
    """The exact time-dependent classifier of a mixture's components: ``softmax(logits) = p(k | x_t)``.

    Called as ``classifier(x, timestep)`` with the model's timestep input (``time_input``, as the oracle model
    takes it), it returns logits of shape ``(batch, K)``:
    ``log w_k + log N(x_t; alpha m_k, alpha^2 C_k + sigma^2 I)``. It is differentiable in ``x``, as classifier
    guidance needs. ``num_calls`` counts forward passes.

    Args:
        mixture: the data distribution; its components are the classes.
        sde: the forward SDE the data is noised with.
        time_input: ``ddpm``, ``sigma`` or ``continuous``; default the SDE's own
            (:meth:`~sdekit.sde.SDE.default_time_input`), as :class:`~sdekit.testing.MixtureScoreModel` assumes.
    """

    def __init__(self, mixture: GaussianMixture, sde: SDE, time_input: str | None = None) -> None:
        super().__init__()
        self.mixture = mixture
        self.sde = sde
        time_input = sde.default_time_input() if time_input is None else time_input
        self.time_input = check_choice("time_input", time_input, TIME_INPUTS)
        covs = mixture.component_covariances()
        self._components = [
            GaussianMixture(mixture.means[k : k + 1], covs=covs[k : k + 1], event_shape=mixture.event_shape)
            for k in range(mixture.num_components)
        ]
        self.num_calls = 0

    def forward(self, sample: torch.Tensor, timestep: TimeLike) -> torch.Tensor:
        """Logits ``(batch, K)`` of the components at ``sample`` and model time ``timestep``."""
        self.num_calls += 1
        t = from_model_time(self.sde, torch.as_tensor(timestep, device=sample.device), self.time_input)
        t = t.to(torch.float64).reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)
        alpha, sigma = self.sde.marginal_coeffs(t.to(torch.float64))
        log_densities = torch.stack([c.log_prob(sample, alpha, sigma) for c in self._components], dim=1)
        return log_densities + self.mixture.weights.log().to(device=sample.device, dtype=log_densities.dtype)


@dataclass(frozen=True)
class MaskedConditional:
    """The exact distribution of a mixture's hidden coordinates given its known ones, for each of ``B`` samples.

    Attributes:
        weights: ``(B, K)`` posterior component weights ``p(k | known values)``.
        means: ``(B, K, H)`` conditional means of the ``H`` hidden coordinates.
        covs: ``(K, H, H)`` conditional covariances (the same for every sample).
        hidden: ``(H,)`` flat indices of the hidden coordinates in an event.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor
    hidden: torch.Tensor

    def selected(self) -> torch.Tensor:
        """``(B,)`` the component the known values select: the most probable under :attr:`weights`."""
        return self.weights.argmax(dim=1)

    def component_log_likelihoods(self, samples: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` log-density of each sample's hidden values under each conditional component (no weights)."""
        hidden = samples.reshape(samples.shape[0], -1).to(torch.float64)[:, self.hidden.to(samples.device)]
        chol = torch.linalg.cholesky(self.covs.to(hidden.device))
        resid = (hidden[:, None, :] - self.means.to(hidden.device)).unsqueeze(-1)  # (B, K, H, 1)
        white = torch.linalg.solve_triangular(chol.expand(hidden.shape[0], -1, -1, -1), resid, upper=False)
        log_det = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)
        dim = hidden.shape[1]
        return -0.5 * (white.squeeze(-1).pow(2).sum(-1) + log_det + dim * torch.log(torch.tensor(2 * torch.pi)))

    def landed(self, samples: torch.Tensor) -> torch.Tensor:
        """``(B,)`` the component each sample's hidden values belong to: the conditional component under which
        they are most likely (the known values' weights left out, so that they cannot vote)."""
        return self.component_log_likelihoods(samples).argmax(dim=1)

    def log_prob(self, samples: torch.Tensor) -> torch.Tensor:
        """``(B,)`` exact conditional log-density of each sample's hidden values."""
        return torch.logsumexp(self.component_log_likelihoods(samples) + self.weights.log(), dim=1)


def masked_conditional(mixture: GaussianMixture, known: torch.Tensor, mask: torch.Tensor) -> MaskedConditional:
    """The exact conditional of the coordinates where ``mask`` is 0 given the values of ``known`` where it is 1.

    Args:
        mixture: the data distribution.
        known: ``(B, *event_shape)``; only its entries where ``mask`` is 1 are read.
        mask: event-shaped (or with leading size-1 dimensions), 1 where values are known, 0 where hidden; one mask
            for all samples, with at least one coordinate of each kind.

    For component ``k`` with mean ``m`` and covariance ``C`` split into known ``o`` and hidden ``h`` parts, the
    weight is ``w_k N(x_o; m_o, C_oo)`` normalised over ``k``, the mean ``m_h + C_ho C_oo^{-1} (x_o - m_o)`` and
    the covariance ``C_hh - C_ho C_oo^{-1} C_oh`` (Bishop 2006, eqs. 2.81-2.82).
    """
    flat_mask = torch.as_tensor(mask).reshape(-1, mixture.dim)
    if flat_mask.shape[0] != 1 and not bool((flat_mask == flat_mask[:1]).all()):
        raise ValueError("masked_conditional takes one mask for all samples; the mask differs between samples.")
    flat_mask = flat_mask[0]
    if not bool(((flat_mask == 0) | (flat_mask == 1)).all()):
        raise ValueError("mask must hold only 0 (hidden) and 1 (known).")
    observed = torch.nonzero(flat_mask != 0).flatten()
    hidden = torch.nonzero(flat_mask == 0).flatten()
    if observed.numel() == 0 or hidden.numel() == 0:
        raise ValueError("mask must mark at least one coordinate known (1) and one hidden (0).")
    x_o = known.reshape(known.shape[0], -1).to(torch.float64)[:, observed.to(known.device)].cpu()
    covs = mixture.component_covariances()
    c_oo = covs[:, observed][:, :, observed]
    c_ho = covs[:, hidden][:, :, observed]
    c_hh = covs[:, hidden][:, :, hidden]
    chol = torch.linalg.cholesky(c_oo)  # (K, O, O)
    resid = x_o[:, None, :] - mixture.means[None, :, observed]  # (B, K, O)
    solved = torch.cholesky_solve(resid.permute(1, 2, 0), chol)  # C_oo^{-1} resid: (K, O, B)
    means = mixture.means[None, :, hidden] + torch.einsum("kho,kob->bkh", c_ho, solved)
    cond_covs = c_hh - c_ho @ torch.cholesky_solve(c_ho.transpose(1, 2), chol)
    log_det = 2 * torch.diagonal(chol, dim1=-2, dim2=-1).log().sum(-1)  # (K,)
    maha = torch.einsum("bko,kob->bk", resid, solved)
    log_lik = -0.5 * (maha + log_det + observed.numel() * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))
    weights = torch.softmax(log_lik + mixture.weights.log(), dim=1)
    return MaskedConditional(
        weights=weights, means=means, covs=0.5 * (cond_covs + cond_covs.transpose(1, 2)), hidden=hidden
    )


def half_mask_mixture(
    known_scale: float = 0.5, hidden_scale: float = 0.4, std: float = 0.2
) -> tuple[GaussianMixture, torch.Tensor]:
    """An inpainting oracle: four equally likely components over ``1 x 4 x 4`` images, and the mask ``(1, 1, 4, 4)``
    that hides the right half (columns 2 and 3).

    Component ``k``'s mean has the rows ``known_scale * p_k`` in the left half and ``hidden_scale * p_j`` in the
    right half, with ``p`` the rows of a 4 x 4 Hadamard matrix and ``j`` a fixed permutation of ``k``; isotropic
    ``std``. At the defaults the left half selects its component with posterior weight above 0.999 and the right
    half is told apart from the other components' in more than 99.9% of exact samples, yet the selection reaches
    the right half late in sampling: plain replacement with a deterministic sampler lands in the wrong component
    in about 7% of samples (``benchmarks/controllable.py``).
    """
    known = known_scale * _PATTERNS[:, :, None].expand(4, 4, 2)
    hidden = hidden_scale * _PATTERNS[[2, 0, 3, 1], :, None].expand(4, 4, 2)
    means = torch.cat([known, hidden], dim=-1).reshape(4, 16)
    mixture = GaussianMixture(means, stds=torch.full((4,), std, dtype=torch.float64), event_shape=(1, 4, 4))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1
    return mixture, mask


def class_mixture(scale: float = 0.25, std: float = 0.25) -> GaussianMixture:
    """A class-conditional oracle: four components (the classes) over ``1 x 4 x 4`` images with weights 0.4, 0.3,
    0.2 and 0.1; component ``k``'s rows are ``scale * p_k`` (``p`` the rows of a 4 x 4 Hadamard matrix), isotropic
    ``std``. At the defaults the components overlap a little: the exact posterior at ``t = 0`` names the right
    component for about 99% of exact samples, the ceiling for a guided sampler.
    """
    means = scale * _PATTERNS[:, :, None].expand(4, 4, 4).reshape(4, 16)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    return GaussianMixture(
        means, stds=torch.full((4,), std, dtype=torch.float64), weights=weights, event_shape=(1, 4, 4)
    )


def color_mixture(size: int = 4, std: float = 0.12) -> GaussianMixture:
    """A small RGB oracle: three components over ``(3, size, size)`` images in ``[-1, 1]``, each a colour with a
    mild left-to-right gradient, isotropic ``std``. The colours have distinct gray levels (channel means), so the
    gray image selects the component and colorization has one right answer.

    The colours (RGB at the image centre): a warm orange (gray 0.3), a pale blue (gray 0) and a dark purple (gray
    -0.4); their colour coordinates differ about as much as their gray ones.
    """
    colors = torch.tensor([[0.6, 0.3, 0.0], [-0.2, 0.0, 0.2], [-0.5, -0.2, -0.5]], dtype=torch.float64)
    ramp = torch.linspace(-0.15, 0.15, size, dtype=torch.float64)
    means = colors[:, :, None, None] + ramp[None, None, None, :].expand(1, 3, size, size)
    return GaussianMixture(
        means.reshape(3, -1), stds=torch.full((3,), std, dtype=torch.float64), event_shape=(3, size, size)
    )


def decoupled_mixture(mixture: GaussianMixture) -> GaussianMixture:
    """``mixture`` (RGB events ``(3, H, W)``) expressed in the decoupled colour basis
    (:data:`sdekit.inpainting.COLOR_BASIS`): the distribution of ``decouple_colors(x)`` for ``x ~ mixture``.

    The basis is orthonormal and acts on each pixel's channels, so means rotate and covariances become
    ``R C R^T`` with ``R`` the per-pixel rotation.
    """
    shape = mixture.event_shape
    if len(shape) != 3 or shape[0] != 3:
        raise ValueError(f"decoupled_mixture needs RGB events of shape (3, H, W), got {shape}.")
    pixels = shape[1] * shape[2]
    rotation = torch.kron(COLOR_BASIS.to(torch.float64), torch.eye(pixels, dtype=torch.float64))  # channel-major
    means = mixture.means @ rotation.T
    covs = rotation @ mixture.component_covariances() @ rotation.T
    return GaussianMixture(means, covs=covs, weights=mixture.weights, event_shape=shape)
