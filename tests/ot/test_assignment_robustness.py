"""Assignment solvers at the extremes of the float range, and one clear error for bad costs and bad settings.

Regressions (issue 9, item 10): ``auction`` hung on 1e200-scale costs (``cost_scale`` squared them to inf);
``sinkhorn`` returned 1.3-2.2x the optimum on 1e300- and 1e-300-scale costs (spread inf or 0); scipy and lapjv lost
the optimum near +-1.7e308 (overflowing sums); a NaN ``reg`` looped forever in Sinkhorn's epsilon schedule.
The reference optimum is scipy's ``linear_sum_assignment`` on the unscaled matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from lightning_dpmot.ot.assignment import METHODS, assignment_cost, solve_assignment, solve_lapjv, solve_scipy
from lightning_dpmot.ot.auction import auction_assignment
from lightning_dpmot.ot.costs import cost_scale, normalise_magnitude
from lightning_dpmot.ot.sinkhorn import sinkhorn_assignment, sinkhorn_potentials

SCALES = [1e-300, 1e-200, 1e-100, 1e-20, 1.0, 1e20, 1e100, 1e154, 1e200, 1e300]
N = 7


def integer_cost(seed: int, n: int = N) -> Tensor:
    """Random integer costs 0..49 (float64): a bid increment below 1/n makes the auction exact."""
    return torch.randint(0, 50, (n, n), generator=torch.Generator().manual_seed(seed)).double()


def scipy_optimum(cost: Tensor) -> float:
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].sum())


def exact_options(method: str, scale: float, n: int = N) -> dict[str, Any]:
    """Options that make the approximate methods exact on integer costs (gap < n * eps < 1), in cost units."""
    if method == "auction":
        return {"eps": 0.5 / n * scale}
    if method == "sinkhorn":
        return {"round_eps": 0.5 / n * scale}
    return {}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_finds_the_optimum_at_any_scale(method: str, scale: float) -> None:
    for seed in range(3):
        base = integer_cost(seed)
        perm = solve_assignment(base * scale, method, **exact_options(method, scale))
        assert sorted(perm.tolist()) == list(range(N))
        assert float(assignment_cost(base, perm)) == scipy_optimum(base), (method, scale, seed)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", METHODS)
def test_default_settings_are_scale_invariant(method: str, scale: float) -> None:
    """With default (relative) settings every method returns the same permutation as on the unscaled matrix."""
    base = torch.rand(N, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(solve_assignment(base * scale, method), solve_assignment(base, method))


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_solver_functions_called_directly_handle_extreme_scales(scale: float) -> None:
    base = integer_cost(4)
    optimum = scipy_optimum(base)
    assert float(assignment_cost(base, auction_assignment(base * scale, eps=0.5 / N * scale).perm)) == optimum
    assert float(assignment_cost(base, sinkhorn_assignment(base * scale, round_eps=0.5 / N * scale))) == optimum
    for fn in (solve_lapjv, solve_scipy):
        assert float(assignment_cost(base, fn(base * scale))) == optimum
    # the potentials are those of the unscaled problem, times the scale
    ref, scaled = sinkhorn_potentials(base), sinkhorn_potentials(base * scale)
    assert torch.allclose(scaled.f / scale, ref.f, rtol=1e-12, atol=1e-12)
    assert torch.allclose(scaled.g / scale, ref.g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_costs_spanning_the_whole_float64_range(method: str) -> None:
    """Entries of +-1.7e308: row reductions and dual sums would overflow without the power-of-two rescaling."""
    signed = integer_cost(5) - 25.0
    huge = signed / 25.0 * 1.7e308
    perm = solve_assignment(huge, method, **exact_options(method, 1.7e308 / 25.0))
    assert float(assignment_cost(signed, perm)) == scipy_optimum(signed)


def test_float32_costs_at_the_edges_of_their_range() -> None:
    base = integer_cost(6)
    for scale in (1e-30, 1e30):
        cost = (base * scale).float()
        for method in METHODS:
            perm = solve_assignment(cost, method, **exact_options(method, scale))
            assert float(assignment_cost(base, perm)) == scipy_optimum(base), (method, scale)


def test_cost_scale_is_exactly_homogeneous_and_finite_at_extremes() -> None:
    base = torch.rand(9, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = float(cost_scale(base))
    for shift in (-1000, -900, -500, 500, 900, 1000):
        value = float(cost_scale(base * 2.0**shift))
        assert value == math.ldexp(ref, shift)  # exact: the spread was neither inf (overflow) nor 0 (underflow)


def test_normalise_magnitude_is_exact_and_leaves_ordinary_costs_alone() -> None:
    base = torch.rand(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    same, shift = normalise_magnitude(base * 1e50)
    assert shift == 0 and torch.equal(same, base * 1e50)
    for scale in (1e-300, 1e300, 1.7e308):
        scaled, shift = normalise_magnitude(base * scale)
        assert 0.5 <= float(scaled.abs().max()) < 1.0
        assert torch.equal(scaled, (base * scale) * 2.0 ** (shift // 2) * 2.0 ** (shift - shift // 2))
    subnormal, shift = normalise_magnitude(torch.tensor([[5e-324, 1e-323], [0.0, 2e-323]], dtype=torch.float64))
    assert shift > 1022 and torch.equal(subnormal * 8, torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------ bad costs

SOLVER_FUNCTIONS: dict[str, Callable[[Tensor], object]] = {
    "solve_assignment/exact": lambda c: solve_assignment(c, "exact"),
    "solve_assignment/scipy": lambda c: solve_assignment(c, "scipy"),
    "solve_assignment/sinkhorn": lambda c: solve_assignment(c, "sinkhorn"),
    "solve_assignment/auction": lambda c: solve_assignment(c, "auction"),
    "solve_lapjv": solve_lapjv,
    "solve_scipy": solve_scipy,
    "auction_assignment": auction_assignment,
    "sinkhorn_assignment": sinkhorn_assignment,
    "sinkhorn_potentials": sinkhorn_potentials,
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", list(SOLVER_FUNCTIONS))
def test_every_solver_function_rejects_non_finite_costs(name: str, bad: float) -> None:
    cost = torch.rand(4, 4, dtype=torch.float64)
    cost[1, 2] = bad
    with pytest.raises(ValueError, match=r"cost contains NaN or inf entries \(1 of 16\)"):
        SOLVER_FUNCTIONS[name](cost)


# --------------------------------------------------------------------------------------------- bad settings

NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("sinkhorn", {"reg": NAN}, "reg must be finite, got nan"),
    ("sinkhorn", {"reg": INF}, "reg must be finite, got inf"),
    ("sinkhorn", {"reg": -0.1}, "reg must be positive, got -0.1"),
    ("sinkhorn", {"reg": 0.0}, "reg must be positive, got 0.0"),
    ("sinkhorn", {"reg_start": NAN}, "reg_start must be finite"),
    ("sinkhorn", {"scaling": NAN}, "scaling must be finite"),
    ("sinkhorn", {"scaling": 1.0}, r"scaling must lie in \(0, 1\), got 1.0"),
    ("sinkhorn", {"tol": NAN}, "tol must be finite"),
    ("sinkhorn", {"tol": -1.0}, "tol must be positive"),
    ("sinkhorn", {"max_iter": 0}, "max_iter must be an integer >= 1, got 0"),
    ("sinkhorn", {"max_iter": 2.5}, "max_iter must be an integer >= 1, got 2.5"),
    ("sinkhorn", {"round_eps": NAN}, "round_eps must be finite"),
    ("sinkhorn", {"round_eps": -1.0}, "round_eps must be positive"),
    ("auction", {"eps": NAN}, "eps must be finite, got nan"),
    ("auction", {"eps": -1e-3}, "eps must be positive"),
    ("auction", {"eps": 1e-300}, "eps=1e-300 is below the resolution of torch.float64"),
    ("auction", {"eps_start": INF}, "eps_start must be finite, got inf"),
    ("auction", {"eps_start": NAN}, "eps_start must be finite"),
    ("auction", {"scaling": NAN}, "scaling must be finite"),
    ("auction", {"max_rounds": 0}, "max_rounds must be an integer >= 1, got 0"),
    ("auction", {"prices": torch.tensor([0.0, NAN, 0.0, 0.0])}, r"prices contains NaN or infinite values \(1 of 4"),
    ("auction", {"prices": torch.zeros(3)}, r"prices must be a \(4,\) tensor of column prices, got \(3,\)"),
    ("auction", {"dtype": torch.float16}, "dtype must be torch.float32 or torch.float64"),
]


@pytest.mark.parametrize(("method", "options", "message"), BAD_SETTINGS)
def test_bad_solver_settings_raise_a_value_error_naming_the_setting(
    method: str, options: dict[str, Any], message: str
) -> None:
    cost = torch.rand(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        solve_assignment(cost, method, **options)
    direct = sinkhorn_assignment if method == "sinkhorn" else auction_assignment
    with pytest.raises(ValueError, match=message):
        direct(cost, **options)


def test_auction_in_float32_refuses_costs_beyond_its_range() -> None:
    cost = integer_cost(0) * 1e300
    with pytest.raises(ValueError, match="overflow the arithmetic dtype torch.float32"):
        auction_assignment(cost, dtype=torch.float32)
    # solve_assignment rescales first, so float32 arithmetic is fine there
    perm = solve_assignment(cost, "auction", dtype=torch.float32)
    assert sorted(perm.tolist()) == list(range(N))
