"""Entropic OT (Sinkhorn) between two uniform batches, rounded to a permutation.

Problem. For a square cost ``C`` (n, n) and ``eps > 0`` the entropic plan is
``P_ij = exp((f_i + g_j - C_ij) / eps)`` with potentials ``f, g`` chosen so that every row and column of ``P``
sums to 1 (the doubly stochastic scaling of the uniform-marginal problem). As ``eps -> 0`` the plan tends to
an optimal assignment and ``-g`` to optimal column prices.

Algorithm (stabilised Sinkhorn with epsilon-scaling and absorption, Schmitzer 2019):

1. Normalise: ``c = (C - row minima - column minima) / s`` with ``s = cost_scale(C)``. Row and column
   constants change neither the plan nor the assignment, and ``eps = reg * s`` makes ``reg`` relative to the
   spread of the costs, so the same ``reg`` works for Euclidean or squared costs, 3 or 3072 dimensions.
2. For ``eps`` decreasing geometrically from ``reg_start`` to ``reg``: absorb the current potentials into the
   kernel ``K = exp((f + g - c) / eps)`` (entries near the plan are O(1), so no overflow), then alternate the
   matrix-vector scalings ``u = 1 / (K v)``, ``v = 1 / (K^T u)`` until the row sums are within ``tol`` of 1;
   fold ``eps log u``, ``eps log v`` back into ``f, g``. Each iteration is two GEMVs on the cost's device.
3. Round to a true permutation (``rounding``):

   * ``"auction"`` (default): one auction phase (:mod:`lightning_dpmot.ot.auction`) with bid increment
     ``round_eps`` started from the prices ``-g``. The result obeys the auction bound
     ``total <= OPT + n * round_eps`` whatever the Sinkhorn accuracy; good prices only make it fast.
   * ``"greedy"``: repeated mutual-argmax matching on the log-plan: every free row whose best free column
     prefers it back is matched, then the matched rows and columns are removed. No optimality bound.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from lightning_dpmot.ot import checks
from lightning_dpmot.ot.auction import auction_phases
from lightning_dpmot.ot.costs import cost_scale

Rounding = Literal["auction", "greedy"]

#: Default entropic regularisation relative to :func:`~lightning_dpmot.ot.costs.cost_scale`.
DEFAULT_REG = 0.05

#: Safety cap on the rounding auction's bidding rounds.
_MAX_ROUNDING_ROUNDS = 1_000_000

#: Kernel entries below exp(-_LOG_CUTOFF) are dropped; scalings beyond exp(+-_LOG_CUTOFF / 2) are absorbed.
_LOG_CUTOFF = 40.0


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn_potentials` (all in the units of the input cost).

    Attributes:
        f: (n,) row potentials.
        g: (n,) column potentials; the plan is ``exp((f_i + g_j - C_ij) / eps)``.
        eps: the final regularisation ``reg * cost_scale(C)``.
        iterations: total number of Sinkhorn iterations over all stages.
        marginal_error: max |row sum - 1| of the final plan (columns sum to 1 exactly).
    """

    f: Tensor
    g: Tensor
    eps: float
    iterations: int
    marginal_error: float


