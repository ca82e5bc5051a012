from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lightning_dpmot.ot.costs import COSTS, cost_scale, inner_product_cost, pairwise_cost


def naive_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference squared distances through the explicit (n, m, d) difference, in float64."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    return (x[:, None, :] - y[None, :, :]).square().sum(-1)


def lsa_total(cost: torch.Tensor, on: torch.Tensor | None = None) -> float:
    """Optimal permutation of ``on`` (default ``cost``), evaluated on ``cost``."""
    rows, cols = linear_sum_assignment((cost if on is None else on).double().numpy())
    return float(cost.double()[rows, cols].sum())


@pytest.fixture
def batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(9, 3, 4, 4, generator=g) * 2 - 1, torch.randn(7, 3, 4, 4, generator=g)


def test_costs_constant() -> None:
    assert COSTS == ("l2", "sqeuclidean")


@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
def test_matches_naive_reference(batches, cost: str) -> None:
    x, y = batches
    ref = naive_sq(x, y)
    ref = ref.sqrt() if cost == "l2" else ref
    out32 = pairwise_cost(x, y, cost)
    out64 = pairwise_cost(x, y, cost, dtype=torch.float64)
    assert out32.shape == (9, 7) and out32.dtype == torch.float32
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out64, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_chunked_equals_unchunked(batches, chunk: int) -> None:
    x, y = batches
    for dtype, tol in [(torch.float32, 1e-5), (torch.float64, 1e-12)]:
        full = pairwise_cost(x, y, "l2", dtype=dtype)
        torch.testing.assert_close(pairwise_cost(x, y, "l2", chunk_size=chunk, dtype=dtype), full, rtol=tol, atol=tol)


def test_l2_squared_is_sqeuclidean(batches) -> None:
    x, y = batches
    l2 = pairwise_cost(x, y, "l2", dtype=torch.float64)
    torch.testing.assert_close(l2.square(), pairwise_cost(x, y, "sqeuclidean", dtype=torch.float64))
    assert bool((l2 >= 0).all())


def test_self_distance_is_zero_not_nan() -> None:
    x = torch.randn(5, 3072, generator=torch.Generator().manual_seed(5))
    d = pairwise_cost(x, x, "l2")
    assert torch.isfinite(d).all()
    # sqrt of the clamped fp32 cancellation error, tiny against the typical distance sqrt(2 * 3072) ~ 78
    assert float(d.diagonal().abs().max()) < 0.1
    assert float(pairwise_cost(x, x, "l2", dtype=torch.float64).diagonal().abs().max()) < 1e-6


def test_translation_invariant_far_from_origin() -> None:
    """Common-mean centring keeps fp32 accurate for data far from 0 (the naive expansion loses all digits)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 64, generator=g), torch.rand(12, 64, generator=g)
    ref = naive_sq(x, y)
    shifted = pairwise_cost(x + 1000.0, y + 1000.0, "sqeuclidean")
    torch.testing.assert_close(shifted.double(), ref, rtol=1e-4, atol=1e-4)


def test_empty_batches() -> None:
    assert pairwise_cost(torch.zeros(0, 3), torch.zeros(4, 3)).shape == (0, 4)
    assert pairwise_cost(torch.zeros(2, 3), torch.zeros(0, 3), "sqeuclidean").shape == (2, 0)


def test_dims_differ_error() -> None:
    with pytest.raises(ValueError, match=r"same per-sample shape, got \(3, 4, 4\) and \(3, 8, 2\)"):
        pairwise_cost(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 8, 2))
    with pytest.raises(ValueError, match="same per-sample shape"):
        pairwise_cost(torch.zeros(2, 5), torch.zeros(2, 6))


def test_unknown_cost_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown cost 'cosine'; valid costs are 'l2', 'sqeuclidean'"):
        pairwise_cost(torch.zeros(2, 3), torch.zeros(2, 3), "cosine")  # type: ignore[arg-type]


def test_bad_dtype_and_chunk() -> None:
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        pairwise_cost(torch.zeros(2, 3), torch.zeros(2, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        pairwise_cost(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=0)


def test_row_column_constants_do_not_change_optimum() -> None:
    g = torch.Generator().manual_seed(2)
    cost = torch.rand(30, 30, generator=g, dtype=torch.float64)
    a, b = (
        torch.randn(30, generator=g, dtype=torch.float64) * 100,
        torch.randn(30, generator=g, dtype=torch.float64),
    )
    shifted = cost + a[:, None] + b[None, :]
    # optimum of the shifted problem, evaluated on the original cost, is the original optimum
    assert lsa_total(cost, on=shifted) == pytest.approx(lsa_total(cost), rel=1e-12)
    assert lsa_total(shifted) == pytest.approx(lsa_total(cost) + float(a.sum() + b.sum()), rel=1e-12)


def test_inner_product_form_valid_for_sqeuclidean_only() -> None:
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(48, 8, generator=g, dtype=torch.float64),
        torch.randn(48, 8, generator=g, dtype=torch.float64),
    )
    sq = pairwise_cost(x, y, "sqeuclidean", dtype=torch.float64)
    inner = inner_product_cost(x, y, dtype=torch.float64)
    torch.testing.assert_close(sq - inner, (x.square().sum(1)[:, None] + y.square().sum(1)[None, :]))
    assert lsa_total(sq, on=inner) == pytest.approx(lsa_total(sq), rel=1e-12)
    # for l2 the same shortcut picks a strictly worse assignment
    l2 = pairwise_cost(x, y, "l2", dtype=torch.float64)
    assert lsa_total(l2, on=inner) > lsa_total(l2) + 1e-6


def test_cost_scale_invariances() -> None:
    g = torch.Generator().manual_seed(4)
    cost = torch.rand(20, 20, generator=g, dtype=torch.float64)
    a, b = (
        torch.randn(20, 1, generator=g, dtype=torch.float64),
        torch.randn(1, 20, generator=g, dtype=torch.float64),
    )
    s = float(cost_scale(cost))
    assert s > 0
    assert float(cost_scale(cost + a + b)) == pytest.approx(s, rel=1e-10)
    assert float(cost_scale(3.0 * cost)) == pytest.approx(3.0 * s, rel=1e-12)
    assert float(cost_scale(a + b)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
def test_gradient_matches_cdist(cost: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    y = torch.randn(4, 7, generator=g, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    pairwise_cost(ours, y, cost, chunk_size=2, dtype=torch.float64).sum().backward()
    dist = torch.cdist(ref, y)
    (dist if cost == "l2" else dist.square()).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad)
