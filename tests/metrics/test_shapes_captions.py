"""Labels -> classifier targets and real renders (the FID reference of labelled prompt sets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dpmot.data.shapes import prompt_records, scene_label
from lightning_dpmot.data.shapes_render import relation_from_cells, render_scenes, sample_scenes
from lightning_dpmot.metrics.shapes_captions import ShapesCaptionScorer, label_scenes, label_targets
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier


@pytest.fixture(scope="module")
def scenes():
    return sample_scenes(0, "val", np.arange(600))


def test_targets_are_the_dataset_arrays(scenes) -> None:
    labels = [r["label"] for r in prompt_records(scenes)]
    targets = label_targets(labels)
    assert np.array_equal(targets["objects"].numpy(), scenes.objects)
    assert np.array_equal(targets["num_objects"].numpy(), scenes.num_objects)
    assert np.array_equal(targets["relation"].numpy(), scenes.relation)


def test_label_scenes_express_their_labels_on_the_datasets_layouts(scenes) -> None:
    labels = [r["label"] for r in prompt_records(scenes)]
    laid = label_scenes(labels, copies=2, seed=3)
    assert len(laid) == 2 * len(labels)
    for i in range(len(laid)):
        assert scene_label(laid.objects[i], int(laid.num_objects[i]), int(laid.relation[i])) == labels[i // 2]
    assert np.array_equal(relation_from_cells(laid.cells), laid.relation)
    # the layouts drawn are the dataset's own layouts of each relation (all of them, with enough scenes)
    for rel in range(4):
        ours = {tuple(c) for c in laid.cells[laid.relation == rel]}
        theirs = {tuple(c) for c in scenes.cells[scenes.relation == rel]}
        assert ours == theirs, rel
    again = label_scenes(labels, copies=2, seed=3)
    assert np.array_equal(again.cells, laid.cells)


def test_fid_of_the_reference_itself_is_zero_and_counts_are_reported(scenes) -> None:
    labels = [r["label"] for r in prompt_records(scenes.take(np.arange(40)))]
    torch.manual_seed(0)
    scorer = ShapesCaptionScorer(ShapesAttributeClassifier(in_shape=(3, 16, 16)), real_per_label=2, seed=5)
    real = render_scenes(label_scenes(labels, 2, seed=5), 16)
    value, n_gen, n_real = scorer.fid(real, labels)
    assert (n_gen, n_real) == (80, 80) and value == pytest.approx(0.0, abs=1e-6)
    other, _, _ = scorer.fid(render_scenes(label_scenes(labels, 2, seed=6), 16), labels)
    assert other > 1e-3
    acc = scorer.accuracy(real[::2], labels)
    assert set(acc) == {"exact", "count", "relation", "shape", "colour", "size"}
    with pytest.raises(ValueError, match=r"takes \(N, 3, 16, 16\) images"):
        scorer.fid(real[:, :, :8, :8], labels)
