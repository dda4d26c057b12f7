"""Trajectories ``0 = tau_1 < ... < tau_K = N - 1`` over the ``N`` levels of a DDPM table (0-based).

Every trajectory is pinned at both ends, as in the paper (Bao et al., ICLR 2022, section 4: ``tau_1 = 1``,
``tau_K = N`` in its 1-based indexing): sampling starts at the noisiest level and its last noisy level is the
first table entry, from which one noise-free step reaches the data.

* ``even``: ``tau_k = floor(k (N - 1) / (K - 1) + 1/2)``, the paper's even trajectory.
* ``quadratic``: ``tau_k = floor(k^2 (N - 1) / (K - 1)^2)``, DDIM's quadratic spacing pinned at both ends, each
  level raised to one above its predecessor where the squares bunch up near 0.
* ``optimal``: the path minimising a sum of step costs, by the paper's dynamic program (section 4), ``O(K M^2)``
  for ``M`` candidate levels.
"""

from __future__ import annotations

import torch

__all__ = ["TRAJECTORIES", "even_levels", "optimal_levels", "quadratic_levels"]

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
