"""Memorisation: chunked nearest-neighbour search and the nearest-neighbour copy rate.

For a generated sample ``x`` with nearest training image ``y = NN_train(x)``, the copy ratio is

    r(x) = ||x - y|| / ||y - NN_train\\{y}(y)||,

the distance to the nearest training image divided by that image's own nearest-neighbour distance inside the
training set (excluding itself). ``r < 1/3`` means the sample sits three times closer to a training image than
any other training image does: a copy. The copy rate is the share of samples with ``r < threshold``.

Gu et al. (2023, "On Memorization in Diffusion Models") use another ratio, reported beside it: the sample's distance
to its nearest training image over its distance to the second nearest,

    r2(x) = ||x - NN1_train(x)|| / ||x - NN2_train(x)||,

also with the threshold 1/3. Both come from one k = 2 search of the samples against the training set.

All distances are Euclidean, fp32, on the device of the queries. The search is blocked over queries and
references (running top-k), so a 50k x 50k x 3072 search never holds more than ``chunk_size x chunk_size``
distances. Blocks use ``||a||^2 + ||b||^2 - 2<a, b>`` (one GEMM, clamped at 0) to rank candidates; the
distances of the selected neighbours are then recomputed directly as ``||a - b||``, so they are exact (an
exact copy has distance 0) and do not depend on the chunk sizes. Inputs may be pixels ``(N, C, H, W)`` or
features ``(N, d)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from lightning_dpmot.utils.precision import exact_fp32

#: Default block edge: a block of distances is ``chunk_size x chunk_size`` fp32 values (16 MiB at 2048).
DEFAULT_CHUNK_SIZE = 2048


def flatten_points(x: Tensor, name: str = "x") -> Tensor:
    """(N, *S) -> (N, d) float32 (pixels or features alike)."""
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")
    if len(x) == 0:
        raise ValueError(f"{name} is empty")
    return rearrange(x, "n ... -> n (...)").float()


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _expanded_squared_distances(q: Tensor, q_sq: Tensor, r: Tensor) -> Tensor:
    """``||q||^2 + ||r||^2 - 2 q r^T`` clamped at 0: (m, d), (m, 1), (n, d) -> (m, n), with TF32 and bf16
    autocast kept off (either would mis-rank near neighbours)."""
    with exact_fp32(q.device):
        return torch.addmm(q_sq + r.square().sum(1), q, r.T, alpha=-2.0).clamp_(min=0.0)


def squared_distance_blocks(
    queries: Tensor, refs: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[tuple[int, int, Tensor]]:
    """Yield blocks of squared Euclidean distances by the GEMM expansion.

    Args:
        queries: (M, d) float32.
        refs: (N, d) float32 (moved chunk by chunk to the device of ``queries``).
        chunk_size: block edge.

    Yields:
        ``(i0, j0, d2)`` with ``d2`` (m, n) = squared distances between ``queries[i0:i0+m]`` and
        ``refs[j0:j0+n]``, clamped at 0. Blocks come query-chunk by query-chunk, ref chunks inner.
    """
    _check_chunk(chunk_size)
    device = queries.device
    for i0 in range(0, len(queries), chunk_size):
        q = queries[i0 : i0 + chunk_size]
        q_sq = q.square().sum(1, keepdim=True)
        for j0 in range(0, len(refs), chunk_size):
            r = refs[j0 : j0 + chunk_size].to(device, torch.float32)
            yield i0, j0, _expanded_squared_distances(q, q_sq, r)


def _exact_distances(q: Tensor, refs: Tensor, idx: Tensor) -> Tensor:
    """||q_i - refs[idx_ij]|| for q (m, d), idx (m, k) -> (m, k)."""
    neighbours = refs[idx.flatten().to(refs.device)].to(q.device, torch.float32)
    neighbours = rearrange(neighbours, "(m k) d -> m k d", m=len(q))
    return (q.unsqueeze(1) - neighbours).square().sum(-1).sqrt()


def nearest_neighbors(
    queries: Tensor,
    refs: Tensor,
    k: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> tuple[Tensor, Tensor]:
    """k nearest references of every query by a blocked search with a running top-k.

    Args:
        queries: (M, *S) points (flattened to (M, d)).
        refs: (N, *S) points with the same ``d``; may live on another device (moved chunk by chunk).
        k: neighbours per query.
        chunk_size: block edge for queries and references.
        exclude_self: ``queries`` and ``refs`` are the same set; query ``i`` never matches reference ``i``.

    Returns:
        ``(dist, idx)``: (M, k) float32 exact distances in ascending order and (M, k) int64 reference indices,
        both on the device of ``queries``.
    """
    q_all, r_all = flatten_points(queries, "queries"), flatten_points(refs, "refs")
    if q_all.shape[1] != r_all.shape[1]:
        raise ValueError(f"queries have {q_all.shape[1]} dims per point but refs have {r_all.shape[1]}")
    if exclude_self and len(q_all) != len(r_all):
        raise ValueError(f"exclude_self needs queries and refs of equal length, got {len(q_all)} and {len(r_all)}")
    available = len(r_all) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] for {len(r_all)} refs (exclude_self={exclude_self}), got {k}")
    device = q_all.device
    best_d2 = torch.full((len(q_all), k), float("inf"), device=device)
    best_idx = torch.zeros((len(q_all), k), dtype=torch.long, device=device)
    for i0, j0, d2 in squared_distance_blocks(q_all, r_all, chunk_size):
        m, n = d2.shape
        if exclude_self:
            rows = torch.arange(i0, i0 + m, device=device).unsqueeze(1)
            cols = torch.arange(j0, j0 + n, device=device)
            d2 = d2.masked_fill(rows == cols, float("inf"))
        cand_d2 = torch.cat([best_d2[i0 : i0 + m], d2], dim=1)
        cand_idx = torch.cat([best_idx[i0 : i0 + m], torch.arange(j0, j0 + n, device=device).expand(m, n)], dim=1)
        top_d2, pos = cand_d2.topk(k, dim=1, largest=False, sorted=True)
        best_d2[i0 : i0 + m] = top_d2
        best_idx[i0 : i0 + m] = cand_idx.gather(1, pos)
    dist = torch.empty_like(best_d2)
    for i0 in range(0, len(q_all), chunk_size):
        dist[i0 : i0 + chunk_size] = _exact_distances(
            q_all[i0 : i0 + chunk_size], r_all, best_idx[i0 : i0 + chunk_size]
        )
    dist, order = dist.sort(dim=1, stable=True)
    return dist, best_idx.gather(1, order)


def self_nearest_distance(train: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Nearest-neighbour distance of every training point inside the training set, excluding itself.

    Args:
        train: (N, *S) with N >= 2.
        chunk_size: block edge.

    Returns:
        (N,) float32 distances (0 for exact duplicates). Compute once and pass to :func:`copy_rate`.
    """
    if len(train) < 2:
        raise ValueError(f"the training set needs at least 2 points for a self nearest neighbour, got {len(train)}")
    dist, _ = nearest_neighbors(train, train, k=1, chunk_size=chunk_size, exclude_self=True)
    return dist[:, 0]


