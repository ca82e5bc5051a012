"""Bertsekas' auction algorithm with epsilon-scaling, vectorised in torch (runs on the cost's device).

Minimisation form. Row ``i`` (a "person") holding column ``j`` (an "object") pays ``C_ij + p_j``; the prices
``p`` start at 0 (or at a warm start such as Sinkhorn's column potentials) and only rise. In every round all
unassigned rows bid at once (Jacobi auction): row ``i`` finds its best column ``j1`` with value
``w1 = min_j (C_ij + p_j)`` and the second best value ``w2``, and offers to raise ``p_j1`` by
``w2 - w1 + eps``. Each column goes to its highest bidder (ties: lowest row index), whose offer becomes the
new price; the evicted owner is unassigned again.

Invariant (eps-complementary slackness): every assigned row holds a column within ``eps`` of its best value,
``C[i, perm_i] + p[perm_i] <= min_j (C_ij + p_j) + eps``. Summing over rows when all are assigned gives the
**optimality-gap bound** ``sum_i C[i, perm_i] <= OPT + n * eps_final``; for integer costs
``eps_final < 1 / n`` makes the result exactly optimal.

Epsilon-scaling: phases with ``eps_start, eps_start * scaling, ..., eps_final`` reuse the prices of the
previous phase; rows whose column still satisfies eps-CS for the smaller ``eps`` keep it, the others bid
again. Costs are first reduced by their row minima (which changes no assignment) and divided by their spread
(:func:`~lightning_dpmot.ot.costs.cost_scale`) so the arithmetic is scale free; it runs in float64 by default
so that price increments of ``eps`` are never lost to rounding, whatever the magnitude of the costs.

A one-bidder round is run as an eviction chain (the evicted owner bids next) with scalar indexing, which
removes most of the per-round overhead in the long single-bidder tails of each phase.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_dpmot.ot import checks
from lightning_dpmot.ot.costs import cost_scale

#: Default final epsilon relative to the cost spread: total gap <= n * 1e-3 * cost_scale(C).
DEFAULT_REL_EPS = 1e-3

#: Smallest final epsilon relative to the cost spread, in ulps of the arithmetic dtype at 1: smaller bids would be
#: lost to rounding of the (order-one, normalised) prices and the auction would never end.
_MIN_REL_EPS_ULPS = 100


class AuctionResult(NamedTuple):
    """Output of :func:`auction_assignment`.

    Attributes:
        perm: (n,) int64 permutation, row ``i`` is assigned column ``perm[i]``.
        prices: (n,) final column prices in cost units (valid for the cost plus any row constants; reusable as
            a warm start for a nearby problem).
        eps: the final epsilon in cost units; ``assignment_cost - OPT <= n * eps``.
        rounds: total number of bidding rounds over all phases.
    """

    perm: Tensor
    prices: Tensor
    eps: float
    rounds: int


def _eps_schedule(eps_start: float, eps_final: float, scaling: float) -> list[float]:
    """Geometric schedule eps_start, eps_start * scaling, ... ending exactly at eps_final."""
    schedule = []
    eps = eps_start
    while eps > eps_final:
        schedule.append(eps)
        eps *= scaling
    schedule.append(eps_final)
    return schedule


def _bidding_round(cost: Tensor, prices: Tensor, owner: Tensor, assigned: Tensor, eps: float) -> None:
    """One Jacobi round: all unassigned rows bid simultaneously; updates state in place.

    Args:
        cost: (n, n) reduced cost.
        prices: (n,) column prices.
        owner: (n,) row owning each column, -1 if none.
        assigned: (n,) column held by each row, -1 if none.
        eps: bid increment floor.
    """
    n = cost.shape[0]
    bidders = (assigned < 0).nonzero().squeeze(1)
    values = cost[bidders] + prices
    best2 = values.topk(2, dim=1, largest=False)
    w1, w2 = best2.values[:, 0], best2.values[:, 1]
    target = best2.indices[:, 0]
    increment = w2 - w1 + eps
    top = torch.full((n,), -math.inf, dtype=prices.dtype, device=prices.device)
    top.scatter_reduce_(0, target, increment, reduce="amax")
    is_top = increment == top[target]
    # among equal top bids for the same column, the lowest row index wins
    candidate = torch.where(is_top, bidders, torch.full_like(bidders, n))
    winner = torch.full((n,), n, dtype=bidders.dtype, device=bidders.device)
    winner.scatter_reduce_(0, target, candidate, reduce="amin")
    won = winner < n
    cols = won.nonzero().squeeze(1)
    rows = winner[cols]
    prices[cols] += top[cols]
    evicted = owner[cols]
    assigned[evicted[evicted >= 0]] = -1
    owner[cols] = rows
    assigned[rows] = cols


def _bidding_chain(cost: Tensor, prices: Tensor, owner: Tensor, assigned: Tensor, eps: float, row: int) -> int:
    """Rounds with a single free row, run as one eviction chain; returns the number of bids made.

    With one bidder a Jacobi round is a plain sequential bid: the bidder takes its best column and the evicted
    owner (if any) becomes the next and only bidder. Following the chain with scalar indexing avoids the
    per-round scatter and nonzero overhead of :func:`_bidding_round`.
    """
    bids = 0
    while row >= 0:
        best2 = (cost[row] + prices).topk(2, largest=False)
        col = int(best2.indices[0])
        prices[col] += best2.values[1] - best2.values[0] + eps
        evicted = int(owner[col])
        owner[col] = row
        assigned[row] = col
        if evicted >= 0:
            assigned[evicted] = -1
        row = evicted
        bids += 1
    return bids


def _release_violators(cost: Tensor, prices: Tensor, owner: Tensor, assigned: Tensor, eps: float) -> None:
    """Unassign the rows whose current column is not within eps of their best value (eps-CS for a new eps)."""
    held = (assigned >= 0).nonzero().squeeze(1)
    if held.numel() == 0:
        return
    cols = assigned[held]
    values = cost[held] + prices
    slack = values.gather(1, cols[:, None]).squeeze(1) - values.min(1).values
    bad = slack > eps
    owner[cols[bad]] = -1
    assigned[held[bad]] = -1


def auction_phases(
    cost: Tensor, eps: float, eps_start: float, scaling: float, prices: Tensor | None, max_rounds: int
) -> AuctionResult:
    """The epsilon-scaling loop on an already normalised cost (no unit conversion).

    Args:
        cost: (n, n) cost, n >= 2, in the arithmetic dtype; any row constants are harmless.
        eps: final epsilon; eps_start: first epsilon; scaling: ratio between phases (all in the cost's units).
        prices: (n,) warm-start prices or None for zeros.
        max_rounds: cap on the total number of rounds.

    Returns:
        :class:`AuctionResult` in the cost's units.
    """
    n, device = cost.shape[0], cost.device
    p = torch.zeros(n, dtype=cost.dtype, device=device) if prices is None else prices.to(device, cost.dtype).clone()
    owner = torch.full((n,), -1, dtype=torch.long, device=device)
    assigned = torch.full((n,), -1, dtype=torch.long, device=device)
    rounds = 0
    for phase_eps in _eps_schedule(eps_start, eps, scaling):
        _release_violators(cost, p, owner, assigned, phase_eps)
        while True:
            free = (assigned < 0).nonzero()
            if free.numel() == 0:
                break
            if rounds >= max_rounds:
                raise RuntimeError(f"auction did not finish within max_rounds={max_rounds}; increase it or eps")
            if free.numel() == 1:
                rounds += _bidding_chain(cost, p, owner, assigned, phase_eps, int(free))
            else:
                _bidding_round(cost, p, owner, assigned, phase_eps)
                rounds += 1
    return AuctionResult(assigned, p, eps, rounds)


def auction_assignment(
    cost: Tensor,
    eps: float | None = None,
    eps_start: float | None = None,
    scaling: float = 0.2,
    prices: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    max_rounds: int = 1_000_000,
) -> AuctionResult:
    """Epsilon-scaling auction for the square assignment problem.

    Args:
        cost: (n, n) finite cost matrix on any device (``ValueError`` otherwise). Any magnitude up to the float range
            works (the spread is computed overflow-free); :func:`~lightning_dpmot.ot.assignment.solve_assignment`
            also rescales costs at the extremes of the range by a power of two first.
        eps: final epsilon in cost units; default ``1e-3 * cost_scale(cost)``. The total cost is within
            ``n * eps`` of the optimum.
        eps_start: first epsilon in cost units; default ``cost_scale(cost)`` (or ``eps`` when warm ``prices``
            are given, which then only need the final phase).
        scaling: factor between consecutive epsilons, in (0, 1).
        prices: optional (n,) warm-start column prices in cost units (e.g. minus Sinkhorn's column potentials,
            or the prices of an earlier run); any values are valid, good ones save rounds.
        dtype: arithmetic dtype (float64 by default, float32 is faster on some GPUs).
        max_rounds: safety cap on the total number of rounds; exceeding it raises ``RuntimeError``.

    Raises:
        ValueError: a non-finite or non-square cost, or a NaN, infinite or out-of-range setting (named).

    Returns:
        :class:`AuctionResult` with the permutation (on the cost's device), prices, final eps and round count.
    """
    checks.check_cost_matrix(cost)
    checks.in_open_unit_interval("scaling", scaling)
    if eps is not None:
        checks.positive("eps", eps)
    if eps_start is not None:
        checks.positive("eps_start", eps_start)
    checks.integer("max_rounds", max_rounds, 1)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if prices is not None:
        if not isinstance(prices, Tensor) or prices.shape != cost.shape[:1]:
            shape = tuple(prices.shape) if isinstance(prices, Tensor) else type(prices).__name__
            raise ValueError(f"prices must be a ({cost.shape[0]},) tensor of column prices, got {shape}")
        checks.finite_tensor("prices", prices)
    n = cost.shape[0]
    device = cost.device
    if n <= 1:
        return AuctionResult(
            torch.zeros(n, dtype=torch.long, device=device),
            torch.zeros(n, dtype=dtype, device=device),
            0.0,
            0,
        )
    c = cost.to(dtype)
    c = c - c.min(1, keepdim=True).values
    if not bool(torch.isfinite(c).all()):
        raise ValueError(
            f"cost entries (max |C| = {float(cost.abs().max()):.3g}) overflow the arithmetic dtype {dtype}; use "
            "dtype=torch.float64 or solve_assignment(..., 'auction'), which rescales extreme costs"
        )
    scale = float(cost_scale(c))
    if not scale > 0.0:  # C_ij = a_i + b_j: every permutation is optimal
        return AuctionResult(torch.arange(n, device=device), torch.zeros(n, dtype=dtype, device=device), 0.0, 0)
    eps_final = DEFAULT_REL_EPS * scale if eps is None else float(eps)
    if eps_final / scale < _MIN_REL_EPS_ULPS * torch.finfo(dtype).eps:
        # bids of eps would vanish in the rounding of O(1) normalised prices: the auction would never finish
        raise ValueError(
            f"eps={eps_final:.3g} is below the resolution of {dtype} at the cost spread {scale:.3g} (relative "
            f"{eps_final / scale:.3g} < {_MIN_REL_EPS_ULPS} ulp); raise eps or use float64"
        )
    if eps_start is None:
        eps_start = eps_final if prices is not None else max(scale, eps_final)
    warm = None if prices is None else prices.to(device, dtype) / scale
    result = auction_phases(c / scale, eps_final / scale, eps_start / scale, scaling, warm, max_rounds)
    return AuctionResult(result.perm, result.prices * scale, eps_final, result.rounds)
