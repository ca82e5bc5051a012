"""Shapes attribute classifier: accuracy on held-out real renders, decoding and scoring rules, caching, features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpmot.data.shapes_render import render_scenes, sample_scenes
from lightning_dpmot.metrics import shapes_classifier as sc
from lightning_dpmot.metrics.shapes_classifier import (
    EMPTY,
    ShapesAttributeClassifier,
    cell_targets,
    decode_cells,
    scene_accuracy,
)

# A small budget without shift augmentation (about 8 s on one core; 0.999 exact on held-out renders). The default
# budget (20,000 renders, 3 epochs, +-1 px shifts) reaches 1.000 at 16 and 32 px (benchmarks/shapes_bench).
SMALL = {"num_train": 3000, "epochs": 2, "max_shift": 0}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("shapes-classifier")


@pytest.fixture(scope="module")
def model(cache_dir: Path) -> ShapesAttributeClassifier:
    return ShapesAttributeClassifier.for_data(16, cache_dir=cache_dir, **SMALL)


def _renders(split: str, n: int, resolution: int = 16) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = sample_scenes(0, split, np.arange(n))
    target = {k: torch.from_numpy(getattr(scenes, k)) for k in ("objects", "num_objects", "relation")}
    return (render_scenes(scenes, resolution) + 1) / 2, target


def test_exact_accuracy_on_heldout_renders(model: ShapesAttributeClassifier) -> None:
    x, target = _renders("heldout", 600)  # combinations the classifier never saw
    scores = model.evaluate(x, target)
    assert scores["exact/simple"] >= 0.97 and scores["exact/complex"] >= 0.95, scores
    assert scores["n/simple"] + scores["n/complex"] == 600
    assert min(scores[k] for k in ("shape", "colour", "size", "relation", "count")) >= 0.97
    untrained = ShapesAttributeClassifier(in_shape=(3, 16, 16)).eval()
    assert untrained.evaluate(x, target)["exact"] < 0.05  # the threshold separates a broken classifier


def test_predicted_scenes_use_reading_order_and_cells(model: ShapesAttributeClassifier) -> None:
    scenes = sample_scenes(3, "val", np.arange(64))
    pred = model.predict_scenes((render_scenes(scenes, 16) + 1) / 2)
    agree = (pred["cells"] == torch.from_numpy(scenes.cells)).all(1)
    assert float(agree.float().mean()) >= 0.95
    assert set(pred) == {"objects", "num_objects", "relation", "cells"} and pred["objects"].shape == (64, 3, 3)


def test_decode_cells_reading_order_and_invalid_layouts() -> None:
    shape = torch.full((4, 9), EMPTY)
    colour, size = torch.zeros(4, 9, dtype=torch.long), torch.ones(4, 9, dtype=torch.long)
    shape[0, [5, 3]] = torch.tensor([2, 1])  # middle row: cell 3 (circle) is left of cell 5 (triangle)
    shape[1, [0, 4]] = 0  # diagonal: no relation of ours
    shape[2, [1, 4, 7]] = 3  # middle column: between
    shape[3, [0, 1, 2, 3]] = 0  # four objects
    d = decode_cells(shape, colour, size)
    assert d["objects"][0].tolist() == [[1, 0, 1], [2, 0, 1], [-1, -1, -1]] and d["cells"][0].tolist() == [3, 5, -1]
    assert d["relation"].tolist() == [1, -1, 3, -1] and d["num_objects"].tolist() == [2, 2, 3, 4]


def test_scene_accuracy_counts_each_attribute() -> None:
    target = {
        "objects": torch.tensor([[[0, 1, 0], [-1, -1, -1], [-1, -1, -1]], [[1, 2, 1], [2, 3, 0], [-1, -1, -1]]]),
        "num_objects": torch.tensor([1, 2]),
        "relation": torch.tensor([0, 1]),
    }
    pred = {k: v.clone() for k, v in target.items()}
    pred["objects"][1, 1, 1] = 5  # wrong colour of the complex scene's second object
    s = scene_accuracy(pred, target)
    assert s["exact"] == 0.5 and s["exact/simple"] == 1.0 and s["exact/complex"] == 0.0
    assert s["colour"] == pytest.approx(2 / 3) and s["shape"] == 1.0 and s["colour/complex"] == 0.5
    pred["relation"][1] = 2
    assert scene_accuracy(pred, target)["relation/complex"] == 0.0
    only_simple = scene_accuracy({k: v[:1] for k, v in pred.items()}, {k: v[:1] for k, v in target.items()})
    assert "exact/complex" not in only_simple and only_simple["n/complex"] == 0


def test_cache_hit_loads_the_same_classifier(
    model: ShapesAttributeClassifier, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = list(cache_dir.glob("shapes-classifier-*.pt"))
    assert [f.stem for f in files] == [model.name]

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(ShapesAttributeClassifier, "fit", classmethod(no_fit))
    again = ShapesAttributeClassifier.for_data(16, cache_dir=cache_dir, **SMALL)
    assert isinstance(again, ShapesAttributeClassifier) and again.name == model.name
    x, _ = _renders("val", 32)
    assert torch.equal(again.logits(x), model.logits(x))


def test_features_for_fid(model: ShapesAttributeClassifier) -> None:
    x, _ = _renders("val", 8)
    features = model(x)
    assert features.shape == (8, model.num_features) == (8, 288) and torch.isfinite(features).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(x * 2 - 1)


def test_training_is_deterministic_and_validates_arguments() -> None:
    scenes = sample_scenes(0, "train", np.arange(64))
    x, t = render_scenes(scenes, 16), cell_targets(scenes)
    a = ShapesAttributeClassifier.fit(x, t, epochs=1)
    b = ShapesAttributeClassifier.fit(x, t, epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.name == b.name and a.name.startswith("shapes-classifier-")
    assert t.shape == (64, 9, 3) and int((t[..., 0] != EMPTY).sum()) == int(scenes.num_objects.sum())
    with pytest.raises(ValueError, match="unknown shapes-classifier hyperparameter"):
        ShapesAttributeClassifier.fit(x, t, epoch=1)
    with pytest.raises(ValueError, match="targets"):
        ShapesAttributeClassifier.fit(x, t[:, :4])
    with pytest.raises(ValueError, match="num_train"):
        ShapesAttributeClassifier.for_data(16, num_train=0)
    assert sc.DEFAULT_SHAPES_HPARAMS["num_train"] > SMALL["num_train"]