@dataclass
class CopyReport:
    """Result of :func:`copy_rate`.

    Attributes:
        rate: share of samples with ``ratio < threshold``.
        threshold: the threshold used.
        ratios: (M,) copy ratio per sample (0/0 := 0, x/0 := inf for training points with duplicates).
        nn_index: (M,) index of each sample's nearest training point (names the copied image).
        nn_dist: (M,) distance to that training point.
        quantiles: ``{q: quantile of ratios}``.
        second_nn_ratios: (M,) Gu et al.'s ratio (nearest over second-nearest training distance; 0/0 := 0); NaN
            when the training set has a single point.
        rate_second_nn: share of samples with ``second_nn_ratios < threshold`` (Gu et al.'s memorisation rate).
    """

    rate: float
    threshold: float
    ratios: Tensor
    nn_index: Tensor
    nn_dist: Tensor
    quantiles: dict[float, float]
    second_nn_ratios: Tensor
    rate_second_nn: float

    def copied_indices(self) -> Tensor:
        """Sorted unique training indices that at least one sample copies."""
        return self.nn_index[self.ratios < self.threshold].unique()


def copy_ratios(nn_dist: Tensor, train_nn_dist: Tensor) -> Tensor:
    """Ratio of a sample's NN distance to its training neighbour's own NN distance, (M,) / (M,) -> (M,).

    A zero denominator (a duplicated training point) gives 0 for an exact copy and inf otherwise.
    """
    ratio = nn_dist / train_nn_dist
    return torch.where(nn_dist == 0, torch.zeros_like(ratio), ratio)


def ratio_quantiles(ratios: Tensor, levels: Sequence[float]) -> dict[float, float]:
    """Linearly interpolated quantiles of (M,) values that may contain +inf (inf where an inf is involved)."""
    values = ratios.detach().double().cpu().sort().values
    out: dict[float, float] = {}
    for q in levels:
        pos = float(q) * (len(values) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
        w = pos - lo
        v_lo, v_hi = values[lo].item(), values[hi].item()
        out[float(q)] = v_lo if w == 0 or v_lo == v_hi else v_lo + w * (v_hi - v_lo)
    return out


def copy_rate(
    samples: Tensor,
    train: Tensor,
    threshold: float = 1.0 / 3.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    train_nn_dist: Tensor | None = None,
    quantiles: Sequence[float] = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75),
) -> CopyReport:
    """Nearest-neighbour copy rate of generated samples against a training set.

    Args:
        samples: (M, *S) generated images or their features.
        train: (N, *S) training images or features (same space as ``samples``).
        threshold: a sample is a copy when its ratio is below this (1/3: three times closer than neighbours).
        chunk_size: block edge of the nearest-neighbour searches.
        train_nn_dist: (N,) precomputed :func:`self_nearest_distance` of ``train`` (skips the N x N search).
        quantiles: levels in [0, 1] at which to report the ratio distribution.

    Returns:
        :class:`CopyReport`.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"quantiles must lie in [0, 1], got {tuple(quantiles)}")
    if train_nn_dist is None:
        train_nn_dist = self_nearest_distance(train, chunk_size)
    elif train_nn_dist.shape != (len(train),):
        raise ValueError(f"train_nn_dist must have shape ({len(train)},), got {tuple(train_nn_dist.shape)}")
    dist, idx = nearest_neighbors(samples, train, k=min(2, len(train)), chunk_size=chunk_size)
    nn_dist, nn_index = dist[:, 0], idx[:, 0]
    ratios = copy_ratios(nn_dist, train_nn_dist.to(nn_dist.device, torch.float32)[nn_index])
    second = copy_ratios(nn_dist, dist[:, 1]) if dist.shape[1] == 2 else torch.full_like(nn_dist, float("nan"))
    return CopyReport(
        rate=(ratios < threshold).double().mean().item(),
        threshold=float(threshold),
        ratios=ratios,
        nn_index=nn_index,
        nn_dist=nn_dist,
        quantiles=ratio_quantiles(ratios, quantiles),
        second_nn_ratios=second,
        rate_second_nn=(second < threshold).double().mean().item() if dist.shape[1] == 2 else float("nan"),
    )
