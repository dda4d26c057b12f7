"""Trajectories ``0 = tau_1 < ... < tau_K = N - 1`` over the ``N`` levels of a DDPM table (0-based).

Every trajectory is pinned at both ends, as in the paper (Bao et al., ICLR 2022, section 4: ``tau_1 = 1``,
``tau_K = N`` in its 1-based indexing): sampling starts at the noisiest level and its last noisy level is the
first table entry, from which one noise-free step reaches the data.

* ``even``: ``tau_k = floor(k (N - 1) / (K - 1) + 1/2)``, the paper's even trajectory.
* ``quadratic``: ``tau_k = floor(k^2 (N - 1) / (K - 1)^2)``, DDIM's quadratic spacing pinned at both ends, each
  level raised to one above its predecessor where the squares bunch up near 0.
* ``optimal``: the path minimising a sum of step costs, by the paper's dynamic program (section 4), ``O(K M^2)``
  for ``M`` candidate levels (:func:`optimal_candidates`: those with ``Gamma``). The cost of a step
  (:func:`step_costs`) is twice its expected KL per dimension, :func:`sdekit_analytic_dpm.kernel.step_kl`: for
  the analytic variance the paper's ``J(s, t) = log(sigma*^2 / lambda^2)`` (section 4), here with Theorem 2's
  clipping and the pixel rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .gamma import format_levels, missing_levels, optimal_remedy
from .kernel import level_pairs, step_kernel, step_kl

__all__ = [
    "TRAJECTORIES",
    "check_num_steps",
    "custom_levels",
    "even_levels",
    "optimal_candidates",
    "optimal_levels",
    "quadratic_levels",
    "spaced_levels",
    "step_costs",
]

TRAJECTORIES = ("even", "quadratic", "optimal")
"""Names accepted by ``AnalyticDPMScheduler(trajectory=...)``."""


def _check_counts(num_levels: int, num_steps: int) -> None:
    if num_steps < 2 or num_steps > num_levels:
        raise ValueError(
            f"a trajectory pinned at both ends needs 2 <= K <= N levels; got K={num_steps} for N={num_levels}."
        )


def even_levels(num_levels: int, num_steps: int) -> list[int]:
    """``num_steps`` evenly spaced levels from 0 to ``num_levels - 1``, ascending (exact integer rounding)."""
    _check_counts(num_levels, num_steps)
    last, span = num_levels - 1, num_steps - 1
    return [(2 * k * last + span) // (2 * span) for k in range(num_steps)]


def quadratic_levels(num_levels: int, num_steps: int) -> list[int]:
    """``num_steps`` quadratically spaced levels from 0 to ``num_levels - 1``, ascending and distinct.

    ``c k^2 + (K - 1 - k) <= N - 1`` for every ``k`` (a convex function of ``k`` equal to ``N - 1`` and
    ``K - 1 <= N - 1`` at the ends), so raising duplicates never pushes the last level past ``N - 1``.
    """
    _check_counts(num_levels, num_steps)
    last, span = num_levels - 1, num_steps - 1
    levels: list[int] = []
    for k in range(num_steps):
        level = (k * k * last) // (span * span)
        levels.append(level if not levels or level > levels[-1] else levels[-1] + 1)
    return levels


def optimal_levels(costs: torch.Tensor, max_steps: int) -> dict[int, list[int]]:
    """Least-cost paths from node 0 to node ``M - 1`` with ``K`` nodes, for every ``K`` in ``2..max_steps``.

    The paper's dynamic program (section 4): with ``C_1[0] = 0`` and ``C_1[j] = inf`` otherwise,
    ``C_k[j] = min_i C_{k-1}[i] + costs[i, j]``; the path with ``K`` nodes ends at ``C_K[M - 1]`` and is read
    back through the argmins. One ``M x M`` minimum per ``k``.

    Args:
        costs: ``(M, M)`` float64 step costs, ``costs[i, j]`` for the step from node ``j`` down to node ``i < j``;
            entries with ``i >= j`` are ignored.
        max_steps: the largest ``K``; at most ``M``.

    Returns:
        ``{K: [node indices, ascending]}``.
    """
    size = costs.shape[0]
    _check_counts(size, max_steps)
    allowed = torch.ones(size, size, dtype=torch.bool).triu(diagonal=1)
    costs = torch.where(allowed, costs.to(torch.float64), torch.inf)
    best = torch.full((size,), torch.inf, dtype=torch.float64)
    best[0] = 0.0
    parents: list[torch.Tensor] = []
    paths: dict[int, list[int]] = {}
    for k in range(2, max_steps + 1):
        best, parent = (best[:, None] + costs).min(dim=0)
        parents.append(parent)
        node, path = size - 1, [size - 1]
        for back in reversed(parents):
            node = int(back[node])
            path.append(node)
        paths[k] = path[::-1]
    return paths


def check_num_steps(num_steps: object, num_levels: int) -> None:
    """``ValueError`` unless ``num_steps`` (a scheduler's ``num_inference_steps``) is an integer ``K`` with
    ``2 <= K <= num_levels``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(f"num_inference_steps must be an integer, got {num_steps!r}.")
    if not 2 <= num_steps <= num_levels:
        raise ValueError(
            f"num_inference_steps must be between 2 and num_train_timesteps={num_levels}: the trajectory "
            f"runs from level {num_levels - 1} down to level 0 (both included); got {num_steps}."
        )


def custom_levels(given: torch.Tensor, exact: torch.Tensor, num_levels: int) -> list[int]:
    """The table levels of a trajectory given by the user, descending.

    Args:
        given: the user's ``timesteps`` in model units, flat (for the message).
        exact: the same as fractional table levels; each must be within ``1e-6`` of an integer level in
            ``[0, num_levels - 1]``, at least 2 and strictly decreasing (they should end at 0).
        num_levels: the table's number of levels ``N``.
    """
    levels = exact.round()
    if (
        given.numel() < 2
        or not bool(torch.all(levels[1:] < levels[:-1]))
        or not bool(torch.all((levels - exact).abs() < 1e-6))
        or levels[0] > num_levels - 1
        or levels[-1] < 0
    ):
        raise ValueError(
            f"timesteps must be at least 2 strictly decreasing table levels in [0, {num_levels - 1}] (model "
            f"units); got {given.tolist()}."
        )
    return [int(n) for n in levels]


def spaced_levels(name: str, num_levels: int, num_steps: int) -> list[int]:
    """The ``even`` or ``quadratic`` trajectory (``name``), whose levels depend on the counts alone."""
    if name not in ("even", "quadratic"):
        raise ValueError(f"spaced trajectories are 'even' and 'quadratic', got {name!r}.")
    return (even_levels if name == "even" else quadratic_levels)(num_levels, num_steps)


def optimal_candidates(gamma: Sequence[float | None] | None, num_levels: int, num_steps: int) -> list[int]:
    """The levels the optimal trajectory with ``num_steps`` levels chooses among, ascending.

    Those where ``gamma`` (per table level, or ``None``) is known if they include both ends, else all
    ``num_levels``. A ``ValueError`` if there are fewer than ``num_steps``, or if ``Gamma`` is missing at some
    (saying how to estimate it).
    """
    candidates = list(range(num_levels))
    if gamma is not None:
        known = [level for level in candidates if gamma[level] is not None]
        if known and known[0] == 0 and known[-1] == candidates[-1]:
            candidates = known
    if num_steps > len(candidates):
        raise ValueError(
            f"the optimal trajectory with num_inference_steps={num_steps} needs as many levels with Gamma "
            f"estimated; only {len(candidates)} have it."
        )
    missing = missing_levels(gamma, candidates)
    if missing:
        raise ValueError(
            "trajectory='optimal' chooses its levels by a dynamic program over Gamma at every candidate level "
            f"(Bao et al. 2022, section 4), and Gamma is missing at timesteps {format_levels(missing)}. "
            + optimal_remedy(num_levels)
        )
    return candidates


def step_costs(
    log_alpha_bar: torch.Tensor,
    gamma: Sequence[float | None],
    levels: Sequence[int],
    variance: str,
    max_covariance: float | None,
    pixel_bound: float | None,
) -> torch.Tensor:
    """The optimal trajectory's step costs over candidate ``levels`` (ascending table levels), for
    :func:`optimal_levels`.

    ``costs[i, j]`` is twice the expected KL per dimension of the step from ``levels[j]`` down to ``levels[i]``
    with ``variance`` and the bounds, at eta = 1: the paper's ``J(s, t)`` (section 4) for the analytic variance.
    DDIM's eta = 0 has an infinite bound, so every eta uses the eta = 1 costs (and ``step(eta=...)`` may change
    eta after the trajectory is chosen).

    Args:
        log_alpha_bar: ``log alpha_bar`` at every level of the table, float64.
        gamma: ``Gamma`` per table level, known at all of ``levels``.
        levels: the candidate levels.
        variance, max_covariance: as in :func:`sdekit_analytic_dpm.kernel.step_kernel`.
        pixel_bound: the pixel rule's bound on the variance of the steps onto level 0, or ``None``.
    """
    gamma_at = torch.tensor([gamma[level] for level in levels], dtype=torch.float64)
    log_abar = log_alpha_bar[list(levels)]
    pair = level_pairs(log_abar[None, :], log_abar[:, None])
    max_variance = None
    if pixel_bound is not None and levels[0] == 0:  # the pixel rule bounds the steps onto the first level (row 0)
        max_variance = torch.full((len(levels), 1), math.inf, dtype=torch.float64)
        max_variance[0] = pixel_bound
    kernel = step_kernel(pair, gamma_at[None, :], 1.0, variance, max_covariance, max_variance)
    return step_kl(kernel)
