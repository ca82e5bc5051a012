"""Minibatch OT coupling of data and noise (AOT, Kim et al. 2024; Immiscible Diffusion, Li et al. 2024).

Given a batch of data x_i and i.i.d. unit Gaussian noises n_j, the coupling re-pairs them by the assignment that
minimises sum_i c(x_i, n_perm(i)). A permutation of i.i.d. noise is still i.i.d. N(0, I): the noise marginal is
unchanged, only the joint (data, noise) becomes closer to an OT coupling. Everything here is single-process math;
:class:`~lightning_dpmot.callbacks.OTCouplingCallback` gathers the global batch over GPUs and calls it on rank 0.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_dpmot.ot.assignment import solve_assignment


class CouplingStats(NamedTuple):
    """Mean pair cost of the independent pairing (identity) and of the assignment, and the relative reduction."""

    cost_before: float
    cost_after: float
    reduction: float


def coupling_permutation(
    cost: Tensor,
    method: str = "exact",
    labels: Tensor | None = None,
    valid: Tensor | None = None,
    **options: Any,
) -> Tensor:
    """The assignment of noise columns to data rows, optionally within classes and among valid entries only.

    Args:
        cost: (n, n) cost between data i (rows) and noise j (columns).
        method: solver name (see :func:`~lightning_dpmot.ot.assignment.solve_assignment`).
        labels: (n,) class labels; if given, data of class c is paired only with the noises at the positions of
            class c (AOT's conditional model: a class never borrows another class's noise).
        valid: (n,) bool; invalid (padding) rows and columns keep the identity pairing and are never used.
    Returns:
        perm: (n,) int64, a permutation: data i takes noise perm[i]; perm[i] = i for invalid i.
    """
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"the coupling cost must be square (n, n), got {tuple(cost.shape)}")
    perm = torch.arange(n, device=cost.device)
    groups = torch.zeros(n, dtype=torch.long, device=cost.device) if labels is None else labels.to(cost.device)
    keep = torch.ones(n, dtype=torch.bool, device=cost.device) if valid is None else valid.to(cost.device)
    for group in torch.unique(groups[keep]):
        idx = torch.nonzero(keep & (groups == group)).flatten()
        if len(idx) > 1:
            sub = solve_assignment(cost[idx][:, idx], method, **options)
            perm[idx] = idx[sub]
    return perm


def coupling_stats(cost: Tensor, perm: Tensor, valid: Tensor | None = None) -> CouplingStats:
    """Mean cost of the identity pairing vs. the permutation (over valid rows)."""
    rows = torch.arange(cost.shape[0], device=cost.device)
    keep = rows if valid is None else rows[valid.to(cost.device)]
    before = float(cost[keep, keep].double().mean())
    after = float(cost[keep, perm.to(cost.device)[keep]].double().mean())
    return CouplingStats(before, after, (before - after) / before if before > 0 else 0.0)
