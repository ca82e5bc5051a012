"""The exact assignment solver against POT, the independent exact-OT reference (a ``dev`` extra, never imported by
the package): ``ot.emd2`` gives the same optimum and ``ot.emd``'s plan is a permutation matrix of that cost."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dpmot.ot.assignment import assignment_cost, solve_assignment
from lightning_dpmot.ot.costs import pairwise_cost

ot = pytest.importorskip("ot", reason="POT is the exact-OT reference of the tests: pip install -e '.[dev]'")


def problems() -> list[tuple[str, torch.Tensor]]:
    """Random uniform costs, Euclidean and squared costs between point clouds, and tied integer costs (float64)."""
    out = []
    for seed, n in [(0, 2), (1, 5), (2, 17), (3, 64), (4, 128)]:
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)
        out.append((f"uniform-{n}", torch.rand(n, n, generator=gen, dtype=torch.float64)))
        out.append((f"l2-{n}", pairwise_cost(x, y, "l2", dtype=torch.float64)))
        out.append((f"sqeuclidean-{n}", pairwise_cost(x, y, "sqeuclidean", dtype=torch.float64)))
        out.append((f"ties-{n}", torch.randint(0, 3, (n, n), generator=gen).double()))
    return out


PROBLEMS = problems()


@pytest.mark.parametrize(("name", "cost"), PROBLEMS, ids=[name for name, _ in PROBLEMS])
def test_exact_optimum_equals_pot_emd2(name: str, cost: torch.Tensor) -> None:
    n = cost.shape[0]
    ones = np.ones(n)
    reference = float(ot.emd2(ones, ones, cost.numpy()))  # unit masses: the plan's total cost is the assignment's
    total = float(assignment_cost(cost, solve_assignment(cost, "exact")))
    assert total == pytest.approx(reference, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("name", "cost"), PROBLEMS, ids=[name for name, _ in PROBLEMS])
def test_pot_emd_plan_is_a_permutation_matrix_of_the_same_cost(name: str, cost: torch.Tensor) -> None:
    n = cost.shape[0]
    plan = ot.emd(np.ones(n), np.ones(n), cost.numpy())
    assert np.isin(plan, (0.0, 1.0)).all()  # a vertex of the Birkhoff polytope
    assert (plan.sum(0) == 1).all() and (plan.sum(1) == 1).all()
    pot_perm = torch.from_numpy(plan.argmax(1))
    ours = solve_assignment(cost, "exact")
    assert float(assignment_cost(cost, pot_perm)) == pytest.approx(float(assignment_cost(cost, ours)), rel=1e-12)
