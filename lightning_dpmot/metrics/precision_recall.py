"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) on features.

A set of feature vectors ``Phi`` defines a manifold: the union of balls ``B(phi, r_k(phi))`` where
``r_k(phi)`` is the distance from ``phi`` to its k-th nearest neighbour in ``Phi`` (itself excluded). Then

    precision = share of generated features inside the real manifold,
    recall    = share of real features inside the generated manifold,

where "inside" means ``||q - phi|| <= r_k(phi)`` for at least one ``phi``. Precision measures sample quality
(no samples off the data), recall measures coverage (no dropped modes). ``k = 3`` is the paper's default.

All searches are blocked (see :mod:`lightning_dpmot.metrics.copy_rate`): memory stays at ``chunk x chunk``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dpmot.metrics.copy_rate import (
    DEFAULT_CHUNK_SIZE,
    flatten_points,
    nearest_neighbors,
    squared_distance_blocks,
)


def manifold_radii(features: Tensor, k: int = 3, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """k-NN radius of every point of a set: distance to its k-th nearest neighbour, itself excluded.

    Args:
        features: (N, d) with N > k.
        k: neighbourhood size.
        chunk_size: block edge of the search.

    Returns:
        (N,) float32 radii on the device of ``features``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(features) <= k:
        raise ValueError(f"a k={k} manifold needs more than {k} points, got {len(features)}")
    dist, _ = nearest_neighbors(features, features, k=k, chunk_size=chunk_size, exclude_self=True)
    return dist[:, k - 1]


def inside_manifold(queries: Tensor, manifold: Tensor, radii: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Whether each query lies in at least one ball ``B(manifold_j, radii_j)`` (boundary included).

    Args:
        queries: (M, d) features.
        manifold: (N, d) features defining the manifold.
        radii: (N,) ball radii, e.g. :func:`manifold_radii` of ``manifold``.
        chunk_size: block edge.

    Returns:
        (M,) bool on the device of ``queries``.
    """
    q, m = flatten_points(queries, "queries"), flatten_points(manifold, "manifold")
    if q.shape[1] != m.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} dims per point but the manifold has {m.shape[1]}")
    if radii.shape != (len(m),):
        raise ValueError(f"radii must have shape ({len(m)},), got {tuple(radii.shape)}")
    radii_sq = radii.to(q.device, torch.float32).square()
    inside = torch.zeros(len(q), dtype=torch.bool, device=q.device)
    for i0, j0, d2 in squared_distance_blocks(q, m, chunk_size):
        rows = slice(i0, i0 + len(d2))
        inside[rows] |= (d2 <= radii_sq[j0 : j0 + d2.shape[1]]).any(dim=1)
    return inside


@dataclass
class PrecisionRecall:
    """Result of :func:`precision_recall`.

    Attributes:
        precision: share of generated features inside the real manifold.
        recall: share of real features inside the generated manifold.
        k: neighbourhood size used.
    """

    precision: float
    recall: float
    k: int


def precision_recall(
    real: Tensor,
    fake: Tensor,
    k: int = 3,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    real_radii: Tensor | None = None,
) -> PrecisionRecall:
    """Improved precision and recall of generated features against real ones.

    Args:
        real: (N, d) real features (or any (N, *S), flattened).
        fake: (M, d) generated features.
        k: neighbourhood size of both manifolds.
        chunk_size: block edge of the searches.
        real_radii: (N,) precomputed :func:`manifold_radii` of ``real`` with the same ``k`` (reuse across
            evaluations; the real set is fixed).

    Returns:
        :class:`PrecisionRecall`.
    """
    real_flat, fake_flat = flatten_points(real, "real"), flatten_points(fake, "fake")
    if real_radii is None:
        real_radii = manifold_radii(real_flat, k, chunk_size)
    fake_radii = manifold_radii(fake_flat, k, chunk_size)
    precision = inside_manifold(fake_flat, real_flat, real_radii, chunk_size).double().mean().item()
    recall = inside_manifold(real_flat, fake_flat, fake_radii, chunk_size).double().mean().item()
    return PrecisionRecall(precision=precision, recall=recall, k=k)
