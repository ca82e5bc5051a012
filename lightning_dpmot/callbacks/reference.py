"""Feature extractor and real-data reference statistics for evaluation callbacks, prepared on every rank.

Rank 0 fills the on-disk caches first (training the small-data classifier, computing statistics), then a
barrier, then every rank loads the same cached objects: one computation, identical extractors everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_dpmot.metrics.extractors import FeatureKind, build_feature_extractor
from lightning_dpmot.metrics.reference_stats import ReferenceStats, cached_reference_stats, compute_reference_stats
from lightning_dpmot.utils.progress import Progress, progress

KEEP_FEATURES = 10_000  # real-feature subset stored with the statistics (KID, precision/recall)


def load_reference(
    datamodule: Any,
    data_shape: tuple[int, ...],
    feature_kind: FeatureKind,
    real_split: str,
    cache_dir: str,
    inception_weights: str | None = None,
    batch_size: int = 256,
    show_progress: L.Trainer | bool = False,
) -> tuple[nn.Module, ReferenceStats]:
    """(extractor, statistics of ``real_split``) from the caches, computing what is missing (single process).

    ``show_progress``: a trainer (its progress-bar settings decide) or a bool; shown only while statistics are computed.
    """
    if len(data_shape) != 3:
        raise ValueError(f"feature-based metrics need image data (C, H, W); got data_shape {data_shape}")
    feature = build_feature_extractor(
        feature_kind, data_shape, datamodule.dataset("train"), cache_dir, inception_weights
    )
    dataset = datamodule.dataset(real_split)

    def compute() -> ReferenceStats:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
        title = f"reference statistics ({datamodule.name}, {real_split}, {feature.name})"
        with progress(show_progress, len(loader), title) as bar:
            stats = compute_reference_stats(feature, _counted(loader, bar), keep_features=KEEP_FEATURES)
            bar.result(f"{stats.n} images")
        return stats

    stats = cached_reference_stats(
        Path(cache_dir).expanduser() / "reference_stats", datamodule.name, real_split, feature.name, compute
    )
    return feature, stats


def prepare_reference(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    feature_kind: FeatureKind,
    real_split: str,
    cache_dir: str,
    inception_weights: str | None = None,
    batch_size: int = 256,
) -> tuple[nn.Module, ReferenceStats]:
    """:func:`load_reference` on every rank, rank 0 first (collective: call on all ranks). Extractor on device."""
    args = (
        trainer.datamodule,
        tuple(pl_module.data_shape),
        feature_kind,
        real_split,
        cache_dir,
        inception_weights,
        batch_size,
    )
    if trainer.is_global_zero:
        load_reference(*args, show_progress=trainer)
    trainer.strategy.barrier("prepare_reference")
    feature, stats = load_reference(*args)
    return feature.to(pl_module.device), stats


def _counted(batches: Iterable[Any], bar: Progress) -> Iterator[Any]:
    """``batches``, advancing ``bar`` once each batch has been used."""
    for batch in batches:
        yield batch
        bar.advance()
