"""Choosing and building the feature extractor for a dataset (Inception-v3 or the small-data classifier)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_dpmot.metrics.classifier import ClassifierFeatures
from lightning_dpmot.metrics.inception import InceptionV3Features

FeatureKind = Literal["auto", "inception", "classifier"]
DEFAULT_CACHE_DIR = "~/.cache/lightning_dpmot"


def resolve_feature_kind(kind: FeatureKind, data_shape: tuple[int, ...]) -> Literal["inception", "classifier"]:
    """``auto``: Inception for RGB images of at least 32x32 (its features mean nothing below), else the classifier."""
    if kind not in ("auto", "inception", "classifier"):
        raise ValueError(f"feature must be 'auto', 'inception' or 'classifier', got {kind!r}")
    if kind != "auto":
        return kind
    is_rgb_image = len(data_shape) == 3 and data_shape[0] == 3 and min(data_shape[1:]) >= 32
    return "inception" if is_rgb_image else "classifier"


def dataset_tensors(dataset: Dataset, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """All items of a dict dataset as ``(x (N, *S), labels (N,))`` (labels are required)."""
    xs, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        if "label" not in batch:
            raise ValueError("the small-data classifier needs class labels; the dataset has no 'label' entry")
        xs.append(batch["x"])
        labels.append(batch["label"])
    return torch.cat(xs), torch.cat(labels)


def build_feature_extractor(
    kind: FeatureKind,
    data_shape: tuple[int, ...],
    train_dataset: Dataset | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    inception_weights: str | None = None,
) -> nn.Module:
    """The extractor for FID/KID/precision-recall on this data (eval mode, CPU).

    Args:
        kind: "inception", "classifier" or "auto" (see :func:`resolve_feature_kind`).
        data_shape: shape of one sample.
        train_dataset: the training split (needed by the classifier, which trains on it once and is cached).
        cache_dir: where trained classifiers are cached.
        inception_weights: path of the Inception weights file (default search: see ``InceptionV3Features``).
    """
    resolved = resolve_feature_kind(kind, data_shape)
    if resolved == "inception":
        return InceptionV3Features(inception_weights).eval()
    if train_dataset is None:
        raise ValueError("the classifier feature extractor needs the training dataset")
    x, labels = dataset_tensors(train_dataset)
    return ClassifierFeatures.cached(x, labels, Path(cache_dir).expanduser()).eval()
