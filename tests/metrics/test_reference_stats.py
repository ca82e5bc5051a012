from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import Tensor, nn

from lightning_dpmot.metrics.frechet import feature_statistics
from lightning_dpmot.metrics.reference_stats import (
    ReferenceStats,
    cache_file_name,
    cached_reference_stats,
    compute_reference_stats,
    to_unit_range,
)


class ToyFeatures(nn.Module):
    """(B, 3, 4, 4) in [0, 1] -> (B, 16); records the input range it saw."""

    num_features = 16
    name = "toy16"

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(48, 16)
        self.seen_min, self.seen_max = float("inf"), float("-inf")

    def forward(self, x: Tensor) -> Tensor:
        self.seen_min, self.seen_max = min(self.seen_min, x.min().item()), max(self.seen_max, x.max().item())
        return torch.tanh(self.proj(rearrange(x, "b c h w -> b (c h w)")))


@pytest.fixture
def images() -> Tensor:
    return torch.rand(100, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _batches(x: Tensor, size: int = 16) -> list[dict[str, Tensor]]:
    return [{"x": chunk, "label": torch.zeros(len(chunk))} for chunk in x.split(size)]


def test_compute_matches_direct_statistics(images: Tensor) -> None:
    torch.manual_seed(0)
    feature = ToyFeatures()
    stats = compute_reference_stats(feature, _batches(images), keep_features=10)
    assert feature.seen_min >= 0.0 and feature.seen_max <= 1.0  # [-1, 1] data reached it as [0, 1]
    with torch.no_grad():
        all_features = feature(to_unit_range(images))
    mu, sigma = feature_statistics(all_features)
    assert stats.n == 100 and stats.meta["feature_name"] == "toy16"
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-10)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-8, atol=1e-12)
    # the kept subset: 10 distinct rows of the full feature set, not simply the first batch
    assert stats.features is not None and stats.features.shape == (10, 16)
    dist = torch.cdist(torch.from_numpy(stats.features), all_features, compute_mode="donot_use_mm_for_euclid_dist")
    rows = dist.argmin(dim=1)
    assert dist.min(dim=1).values.max() < 1e-5 and len(set(rows.tolist())) == 10
    assert rows.max() >= 16


def test_max_samples_and_no_subset(images: Tensor) -> None:
    feature = ToyFeatures()
    stats = compute_reference_stats(feature, _batches(images), max_samples=40, keep_features=0)
    assert stats.n == 40 and stats.features is None
    with torch.no_grad():
        mu, _ = feature_statistics(feature(to_unit_range(images[:40])))
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-10)
    with pytest.raises(ValueError, match="batch has no key 'x'"):
        compute_reference_stats(feature, [{"image": images[:4]}])


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stats = ReferenceStats(rng.normal(size=5), np.eye(5) * 2.0, 1234, rng.normal(size=(7, 5)), {"split": "train"})
    path = stats.save(tmp_path / "sub" / "stats.npz")
    assert [p.name for p in path.parent.iterdir()] == ["stats.npz"]  # no temporary files left behind
    with np.load(path, allow_pickle=False) as data:
        assert data["sigma"].dtype == np.float64 and data["features"].dtype == np.float32
    back = ReferenceStats.load(path)
    assert back.n == 1234 and back.meta == {"split": "train"} and back.num_features == 5
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, stats.features)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        ReferenceStats.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="bad.npz is not a readable .npz"):
        ReferenceStats.load(bad)
    partial = tmp_path / "partial.npz"
    np.savez(partial, mu=np.zeros(3), n=np.asarray(10))
    with pytest.raises(ValueError, match=r"lacks the arrays \['sigma'\]"):
        ReferenceStats.load(partial)
    with pytest.raises(ValueError, match=r"sigma must have shape \(3, 3\)"):
        ReferenceStats(np.zeros(3), np.eye(2), 10)


def test_cache_file_names_are_safe_and_distinct() -> None:
    name = cache_file_name("cifar10/32x32 (x-flip)", "train", "inception-2015-12-05")
    assert name.startswith("cifar10_32x32_x-flip-train-inception-2015-12-05-") and name.endswith(".npz")
    assert "/" not in name and " " not in name
    assert cache_file_name("a/b", "train", "f") != cache_file_name("a_b", "train", "f")


def test_cached_reference_stats(tmp_path: Path, images: Tensor) -> None:
    feature, calls = ToyFeatures(), []

    def compute() -> ReferenceStats:
        calls.append(1)
        return compute_reference_stats(feature, _batches(images), keep_features=8)

    first = cached_reference_stats(tmp_path, "toy", "train", "toy16", compute)
    path = tmp_path / cache_file_name("toy", "train", "toy16")
    assert path.is_file() and len(calls) == 1
    assert first.meta == {"dataset_key": "toy", "split": "train", "feature_name": "toy16"}
    second = cached_reference_stats(tmp_path, "toy", "train", "toy16", compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(second.sigma, first.sigma)
    np.testing.assert_array_equal(second.features, first.features)
    cached_reference_stats(tmp_path, "toy", "val", "toy16", compute)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="compute_fn used feature extractor 'toy16'.*'other'"):
        cached_reference_stats(tmp_path, "toy", "train", "other", compute)


def test_invalid_cache_recompute_or_raise(tmp_path: Path, images: Tensor) -> None:
    feature, calls = ToyFeatures(), []

    def compute() -> ReferenceStats:
        calls.append(1)
        return compute_reference_stats(feature, _batches(images), keep_features=0)

    path = tmp_path / cache_file_name("toy", "train", "toy16")
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a readable .npz"):
        cached_reference_stats(tmp_path, "toy", "train", "toy16", compute, on_invalid="raise")
    with pytest.warns(UserWarning, match="invalid reference-statistics cache, recomputing"):
        stats = cached_reference_stats(tmp_path, "toy", "train", "toy16", compute)
    assert len(calls) == 1 and ReferenceStats.load(path).n == stats.n == 100
    # a file written for another key (e.g. copied by hand) is not trusted
    other = tmp_path / cache_file_name("toy", "val", "toy16")
    other.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="was written for {'split': 'train'}"):
        cached_reference_stats(tmp_path, "toy", "val", "toy16", compute, on_invalid="raise")
