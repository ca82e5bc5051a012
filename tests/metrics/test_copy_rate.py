"""Chunked nearest neighbours and the copy rate: brute-force agreement, chunk invariance, known ratios."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.metrics.copy_rate import copy_rate, nearest_neighbors, self_nearest_distance


def _points(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbors_match_brute_force(k: int) -> None:
    q, r = _points(70, 12, 0), _points(90, 12, 1)
    dist, idx = nearest_neighbors(q, r, k=k, chunk_size=16)
    full = torch.cdist(q.double(), r.double())
    ref_dist, ref_idx = full.topk(k, dim=1, largest=False)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-6, atol=1e-6)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())


def test_chunked_equals_unchunked_exactly() -> None:
    q, r = _points(41, 30, 2), _points(67, 30, 3)
    whole = nearest_neighbors(q, r, k=3, chunk_size=10_000)
    for chunk in (1, 7, 64):
        dist, idx = nearest_neighbors(q, r, k=3, chunk_size=chunk)
        assert torch.equal(dist, whole[0]) and torch.equal(idx, whole[1])


def test_exclude_self_skips_the_point_itself_but_not_duplicates() -> None:
    x = _points(50, 5, 4)
    dist, idx = nearest_neighbors(x, x, k=2, chunk_size=8, exclude_self=True)
    assert not bool((idx == torch.arange(50).unsqueeze(1)).any())
    full = torch.cdist(x.double(), x.double()).fill_diagonal_(float("inf"))
    assert torch.equal(idx, full.topk(2, dim=1, largest=False).indices)
    # a duplicated point has self-NN distance 0 (to its twin, never to itself)
    dup = torch.cat([x, x[:1]])
    nn_dist = self_nearest_distance(dup, chunk_size=8)
    assert nn_dist[0] == 0 and nn_dist[50] == 0 and bool((nn_dist[1:50] > 0).all())
    without_self = nearest_neighbors(x, x, k=1, exclude_self=False)[0]
    assert bool((without_self == 0).all())


def test_exact_copies_have_rate_one_and_name_the_source() -> None:
    train = _points(120, 3 * 4 * 4, 5).view(120, 3, 4, 4)
    pick = torch.randperm(120, generator=torch.Generator().manual_seed(6))[:40]
    report = copy_rate(train[pick], train, chunk_size=32)
    assert report.rate == 1.0
    assert bool((report.ratios == 0).all()) and bool((report.nn_dist == 0).all())
    assert torch.equal(report.nn_index, pick)
    assert torch.equal(report.copied_indices(), pick.sort().values)


def test_far_samples_have_rate_zero() -> None:
    train = _points(100, 8, 7)
    report = copy_rate(_points(30, 8, 8) + 50.0, train, chunk_size=16)
    assert report.rate == 0.0 and bool((report.ratios > 10).all())


def test_known_ratios_threshold_and_quantiles() -> None:
    train = torch.tensor([[0.0], [10.0], [20.0]])  # every training point's NN distance is 10
    samples = torch.tensor([[1.0], [14.0], [22.5]])  # ratios 0.1, 0.4, 0.25
    report = copy_rate(samples, train, quantiles=(0.0, 0.5, 1.0))
    torch.testing.assert_close(report.ratios, torch.tensor([0.1, 0.4, 0.25]))
    assert report.rate == pytest.approx(2 / 3)
    assert torch.equal(report.nn_index, torch.tensor([0, 1, 2]))
    assert report.quantiles == pytest.approx({0.0: 0.1, 0.5: 0.25, 1.0: 0.4})
    assert copy_rate(samples, train, threshold=0.5).rate == 1.0
    precomputed = copy_rate(samples, train, train_nn_dist=torch.full((3,), 5.0))
    torch.testing.assert_close(precomputed.ratios, torch.tensor([0.2, 0.8, 0.5]))


def test_duplicated_training_point_gives_zero_or_inf() -> None:
    train = torch.tensor([[0.0], [0.0], [10.0]])
    report = copy_rate(torch.tensor([[0.0], [1.0]]), train, quantiles=(0.0, 1.0))
    assert report.ratios[0] == 0 and report.ratios[1] == float("inf")
    assert report.rate == 0.5 and report.quantiles == {0.0: 0.0, 1.0: float("inf")}


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="queries have 3 dims per point but refs have 4"):
        nearest_neighbors(torch.zeros(2, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="exclude_self needs queries and refs of equal length, got 2 and 5"):
        nearest_neighbors(torch.zeros(2, 3), torch.zeros(5, 3), exclude_self=True)
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        nearest_neighbors(torch.zeros(5, 3), torch.zeros(5, 3), k=5, exclude_self=True)
    with pytest.raises(ValueError, match=r"train_nn_dist must have shape \(5,\)"):
        copy_rate(torch.zeros(2, 3), torch.randn(5, 3), train_nn_dist=torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        nearest_neighbors(torch.zeros(2, 3), torch.zeros(5, 3), chunk_size=0)


def test_second_nearest_ratio_of_gu_et_al() -> None:
    """r2(x) = ||x - NN1|| / ||x - NN2||, checked on points of a line where both distances are known."""
    train = torch.tensor([[0.0], [10.0], [30.0]])
    samples = torch.tensor([[1.0], [4.0], [10.0], [19.0], [29.0]])
    report = copy_rate(samples, train)
    expected = torch.tensor([1 / 9, 4 / 6, 0.0, 9 / 11, 1 / 19])
    torch.testing.assert_close(report.second_nn_ratios, expected)
    assert report.rate_second_nn == 3 / 5  # 1/9, 0 and 1/19 are below 1/3
    # the train-NN ratio differs: the NN distances of 0, 10, 30 inside train are 10, 10, 20
    torch.testing.assert_close(report.ratios, torch.tensor([1 / 10, 4 / 10, 0.0, 9 / 10, 1 / 20]))
    assert report.rate == 3 / 5
    assert torch.isnan(copy_rate(samples, train[:1], train_nn_dist=torch.ones(1)).second_nn_ratios).all()
