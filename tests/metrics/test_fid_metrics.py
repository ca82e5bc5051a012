from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from einops import rearrange
from torch import Tensor, nn

from lightning_dpmot.metrics.fid_metrics import (
    build_fid_metric,
    build_kid_metric,
    check_feature_module,
    fid_real_states,
    load_reference_into_fid,
    load_reference_into_kid,
)
from lightning_dpmot.metrics.frechet import feature_statistics, frechet_distance
from lightning_dpmot.metrics.reference_stats import ReferenceStats, compute_reference_stats, to_unit_range

pytestmark = pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all")


class Toy16(nn.Module):
    """(B, 3, 4, 4) in [0, 1] -> (B, 16) float32; records the dtype and range of what it was given."""

    num_features = 16
    name = "toy16"

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(48, 16)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(16, 48, generator=gen) / 7)
            self.proj.bias.zero_()
        self.seen: list[tuple[torch.dtype, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append((x.dtype, float(x.max())))
        return torch.tanh(self.proj(rearrange(x, "b c h w -> b (c h w)")))


def _images(n: int, seed: int, shift: float = 0.0) -> Tensor:
    """(n, 3, 4, 4) in [-1, 1]."""
    return (torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8 + shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def reference() -> ReferenceStats:
    real = _images(300, seed=1)
    return compute_reference_stats(Toy16(), [{"x": b} for b in real.split(64)], keep_features=300)


def test_loaded_reference_gives_frechet_distance(reference: ReferenceStats) -> None:
    feature = Toy16()
    fid = build_fid_metric(feature, reference=reference)
    fake = to_unit_range(_images(200, seed=2, shift=0.2))
    for chunk in fake.split(50):
        fid.update(chunk, real=False)
    assert all(dtype == torch.float32 and peak <= 1.0 for dtype, peak in feature.seen)  # no uint8 conversion
    with torch.no_grad():
        mu_fake, sigma_fake = feature_statistics(feature(fake))
    expected = frechet_distance(reference.mu, reference.sigma, mu_fake, sigma_fake)
    assert expected > 1e-3
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-5)
    # the same as feeding the real images through the metric
    direct = build_fid_metric(Toy16())
    direct.update(to_unit_range(_images(300, seed=1)), real=True)
    direct.update(fake, real=False)
    assert float(direct.compute()) == pytest.approx(expected, rel=1e-5)


def test_states_are_exact_sums_and_survive_reset(reference: ReferenceStats) -> None:
    fid = build_fid_metric(Toy16(), reference=reference)
    n = reference.n
    assert int(fid.real_features_num_samples) == n == 300
    assert fid.real_features_sum.dtype == torch.float64
    mean = fid.real_features_sum / n
    cov = (fid.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    np.testing.assert_allclose(mean.numpy(), reference.mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(cov.numpy(), reference.sigma, rtol=1e-9, atol=1e-13)
    fid.update(torch.rand(4, 3, 4, 4), real=False)
    fid.reset()
    assert int(fid.fake_features_num_samples) == 0 and int(fid.real_features_num_samples) == n


def test_rank_split_keeps_sum_reduction_exact(reference: ReferenceStats) -> None:
    ranks = [build_fid_metric(Toy16(), reference=reference, rank=r) for r in range(2)]
    assert int(ranks[1].real_features_num_samples) == 0 and ranks[1].real_features_sum.abs().max() == 0
    total, outer, count = fid_real_states(reference)
    summed = [
        sum(getattr(m, s) for m in ranks)
        for s in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")
    ]
    assert torch.equal(summed[0], total) and torch.equal(summed[1], outer) and torch.equal(summed[2], count)


def test_kid_reference_shards_and_value(reference: ReferenceStats) -> None:
    shards = [build_kid_metric(Toy16(), reference=reference, subset_size=50, rank=r, world_size=2) for r in range(2)]
    joined = torch.cat([m.real_features[0] for m in shards])
    assert torch.equal(joined, torch.from_numpy(reference.features))
    fake = to_unit_range(_images(100, seed=3, shift=0.3))
    loaded = build_kid_metric(Toy16(), reference=reference, subsets=5, subset_size=50)
    direct = build_kid_metric(Toy16(), subsets=5, subset_size=50)
    direct.update(to_unit_range(_images(300, seed=1)), real=True)
    # align row order (the cache keeps a random subset order) so both draw the same random subsets
    order = torch.cdist(loaded.real_features[0], direct.real_features[0]).argmin(dim=1)
    direct.real_features = [direct.real_features[0][order]]
    values = []
    for metric in (loaded, direct):
        metric.update(fake, real=False)
        torch.manual_seed(0)
        values.append(metric.compute())
    assert float(values[0][0]) > 0
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-7)
    loaded.reset()
    assert len(loaded.fake_features) == 0 and loaded.real_features[0].shape == (300, 16)


def test_no_torch_fidelity_import_for_custom_features(
    monkeypatch: pytest.MonkeyPatch, reference: ReferenceStats
) -> None:
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # any import attempt now raises ImportError
    fid = build_fid_metric(Toy16(), reference=reference)
    kid = build_kid_metric(Toy16(), reference=reference, subset_size=10)
    assert fid.used_custom_model and kid.used_custom_model


def test_errors(reference: ReferenceStats) -> None:
    class Nameless(nn.Module):
        num_features = 16

    with pytest.raises(ValueError, match="needs a non-empty str attribute name"):
        check_feature_module(Nameless())
    fid = build_fid_metric(Toy16())
    fid.reset_real_features = True
    with pytest.raises(ValueError, match="reset_real_features must be False"):
        load_reference_into_fid(fid, reference)
    wrong_dim = ReferenceStats(np.zeros(8), np.eye(8), 10)
    with pytest.raises(ValueError, match="have 8 features, the FID metric expects 16"):
        load_reference_into_fid(build_fid_metric(Toy16()), wrong_dim)
    kid = build_kid_metric(Toy16(), subset_size=500)
    with pytest.raises(ValueError, match="hold 300 features, KID needs at least subset_size=500"):
        load_reference_into_kid(kid, reference)
    with pytest.raises(ValueError, match="hold no raw features"):
        load_reference_into_kid(kid, ReferenceStats(reference.mu, reference.sigma, reference.n))
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        load_reference_into_kid(build_kid_metric(Toy16(), subset_size=10), reference, rank=2, world_size=2)