def _reduce(cost: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Subtract row then column minima: returns (reduced cost, row minima (n,), column minima (n,))."""
    rows = cost.min(1).values
    reduced = cost - rearrange(rows, "n -> n 1")
    cols = reduced.min(0).values
    return reduced - cols, rows, cols


def _absorbed_kernel(c: Tensor, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """Kernel ``exp((f_i + g_j - c_ij) / eps)`` (n, n) with entries below ``exp(-_LOG_CUTOFF)`` set to 0.

    Truncating negligible entries keeps denormal floats (slow on CPUs) out of the matrix-vector products.
    """
    x = (rearrange(f, "n -> n 1") + g - c) / eps
    return x.masked_fill_(x < -_LOG_CUTOFF, -math.inf).exp_()


def _scale_stage(
    c: Tensor, f: Tensor, g: Tensor, eps: float, max_iter: int, tol: float, check_every: int
) -> tuple[Tensor, Tensor, int, float]:
    """Sinkhorn scalings at one eps on the absorbed kernel; returns updated (f, g, iterations, row error).

    The scalings ``u, v`` are folded into ``f, g`` (and the kernel rebuilt) whenever one of them leaves
    ``[exp(-_LOG_CUTOFF / 2), exp(_LOG_CUTOFF / 2)]``, so products never under- or overflow.
    """
    kernel = _absorbed_kernel(c, f, g, eps)
    u, v = torch.ones_like(f), torch.ones_like(g)
    error, it = math.inf, 0
    while it < max_iter:
        u = 1.0 / (kernel @ v)
        v = 1.0 / (kernel.T @ u)
        it += 1
        if it % check_every and it < max_iter:
            continue
        error = float((u * (kernel @ v) - 1.0).abs().max())
        if error < tol:
            break
        if float(torch.maximum(u.log().abs().max(), v.log().abs().max())) > _LOG_CUTOFF / 2:
            f, g = f + eps * torch.log(u), g + eps * torch.log(v)
            kernel = _absorbed_kernel(c, f, g, eps)
            u, v = torch.ones_like(f), torch.ones_like(g)
    return f + eps * torch.log(u), g + eps * torch.log(v), it, error


def _check_settings(
    cost: Tensor, reg: float, reg_start: float, scaling: float, max_iter: int, tol: float, dtype: torch.dtype | None
) -> None:
    """``ValueError`` naming the first invalid input (a NaN ``reg`` used to loop forever in the eps schedule)."""
    checks.check_cost_matrix(cost)
    checks.positive("reg", reg)
    checks.positive("reg_start", reg_start)
    checks.in_open_unit_interval("scaling", scaling)
    checks.integer("max_iter", max_iter, 1)
    checks.positive("tol", tol)
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype}")


def _normalise(cost: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """Step 1 in float64: returns (reduced / s, row minima, column minima, s); s = 0 for ``a_i + b_j``."""
    reduced, rows, cols = _reduce(cost.to(torch.float64))
    scale = float(cost_scale(reduced))
    return (reduced / scale if scale > 0.0 else reduced), rows, cols, scale


def _sinkhorn_normalised(
    c: Tensor, reg: float, reg_start: float, scaling: float, max_iter: int, tol: float
) -> tuple[Tensor, Tensor, int, float]:
    """Step 2 on a normalised cost: returns (f, g, total iterations, final row error) in the units of c."""
    f = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
    g = torch.zeros_like(f)
    total, error = 0, math.inf
    eps = max(reg_start, reg)
    while True:
        f, g, it, error = _scale_stage(c, f, g, eps, max_iter, tol, check_every=5)
        total += it
        if not bool(torch.isfinite(f).all() and torch.isfinite(g).all()):
            raise RuntimeError(f"Sinkhorn produced non-finite potentials at relative eps={eps:g}; increase reg")
        if eps <= reg:
            return f, g, total, error
        eps = max(eps * scaling, reg)


def sinkhorn_potentials(
    cost: Tensor,
    reg: float = DEFAULT_REG,
    reg_start: float = 1.0,
    scaling: float = 0.3,
    max_iter: int = 200,
    tol: float = 5e-2,
    dtype: torch.dtype | None = None,
) -> SinkhornResult:
    """Entropic potentials with epsilon-scaling (module docstring, steps 1-2).

    Args:
        cost: (n, n) finite cost matrix on any device.
        reg: final regularisation relative to ``cost_scale(cost)``.
        reg_start: first regularisation of the schedule (relative); ignored if below ``reg``.
        scaling: factor between consecutive regularisations, in (0, 1).
        max_iter: iteration cap per stage.
        tol: stop a stage when every row sum of the plan is within ``tol`` of 1.
        dtype: arithmetic dtype of the iterations; default float32 (float64 if the cost is float64).

    Returns:
        :class:`SinkhornResult` with float64 potentials in cost units.

    Raises:
        ValueError: a non-finite or non-square cost, or a NaN, infinite or out-of-range setting (named).
    """
    _check_settings(cost, reg, reg_start, scaling, max_iter, tol, dtype)
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    c, rows, cols, scale = _normalise(cost)
    if scale == 0.0:  # C_ij = a_i + b_j: the uniform plan is optimal
        return SinkhornResult(rows, cols, 0.0, 0, 0.0)
    f, g, total, error = _sinkhorn_normalised(c.to(dtype), reg, reg_start, scaling, max_iter, tol)
    return SinkhornResult(
        f.to(torch.float64) * scale + rows, g.to(torch.float64) * scale + cols, reg * scale, total, error
    )


def round_greedy(log_plan: Tensor) -> Tensor:
    """Round a (log-)plan to a permutation by repeated mutual-argmax matching.

    Each pass matches every remaining row whose best remaining column prefers it back (ties to the lowest
    index), so at least the global maximum is matched and at most n passes are needed (a few in practice).

    Args:
        log_plan: (n, n) scores, larger = more mass (a plan or its logarithm).

    Returns:
        (n,) int64 permutation on the plan's device.
    """
    n = log_plan.shape[0]
    device = log_plan.device
    perm = torch.full((n,), -1, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)
    cols = torch.arange(n, device=device)
    while rows.numel() > 0:
        sub = log_plan[rows][:, cols]
        best_col = sub.argmax(1)
        best_row = sub.argmax(0)
        mutual = best_row[best_col] == torch.arange(rows.numel(), device=device)
        perm[rows[mutual]] = cols[best_col[mutual]]
        keep = torch.ones(cols.numel(), dtype=torch.bool, device=device)
        keep[best_col[mutual]] = False
        rows, cols = rows[~mutual], cols[keep]
    return perm


def sinkhorn_assignment(
    cost: Tensor,
    reg: float = DEFAULT_REG,
    rounding: Rounding = "auction",
    round_eps: float | None = None,
    reg_start: float = 1.0,
    scaling: float = 0.3,
    max_iter: int = 200,
    tol: float = 5e-2,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Sinkhorn potentials rounded to a permutation (module docstring, step 3).

    Args:
        cost: (n, n) finite cost matrix on any device.
        reg: final regularisation relative to ``cost_scale(cost)``.
        rounding: ``"auction"`` (gap at most ``n * round_eps``) or ``"greedy"`` (no bound).
        round_eps: auction bid increment in cost units; default the entropic ``eps = reg * cost_scale(cost)``.
        reg_start: first regularisation of the schedule (relative).
        scaling: factor between consecutive regularisations, in (0, 1).
        max_iter: Sinkhorn iteration cap per stage.
        tol: Sinkhorn row-marginal tolerance per stage.
        dtype: arithmetic dtype of the iterations; default float32 (float64 if the cost is float64).

    Returns:
        (n,) int64 permutation on the cost's device.

    Raises:
        ValueError: a non-finite or non-square cost, or a NaN, infinite or out-of-range setting (named).
    """
    if rounding not in ("auction", "greedy"):
        raise ValueError(f"unknown rounding {rounding!r}; valid roundings are 'auction', 'greedy'")
    _check_settings(cost, reg, reg_start, scaling, max_iter, tol, dtype)
    if round_eps is not None:
        checks.positive("round_eps", round_eps)
    n = cost.shape[0]
    if n <= 1:
        return torch.zeros(n, dtype=torch.long, device=cost.device)
    dtype = dtype or (torch.float64 if cost.dtype == torch.float64 else torch.float32)
    c, _, _, scale = _normalise(cost)
    if scale == 0.0:  # every permutation is optimal
        return torch.arange(n, device=cost.device)
    f, g, _, _ = _sinkhorn_normalised(c.to(dtype), reg, reg_start, scaling, max_iter, tol)
    if rounding == "greedy":
        return round_greedy(rearrange(f, "n -> n 1") + g - c.to(dtype))
    eps = reg if round_eps is None else round_eps / scale
    return auction_phases(c, eps, eps, 0.5, -g, max_rounds=_MAX_ROUNDING_ROUNDS).perm
