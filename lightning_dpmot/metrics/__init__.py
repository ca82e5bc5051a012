"""Evaluation metrics: Fréchet distance / FID / KID features, mode mixture, memorisation, straightness, P/R.

``fid_metrics`` (torchmetrics FID/KID construction) is imported lazily: ``torchmetrics.image`` is slow to import.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_dpmot.metrics.classifier import ClassifierFeatures
from lightning_dpmot.metrics.copy_rate import CopyReport, copy_rate, nearest_neighbors, self_nearest_distance
from lightning_dpmot.metrics.curvature import (
    TrajectoryRecorder,
    curvature,
    mean_trajectory_metrics,
    straightness_deviation,
    total_variation,
    trajectory_metrics,
)
from lightning_dpmot.metrics.frechet import FeatureStatsAccumulator, feature_statistics, frechet_distance
from lightning_dpmot.metrics.inception import (
    InceptionV3Features,
    download_inception_weights,
    resolve_inception_weights,
)
from lightning_dpmot.metrics.mode_mixture import mode_coverage, mode_mixture_rate, off_mode_rate
from lightning_dpmot.metrics.precision_recall import PrecisionRecall, manifold_radii, precision_recall
from lightning_dpmot.metrics.reference_stats import (
    ReferenceStats,
    cached_reference_stats,
    compute_reference_stats,
    to_unit_range,
)
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier, scene_accuracy

_LAZY = {
    "build_fid_metric": "fid_metrics",
    "build_kid_metric": "fid_metrics",
    "load_reference_into_fid": "fid_metrics",
    "load_reference_into_kid": "fid_metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"lightning_dpmot.metrics.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lightning_dpmot.metrics' has no attribute {name!r}")


__all__ = [
    "ClassifierFeatures",
    "CopyReport",
    "FeatureStatsAccumulator",
    "InceptionV3Features",
    "PrecisionRecall",
    "ReferenceStats",
    "ShapesAttributeClassifier",
    "TrajectoryRecorder",
    "cached_reference_stats",
    "compute_reference_stats",
    "copy_rate",
    "curvature",
    "download_inception_weights",
    "feature_statistics",
    "frechet_distance",
    "manifold_radii",
    "mean_trajectory_metrics",
    "mode_coverage",
    "mode_mixture_rate",
    "nearest_neighbors",
    "off_mode_rate",
    "precision_recall",
    "resolve_inception_weights",
    "scene_accuracy",
    "self_nearest_distance",
    "straightness_deviation",
    "to_unit_range",
    "total_variation",
    "trajectory_metrics",
    *_LAZY,
]
