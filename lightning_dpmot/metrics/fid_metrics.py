"""torchmetrics FID/KID around project feature extractors, pre-filled with cached reference statistics.

Any extractor following the project contract works (``forward``: (B, C, H, W) float in [0, 1] -> (B, d)
float32; attributes ``num_features`` and ``name``): the FID Inception-v3, a small-data classifier, ... With a
custom module torchmetrics neither imports nor needs torch-fidelity, and with ``normalize=True`` it passes
[0, 1] floats through unchanged.

Reference statistics enter the metrics' own states, so DDP reduction stays exact:

* FID keeps float64 sum states; from (mu, Sigma, n)::

      real_features_sum      = n mu
      real_features_cov_sum  = (n - 1) Sigma + n mu mu^T
      real_features_num_samples = n

  which ``compute()`` maps back to mu and Sigma. The states are ``sum``-reduced across ranks, so only rank 0
  holds them; the other ranks hold zeros.
* KID keeps list states that are concatenated across ranks, so rank r holds the r-th of ``world_size``
  contiguous shards of the stored feature subset.

Both metrics are built with ``reset_real_features=False``: ``reset()`` clears the fake side only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_dpmot.metrics.reference_stats import ReferenceStats


def check_feature_module(feature: nn.Module) -> int:
    """Validates the feature-extractor contract and returns its feature dimension d.

    Raises:
        ValueError: unless ``feature`` is an ``nn.Module`` with int ``num_features`` > 0 and str ``name``.
    """
    if not isinstance(feature, nn.Module):
        raise ValueError(f"feature must be an nn.Module, got {type(feature).__name__}")
    d = getattr(feature, "num_features", None)
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"feature module {type(feature).__name__} needs an int attribute num_features > 0, got {d!r}")
    name = getattr(feature, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"feature module {type(feature).__name__} needs a non-empty str attribute name, got {name!r}")
    return d


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def fid_real_states(stats: ReferenceStats) -> tuple[Tensor, Tensor, Tensor]:
    """torchmetrics' real-side FID states from (mu, Sigma, n).

    Returns:
        ``real_features_sum`` (d,) float64, ``real_features_cov_sum`` (d, d) float64,
        ``real_features_num_samples`` () int64.
    """
    mu = torch.from_numpy(stats.mu).to(torch.float64)
    sigma = torch.from_numpy(stats.sigma).to(torch.float64)
    n = stats.n
    return n * mu, (n - 1) * sigma + n * torch.outer(mu, mu), torch.tensor(n, dtype=torch.long)


def load_reference_into_fid(metric: FrechetInceptionDistance, stats: ReferenceStats, rank: int = 0) -> None:
    """Replaces the metric's real-feature states by the reference statistics.

    Args:
        metric: FID metric with ``reset_real_features=False``.
        stats: reference statistics of the metric's feature extractor.
        rank: global rank of this process (only rank 0 holds the sums; others get zeros).
    """
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if metric.reset_real_features:
        raise ValueError("metric.reset_real_features must be False, or reset() would discard the reference statistics")
    d = metric.real_features_sum.shape[0]
    if stats.num_features != d:
        raise ValueError(f"reference statistics have {stats.num_features} features, the FID metric expects {d}")
    device = metric.real_features_sum.device
    total, outer, count = fid_real_states(stats)
    if rank != 0:
        total, outer, count = torch.zeros_like(total), torch.zeros_like(outer), torch.zeros_like(count)
    metric.real_features_sum = total.to(device)
    metric.real_features_cov_sum = outer.to(device)
    metric.real_features_num_samples = count.to(device)


def load_reference_into_kid(
    metric: KernelInceptionDistance, stats: ReferenceStats, rank: int = 0, world_size: int = 1
) -> None:
    """Replaces the metric's real features by this rank's shard of the stored feature subset.

    Args:
        metric: KID metric with ``reset_real_features=False``.
        stats: reference statistics with a ``features`` subset (m, d), m >= ``metric.subset_size``.
        rank: global rank of this process.
        world_size: number of processes.
    """
    _check_rank(rank, world_size)
    if metric.reset_real_features:
        raise ValueError("metric.reset_real_features must be False, or reset() would discard the reference features")
    if stats.features is None:
        raise ValueError("reference statistics hold no raw features; compute them with keep_features > 0 for KID")
    m = stats.features.shape[0]
    if m < max(metric.subset_size, world_size):
        raise ValueError(
            f"reference statistics hold {m} features, KID needs at least subset_size={metric.subset_size} "
            f"(and one per rank, world_size={world_size}); lower subset_size or keep more features"
        )
    shard = torch.tensor_split(torch.from_numpy(stats.features), world_size)[rank]
    metric.real_features = [shard.to(metric.device)]


def build_fid_metric(
    feature: nn.Module, reference: ReferenceStats | None = None, rank: int = 0, **kwargs: Any
) -> FrechetInceptionDistance:
    """FID over ``feature`` for [0, 1] float images, keeping real statistics across ``reset()``.

    Args:
        feature: extractor following the project contract.
        reference: statistics to pre-load as the real distribution (``None``: feed real images with
            ``update(x, real=True)``).
        rank: global rank (see :func:`load_reference_into_fid`).
        **kwargs: further ``Metric`` options (e.g. ``sync_on_compute``).

    Returns:
        ``FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False)``.
    """
    check_feature_module(feature)
    metric = FrechetInceptionDistance(feature=feature, normalize=True, reset_real_features=False, **kwargs)
    if reference is not None:
        load_reference_into_fid(metric, reference, rank=rank)
    return metric


def build_kid_metric(
    feature: nn.Module,
    reference: ReferenceStats | None = None,
    subsets: int = 100,
    subset_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    **kwargs: Any,
) -> KernelInceptionDistance:
    """KID over ``feature`` for [0, 1] float images, keeping real features across ``reset()``.

    Args:
        feature: extractor following the project contract.
        reference: statistics with a feature subset to pre-load as the real side.
        subsets: number of random subsets averaged.
        subset_size: samples per subset (both sides need at least this many).
        rank: global rank (see :func:`load_reference_into_kid`).
        world_size: number of processes.
        **kwargs: further KID / ``Metric`` options (``degree``, ``gamma``, ``coef``, ...).

    Returns:
        ``KernelInceptionDistance`` with ``normalize=True`` and ``reset_real_features=False``.
    """
    check_feature_module(feature)
    metric = KernelInceptionDistance(
        feature=feature,
        subsets=subsets,
        subset_size=subset_size,
        normalize=True,
        reset_real_features=False,
        **kwargs,
    )
    if reference is not None:
        load_reference_into_kid(metric, reference, rank=rank, world_size=world_size)
    return metric
