"""Caption accuracy and classifier-feature FID of generated shapes images against the labels of their prompts.

For prompt sets with structured labels (the embedded benchmark's ``labels/<split>.jsonl``, labels as in
:func:`~lightning_dpmot.data.shapes.scene_label`):

- :func:`label_targets` turns labels into the targets of :func:`~lightning_dpmot.metrics.shapes_classifier.
  scene_accuracy` (``objects`` (N, 3, 3), ``num_objects`` (N,), ``relation`` (N,));
- :func:`label_scenes` lays labels out on the grid — each scene's cells drawn, seeded, uniformly among the layouts
  that express its relation (every cell for one object), the distribution of the dataset's own scenes — so that
  real renders of the prompts exist as an FID reference;
- :class:`ShapesCaptionScorer` scores images in [-1, 1]: exact and per-attribute caption accuracy with the
  attribute classifier, and FID on the classifier's features against ``real_per_label`` renders of every label
  (both sample counts reported: with a few hundred images in 288 dimensions the estimate is dominated by its bias,
  so compare FIDs at equal counts only).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dpmot.data.shapes import label_arrays
from lightning_dpmot.data.shapes_render import MAX_OBJECTS, NUM_CELLS, SceneArrays, relation_from_cells, render_scenes
from lightning_dpmot.metrics.frechet import feature_statistics, frechet_distance
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier

#: Caption-accuracy keys reported (exact, then per attribute), each as in
#: :func:`~lightning_dpmot.metrics.shapes_classifier.scene_accuracy`.
ACCURACY_KEYS = ("exact", "count", "relation", "shape", "colour", "size")


def label_targets(labels: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    """Labels (N) -> ``{"objects": (N, 3, 3), "num_objects": (N,), "relation": (N,)}`` int64 (reading order)."""
    if not labels:
        raise ValueError("label_targets needs at least one label")
    arrays = [label_arrays(label) for label in labels]
    return {
        "objects": torch.from_numpy(np.stack([a[0] for a in arrays])),
        "num_objects": torch.tensor([a[1] for a in arrays], dtype=torch.long),
        "relation": torch.tensor([a[2] for a in arrays], dtype=torch.long),
    }


def _layouts() -> dict[int, np.ndarray]:
    """relation id -> (L, n) every cell tuple in reading order that expresses it."""
    out: dict[int, np.ndarray] = {}
    for n in range(1, MAX_OBJECTS + 1):
        combos = np.array(list(itertools.combinations(range(NUM_CELLS), n)), dtype=np.int64)
        padded = np.concatenate([combos, np.full((len(combos), MAX_OBJECTS - n), -1, dtype=np.int64)], axis=1)
        rel = relation_from_cells(padded)
        for r in np.unique(rel[rel >= 0]):
            out[int(r)] = combos[rel == r]
    return out


def label_scenes(labels: Sequence[dict[str, Any]], copies: int = 1, seed: int = 0) -> SceneArrays:
    """``copies`` scenes of every label (label-major: scene ``i * copies + c``), cells drawn uniformly among the
    layouts of the label's relation with ``numpy.random.default_rng(seed)``."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    targets = label_targets(labels)
    layouts = _layouts()
    rng = np.random.default_rng(seed)
    relation = targets["relation"].numpy().repeat(copies)
    cells = np.full((len(relation), MAX_OBJECTS), -1, dtype=np.int64)
    for r, table in layouts.items():
        rows = np.flatnonzero(relation == r)
        cells[rows, : table.shape[1]] = table[rng.integers(0, len(table), len(rows))]
    return SceneArrays(
        targets["objects"].numpy().repeat(copies, axis=0),
        targets["num_objects"].numpy().repeat(copies),
        relation,
        cells,
    )


class ShapesCaptionScorer:
    """Caption accuracy and FID of generated shapes images with the attribute classifier.

    Args:
        classifier: e.g. ``ShapesAttributeClassifier.for_data(resolution)`` (trained on train-split renders only).
        real_per_label: real renders per label in the FID reference.
        seed: seed of the reference layouts.
        supersample: anti-aliasing of the reference renders (the dataset's default 4).
    """

    def __init__(
        self, classifier: ShapesAttributeClassifier, real_per_label: int = 1, seed: int = 0, supersample: int = 4
    ) -> None:
        if real_per_label < 1:
            raise ValueError(f"real_per_label must be >= 1, got {real_per_label}")
        self.classifier = classifier.eval()
        self.real_per_label, self.seed, self.supersample = real_per_label, seed, supersample
        self.resolution = int(classifier.in_shape[-1])

    def _unit(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.resolution, self.resolution):
            raise ValueError(
                f"the shapes classifier takes (N, 3, {self.resolution}, {self.resolution}) images, got "
                f"{tuple(images.shape)}"
            )
        device = next(self.classifier.parameters()).device
        return ((images.detach().float().to(device) + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Images (N, 3, R, R) in [-1, 1] with their N labels -> :data:`ACCURACY_KEYS` (over all N images)."""
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        scores = self.classifier.evaluate(self._unit(images), label_targets(labels))
        return {key: scores[key] for key in ACCURACY_KEYS}

    @torch.no_grad()
    def fid(self, images: Tensor, labels: Sequence[dict[str, Any]]) -> tuple[float, int, int]:
        """``(FID, n_generated, n_real)`` of images (N, 3, R, R) in [-1, 1] against ``real_per_label`` renders of
        each of the P prompts' ``labels`` (n_real = P * real_per_label; N need not equal it)."""
        real = render_scenes(label_scenes(labels, self.real_per_label, self.seed), self.resolution, self.supersample)
        fake_feats = self.classifier(self._unit(images)).double().cpu().numpy()
        real_feats = self.classifier(self._unit(real)).double().cpu().numpy()
        value = frechet_distance(*feature_statistics(fake_feats), *feature_statistics(real_feats))
        return value, len(fake_feats), len(real_feats)


__all__ = ["ACCURACY_KEYS", "ShapesCaptionScorer", "label_scenes", "label_targets"]
