from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from lightning_dpmot.ot.assignment import METHODS, assignment_cost, solve_assignment
from lightning_dpmot.ot.auction import auction_assignment
from lightning_dpmot.ot.costs import cost_scale, pairwise_cost
from lightning_dpmot.ot.sinkhorn import round_greedy, sinkhorn_assignment, sinkhorn_potentials

N = 24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_cost(kind: str, n: int = N, seed: int = 0) -> torch.Tensor:
    """Float64 test matrices: random, tied integers, duplicated rows/columns, constant, 1e12-scale, < 0."""
    g = _gen(seed)
    if kind == "random":
        return torch.rand(n, n, generator=g, dtype=torch.float64)
    if kind == "ties":
        return torch.randint(0, 3, (n, n), generator=g).double()
    if kind == "duplicated":
        block = torch.rand(n // 4, n // 3, generator=g, dtype=torch.float64)
        return block.repeat(4, 3)
    if kind == "constant":
        return torch.full((n, n), 7.5, dtype=torch.float64)
    if kind == "huge":
        return torch.rand(n, n, generator=g, dtype=torch.float64) * 1e12
    if kind == "huge_offset":  # 1e12 + small integers: differences far below lapjv's internal 1e6 "infinity"
        return 1e12 + torch.randint(0, 50, (n, n), generator=g).double()
    if kind == "negative":
        return -1e3 * torch.rand(n, n, generator=g, dtype=torch.float64)
    raise AssertionError(kind)


KINDS = ["random", "ties", "duplicated", "constant", "huge", "huge_offset", "negative"]


def scipy_optimum(cost: torch.Tensor) -> float:
    rows, cols = linear_sum_assignment(cost.double().numpy())
    return float(cost.double()[rows, cols].sum())


def random_pairing_mean(cost: torch.Tensor) -> float:
    """Expected total cost of a uniformly random permutation: sum(C) / n."""
    return float(cost.double().sum() / cost.shape[0])


def assert_permutation(perm: torch.Tensor, n: int) -> None:
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert sorted(perm.tolist()) == list(range(n))


def structured_problem(n: int, seed: int) -> torch.Tensor:
    """Benchmark-like problem: smooth fake images in [-1, 1] vs Gaussian noise, d = 3072, Euclidean cost."""
    g = _gen(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    images = torch.tanh(1.2 * F.interpolate(low, size=32, mode="bilinear", align_corners=False))
    images = (images + 0.1 * torch.randn(n, 3, 32, 32, generator=g)).clamp(-1, 1)
    return pairwise_cost(images, torch.randn(n, 3, 32, 32, generator=g), "l2", dtype=torch.float64)


# --------------------------------------------------------------------------------------------- exact methods
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["exact", "scipy"])
def test_exact_methods_reach_scipy_optimum(kind: str, method: str) -> None:
    for seed in range(3):
        cost = make_cost(kind, seed=seed)
        perm = solve_assignment(cost, method)
        assert_permutation(perm, N)
        opt = scipy_optimum(cost)
        assert float(assignment_cost(cost, perm)) == pytest.approx(opt, rel=1e-12, abs=1e-9)


def test_exact_robust_to_1e12_scale_costs() -> None:
    """Raw ``lap.lapjv`` returns a sub-optimal permutation for 4 of these 20 matrices (its internal
    "infinity" is 1e6); the row reduction plus power-of-two scaling of ``"exact"`` must solve all of them."""
    for seed in range(20):
        cost = make_cost("huge", seed=seed)
        assert float(assignment_cost(cost, solve_assignment(cost))) == pytest.approx(scipy_optimum(cost), rel=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_cost_accepted(method: str) -> None:
    cost = make_cost("ties", n=16, seed=9).to(torch.bfloat16)
    perm = solve_assignment(cost, method)
    assert_permutation(perm, 16)
    if method in ("exact", "scipy"):
        assert float(assignment_cost(cost.double(), perm)) == scipy_optimum(cost.double())


def test_exact_float32_and_integer_inputs() -> None:
    cost64 = make_cost("random", n=50, seed=7)
    opt = scipy_optimum(cost64.float().double())
    assert float(assignment_cost(cost64.float().double(), solve_assignment(cost64.float()))) == pytest.approx(opt)
    ints = torch.randint(0, 1000, (40, 40), generator=_gen(8))
    perm = solve_assignment(ints)
    assert int(assignment_cost(ints, perm)) == round(scipy_optimum(ints.double()))


@pytest.mark.parametrize("kind", ["random", "ties", "huge"])
def test_exact_warm_start_keeps_optimum(kind: str) -> None:
    cost = make_cost(kind, n=40, seed=1)
    perm = solve_assignment(cost, "exact", warm_start=True)
    assert_permutation(perm, 40)
    assert float(assignment_cost(cost, perm)) == pytest.approx(scipy_optimum(cost), rel=1e-12, abs=1e-9)


def test_exact_on_structured_problem_matches_scipy() -> None:
    cost = structured_problem(96, seed=0)
    assert float(assignment_cost(cost, solve_assignment(cost))) == pytest.approx(scipy_optimum(cost), rel=1e-13)


# --------------------------------------------------------------------------------------------------- auction
@pytest.mark.parametrize("kind", KINDS)
def test_auction_within_gap_bound(kind: str) -> None:
    for seed in range(2):
        cost = make_cost(kind, seed=seed)
        result = auction_assignment(cost)
        assert_permutation(result.perm, N)
        gap = float(assignment_cost(cost, result.perm)) - scipy_optimum(cost)
        slack = 1e-9 * max(1.0, float(cost.abs().max()))
        assert -slack <= gap <= N * result.eps + slack
        assert_permutation(solve_assignment(cost, "auction"), N)


@pytest.mark.parametrize("kind", ["ties", "duplicated", "huge_offset"])
def test_auction_exact_for_integer_costs_with_small_eps(kind: str) -> None:
    cost = make_cost(kind, seed=3)
    if kind == "duplicated":
        cost = (cost * 100).round()
    perm = solve_assignment(cost, "auction", eps=0.99 / N)  # n * eps < 1: integer optimum exactly
    assert float(assignment_cost(cost, perm)) == scipy_optimum(cost)


def test_auction_warm_prices_need_fewer_rounds() -> None:
    cost = structured_problem(64, seed=1)
    cold = auction_assignment(cost)
    warm = auction_assignment(cost, prices=cold.prices)
    assert warm.rounds < cold.rounds
    assert float(assignment_cost(cost, warm.perm)) <= scipy_optimum(cost) + 64 * warm.eps + 1e-9


def test_auction_max_rounds_error() -> None:
    with pytest.raises(RuntimeError, match="auction did not finish within max_rounds=1"):
        auction_assignment(make_cost("random", n=30), max_rounds=1)


# -------------------------------------------------------------------------------------------------- sinkhorn
@pytest.mark.parametrize("kind", KINDS)
def test_sinkhorn_valid_and_within_rounding_bound(kind: str) -> None:
    for seed in range(2):
        cost = make_cost(kind, seed=seed)
        perm = solve_assignment(cost, "sinkhorn")
        assert_permutation(perm, N)
        total, opt = float(assignment_cost(cost, perm)), scipy_optimum(cost)
        # auction rounding with the entropic eps = 0.05 * cost_scale: gap <= n * eps
        bound = N * 0.05 * float(cost_scale(cost)) + 1e-9 * max(1.0, float(cost.abs().max()))
        assert opt - 1e-6 * abs(opt) <= total <= opt + bound
        assert total <= random_pairing_mean(cost) + 1e-9 * max(1.0, abs(opt))


@pytest.mark.parametrize("rounding", ["auction", "greedy"])
def test_sinkhorn_beats_random_pairing_on_average(rounding: str) -> None:
    captured = []
    for seed in range(5):
        cost = make_cost("random", n=32, seed=seed)
        perm = sinkhorn_assignment(cost, rounding=rounding)
        assert_permutation(perm, 32)
        rand, opt = random_pairing_mean(cost), scipy_optimum(cost)
        captured.append((rand - float(assignment_cost(cost, perm))) / (rand - opt))
    # share of the exact reduction over random pairing: auction rounding ~1, greedy a bit lower
    assert float(np.mean(captured)) > (0.97 if rounding == "auction" else 0.8)
    assert min(captured) > 0


def test_sinkhorn_captures_90_percent_on_structured_problem() -> None:
    cost = structured_problem(128, seed=2)
    rand, opt = random_pairing_mean(cost), scipy_optimum(cost)
    for rounding in ("auction", "greedy"):
        total = float(assignment_cost(cost, solve_assignment(cost, "sinkhorn", rounding=rounding)))
        assert (rand - total) / (rand - opt) >= 0.9


def test_sinkhorn_potentials_give_doubly_stochastic_plan() -> None:
    cost = make_cost("random", n=40, seed=4) * 10 + 3
    res = sinkhorn_potentials(cost, reg=0.2, tol=1e-6, max_iter=1000)
    plan = torch.exp((res.f[:, None] + res.g[None, :] - cost) / res.eps)
    torch.testing.assert_close(plan.sum(0), torch.ones(40, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.ones(40, dtype=torch.float64), atol=1e-5, rtol=0)
    assert res.marginal_error < 1e-5
    assert res.eps == pytest.approx(0.2 * float(cost_scale(cost)))


def test_sinkhorn_invariant_to_row_and_column_constants() -> None:
    cost = structured_problem(48, seed=3)
    g = _gen(5)
    shifted = (
        cost
        + 50 * torch.rand(48, 1, generator=g, dtype=torch.float64)
        + torch.rand(1, 48, generator=g, dtype=torch.float64)
    )
    assert torch.equal(
        solve_assignment(cost, "sinkhorn", rounding="greedy"),
        solve_assignment(shifted, "sinkhorn", rounding="greedy"),
    )


def test_round_greedy_recovers_a_permutation_matrix() -> None:
    perm = torch.randperm(30, generator=_gen(6))
    plan = torch.eye(30)[perm] + 0.01 * torch.rand(30, 30, generator=_gen(7))
    assert torch.equal(round_greedy(plan), perm)


def test_sinkhorn_bad_rounding() -> None:
    with pytest.raises(ValueError, match="unknown rounding 'nearest'; valid roundings are 'auction', 'greedy'"):
        solve_assignment(make_cost("random"), "sinkhorn", rounding="nearest")


# ------------------------------------------------------------------------------------------------ interface
@pytest.mark.parametrize("method", METHODS)
def test_trivial_sizes(method: str) -> None:
    empty = solve_assignment(torch.zeros(0, 0), method)
    assert empty.dtype == torch.long and empty.shape == (0,)
    assert solve_assignment(torch.tensor([[3.0]]), method).tolist() == [0]


@pytest.mark.parametrize("method", METHODS)
def test_output_is_int64_on_cost_device_and_ignores_grad(method: str) -> None:
    cost = make_cost("random", n=10).float().requires_grad_()
    perm = solve_assignment(cost, method)
    assert perm.dtype == torch.long and perm.device == cost.device and not perm.requires_grad


def test_unknown_method_lists_methods() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown assignment method 'hungarian'; valid methods are 'exact', 'scipy', 'sinkhorn', "
        r"'auction'",
    ):
        solve_assignment(make_cost("random"), "hungarian")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("method", METHODS)
def test_non_finite_cost_rejected(bad: float, method: str) -> None:
    cost = make_cost("random")
    cost[3, 5] = bad
    with pytest.raises(ValueError, match=r"cost contains NaN or inf entries \(1 of 576\)"):
        solve_assignment(cost, method)


def test_shape_errors() -> None:
    with pytest.raises(
        ValueError, match=r"cost must be square \(n, n\) for a one-to-one assignment, got shape \(3, 4\)"
    ):
        solve_assignment(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"cost must be a 2-D \(n, n\) matrix, got shape \(4,\)"):
        solve_assignment(torch.zeros(4))
    with pytest.raises(ValueError, match="cost must be a torch.Tensor, got ndarray"):
        solve_assignment(np.zeros((3, 3)))  # type: ignore[arg-type]


def test_unknown_option_rejected() -> None:
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['reg'\] for method 'exact'; valid options: warm_start"
    ):
        solve_assignment(make_cost("random"), "exact", reg=0.1)
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['warm_start'\] for method 'scipy'; valid options: none"
    ):
        solve_assignment(make_cost("random"), "scipy", warm_start=True)


def test_assignment_cost_value_and_gradient() -> None:
    cost = make_cost("random", n=6).requires_grad_()
    perm = torch.tensor([2, 0, 1, 5, 3, 4])
    total = assignment_cost(cost, perm)
    expected = sum(float(cost.detach()[i, j]) for i, j in enumerate(perm.tolist()))
    assert float(total.detach()) == pytest.approx(expected)
    total.backward()
    assert torch.equal(cost.grad, torch.eye(6, dtype=torch.float64)[perm])
    with pytest.raises(ValueError, match=r"perm must have shape \(6,\), got \(5,\)"):
        assignment_cost(cost, perm[:5])
