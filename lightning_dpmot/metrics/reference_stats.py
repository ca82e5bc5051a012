"""Real-data feature statistics for FID/KID, computed once and cached on disk as ``.npz``.

A :class:`ReferenceStats` holds the Gaussian fit (mu, Sigma, n) of a feature extractor's outputs over a
dataset split and, optionally, a uniform random subset of the raw features (for KID). Cache files are keyed by
(dataset key, split, feature extractor name): ``<dataset>-<split>-<feature>-<hash>.npz``; they are written
atomically (temporary file, then rename) and loaded with ``allow_pickle=False``.

Invalid cache files (unreadable, missing arrays, or written for another key) are by default recomputed and
overwritten with a warning; ``on_invalid="raise"`` turns that into a ``ValueError`` instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_dpmot.metrics.frechet import FeatureStatsAccumulator

_FORMAT_VERSION = 1


def to_unit_range(x: Tensor) -> Tensor:
    """Maps images from the data convention [-1, 1] to the feature-extractor convention [0, 1] (clamped).

    Args:
        x: (B, C, H, W) float in [-1, 1].

    Returns:
        (B, C, H, W) float in [0, 1].
    """
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


@dataclass
class ReferenceStats:
    """Gaussian statistics of reference features (float64) plus an optional raw-feature subset.

    Attributes:
        mu: (d,) float64 mean.
        sigma: (d, d) float64 unbiased covariance.
        n: number of samples behind mu and sigma (>= 2).
        features: (m, d) float32 uniform random subset of the features (for KID), or ``None``.
        meta: string metadata (``dataset_key``, ``split``, ``feature_name`` when produced by the cache).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.n = int(self.n)
        if self.mu.ndim != 1:
            raise ValueError(f"mu must have shape (d,), got {self.mu.shape}")
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ValueError(f"sigma must have shape ({d}, {d}), got {self.sigma.shape}")
        if self.n < 2:
            raise ValueError(f"n must be >= 2, got {self.n}")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != d:
                raise ValueError(f"features must have shape (m, {d}), got {self.features.shape}")
        self.meta = {str(k): str(v) for k, v in self.meta.items()}

    @property
    def num_features(self) -> int:
        """Feature dimension d."""
        return int(self.mu.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Writes an ``.npz`` atomically (temporary file in the same directory, then ``os.replace``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.asarray(_FORMAT_VERSION, dtype=np.int64),
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.asarray(self.n, dtype=np.int64),
        }
        if self.features is not None:
            arrays["features"] = self.features
        for key, value in self.meta.items():
            arrays[f"meta_{key}"] = np.asarray(value, dtype=np.str_)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceStats:
        """Reads a file written by :meth:`save` (``allow_pickle=False``).

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if it is not a readable ``.npz`` or lacks ``mu``, ``sigma`` or ``n``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a readable .npz file of reference statistics: {err}") from err
        missing = [k for k in ("mu", "sigma", "n") if k not in arrays]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing} (expected keys mu, sigma, n[, features, meta_*])")
        meta = {k[len("meta_") :]: str(v) for k, v in arrays.items() if k.startswith("meta_")}
        try:
            return cls(arrays["mu"], arrays["sigma"], int(arrays["n"]), arrays.get("features"), meta)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err


def _as_images(batch: Any, image_key: str) -> Tensor:
    """(B, C, H, W) images from a dict batch, a tensor, or a tuple/list whose first item is the images."""
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise ValueError(f"batch has no key {image_key!r} (keys: {sorted(batch)}); expected {{'x': (B, C, H, W)}}")
        x = batch[image_key]
    elif isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
    else:
        x = batch
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"expected images as a (B, C, H, W) tensor in [-1, 1], got {shape}")
    return x


@torch.no_grad()
def compute_reference_stats(
    feature: nn.Module,
    batches: Iterable[Any],
    max_samples: int | None = None,
    keep_features: int = 10_000,
    image_key: str = "x",
    seed: int = 0,
) -> ReferenceStats:
    """Runs a feature extractor over real data and returns its statistics.

    Args:
        feature: extractor following the project contract: (B, C, H, W) in [0, 1] -> (B, d), ``num_features``.
        batches: dict batches ``{"x": (B, C, H, W) in [-1, 1], ...}`` (tensors or tuples also accepted).
        max_samples: stop after this many images (``None``: all).
        keep_features: size of the uniform random feature subset kept for KID (0: none).
        image_key: dict key of the images.
        seed: seed of the subset selection.

    Returns:
        :class:`ReferenceStats` with float64 mu/sigma and ``meta["feature_name"]`` set.
    """
    d = int(getattr(feature, "num_features", 0))
    if d < 1:
        raise ValueError(f"feature module {type(feature).__name__} needs a positive int attribute num_features")
    param = next(iter(feature.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    acc = FeatureStatsAccumulator(d)
    gen = torch.Generator().manual_seed(seed)
    kept, kept_keys = torch.empty(0, d), torch.empty(0)
    for batch in batches:
        x = _as_images(batch, image_key)
        if max_samples is not None:
            x = x[: max_samples - acc.n]
        if x.shape[0] == 0:
            break
        with torch.autocast(device_type=device.type, enabled=False):
            f = feature(to_unit_range(x.to(device=device, dtype=torch.float32)))
        if f.shape != (x.shape[0], d):
            raise ValueError(f"feature module returned shape {tuple(f.shape)}, expected ({x.shape[0]}, {d})")
        acc.update(f)
        if keep_features > 0:  # keep the items with the smallest uniform keys = a uniform random subset
            keys = torch.rand(x.shape[0], generator=gen)
            kept, kept_keys = torch.cat([kept, f.float().cpu()]), torch.cat([kept_keys, keys])
            order = torch.argsort(kept_keys)[:keep_features]
            kept, kept_keys = kept[order], kept_keys[order]
        if max_samples is not None and acc.n >= max_samples:
            break
    if acc.n < 2:
        raise ValueError(f"need at least 2 images for reference statistics, got {acc.n}")
    mu, sigma = acc.statistics()
    features = kept.numpy() if keep_features > 0 else None
    name = str(getattr(feature, "name", type(feature).__name__))
    return ReferenceStats(mu, sigma, acc.n, features, {"feature_name": name})


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


def cache_file_name(dataset_key: str, split: str, feature_name: str) -> str:
    """``<dataset>-<split>-<feature>-<10 hex of sha256 of the exact key>.npz``, safe on every filesystem."""
    digest = hashlib.sha256(f"{dataset_key}\0{split}\0{feature_name}".encode()).hexdigest()[:10]
    stem = "-".join(_sanitise(s)[:60] for s in (dataset_key, split, feature_name))
    return f"{stem}-{digest}.npz"


def cached_reference_stats(
    cache_dir: str | os.PathLike,
    dataset_key: str,
    split: str,
    feature_name: str,
    compute_fn: Callable[[], ReferenceStats],
    on_invalid: Literal["recompute", "raise"] = "recompute",
) -> ReferenceStats:
    """Loads the statistics for (dataset, split, feature) from ``cache_dir`` or computes and stores them.

    Args:
        cache_dir: directory of the ``.npz`` files (created if missing).
        dataset_key: dataset and preprocessing identifier (e.g. ``DataModule.name``).
        split: dataset split, e.g. ``"train"``.
        feature_name: the extractor's ``name`` attribute.
        compute_fn: called without arguments on a cache miss; returns :class:`ReferenceStats`.
        on_invalid: on an unreadable or mismatched cache file, recompute (with a warning) or raise.

    Returns:
        The statistics, with ``meta`` holding the three key parts.
    """
    if on_invalid not in ("recompute", "raise"):
        raise ValueError(f"on_invalid must be 'recompute' or 'raise', got {on_invalid!r}")
    expected = {"dataset_key": dataset_key, "split": split, "feature_name": feature_name}
    path = Path(cache_dir).expanduser() / cache_file_name(dataset_key, split, feature_name)
    if path.is_file():
        try:
            stats = ReferenceStats.load(path)
            wrong = {k: stats.meta.get(k) for k, v in expected.items() if stats.meta.get(k) != v}
            if wrong:
                raise ValueError(f"{path} was written for {wrong}, expected {expected}")
            return stats
        except ValueError as err:
            if on_invalid == "raise":
                raise
            warnings.warn(f"invalid reference-statistics cache, recomputing: {err}", stacklevel=2)
    stats = compute_fn()
    if not isinstance(stats, ReferenceStats):
        raise TypeError(f"compute_fn must return ReferenceStats, got {type(stats).__name__}")
    computed_with = stats.meta.get("feature_name", feature_name)
    if computed_with != feature_name:
        raise ValueError(
            f"compute_fn used feature extractor {computed_with!r}, but the cache key says {feature_name!r}"
        )
    stats.meta = {**stats.meta, **expected}
    stats.save(path)
    return stats
