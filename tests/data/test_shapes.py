"""ShapesCaptionsDataModule: captions are a function of the labels (EN/ZH round trip), determinism, exact relations
in the rendered layout, held-out pairs absent from training, the embedded benchmark files, generation API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dpmot.data.shapes import (
    ShapesCaptionsDataModule,
    benchmark_files,
    caption_from_label,
    label_arrays,
    parse_caption,
    read_benchmark,
)
from lightning_dpmot.data.shapes_render import (
    COLOUR_RGB,
    GRID,
    HELDOUT_PAIRS,
    RELATIONS,
    relation_from_cells,
    render_scenes,
    sample_scenes,
)

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "shapes_bench"


@pytest.fixture(scope="module")
def dm() -> ShapesCaptionsDataModule:
    return ShapesCaptionsDataModule(resolution=16, num_train=3000, num_val=300, num_heldout=300, batch_size=8)


def test_shapes_and_names_need_no_data() -> None:
    dm = ShapesCaptionsDataModule(resolution=32)
    assert dm.data_shape == (3, 32, 32) and dm.num_classes == 0 and dm.name == "shapes-32px"
    assert ShapesCaptionsDataModule(resolution=16, num_train=100, data_seed=3).name == "shapes-16px-n100-seed3"


def test_items_have_documented_keys_shapes_and_range(dm: ShapesCaptionsDataModule) -> None:
    batch = next(iter(DataLoader(dm.dataset("train"), batch_size=6)))
    assert batch["x"].shape == (6, 3, 16, 16) and batch["x"].dtype == torch.float32
    assert float(batch["x"].min()) == -1.0 and float(batch["x"].max()) <= 1.0
    assert batch["objects"].shape == (6, 3, 3) and batch["mention_order"].shape == (6, 3)
    assert batch["index"].tolist() == list(range(6))
    assert len(batch["caption_en"]) == len(batch["caption_zh"]) == 6
    assert torch.equal(batch["complexity"], (batch["num_objects"] > 1).long())
    assert "label" not in batch  # batch["label"] means a (B,) class id project-wide


@pytest.mark.parametrize("split", ["train", "val", "heldout"])
def test_captions_round_trip_to_labels_in_both_languages(dm: ShapesCaptionsDataModule, split: str) -> None:
    ds = dm.dataset(split)
    for i in range(0, len(ds), 7):
        item, label = ds[i], ds.label(i)
        assert parse_caption(item["caption_en"], "en") == label
        assert parse_caption(item["caption_zh"], "zh") == label
        objects, n, rel = label_arrays(label)
        assert np.array_equal(objects, item["objects"].numpy()) and n == item["num_objects"] and rel == item["relation"]


def test_caption_examples_are_proper_english_and_chinese() -> None:
    red_circle = {"shape": "circle", "colour": "red", "size": "large"}
    blue_square = {"shape": "square", "colour": "blue", "size": "small"}
    green_cross = {"shape": "cross", "colour": "green", "size": "small"}
    left = {"objects": [red_circle, blue_square], "relation": "left_of"}
    assert caption_from_label(left, "en") == "a large red circle to the left of a small blue square"
    assert caption_from_label(left, "zh") == "一个大的红色圆形在一个小的蓝色正方形的左边"
    above = {"objects": [red_circle, blue_square], "relation": "above"}
    assert caption_from_label(above, "zh") == "一个大的红色圆形在一个小的蓝色正方形的上面"
    between = {"objects": [blue_square, red_circle, green_cross], "relation": "between"}  # middle = objects[1]
    assert caption_from_label(between, "en") == "a large red circle between a small blue square and a small green cross"
    assert caption_from_label(between, "zh") == "一个大的红色圆形在一个小的蓝色正方形和一个小的绿色十字形之间"
    assert caption_from_label({"objects": [red_circle], "relation": None}, "zh") == "一个大的红色圆形"


@pytest.mark.parametrize(
    "bad",
    [
        {"objects": [], "relation": None},
        {"objects": [{"shape": "circle", "colour": "red", "size": "large"}], "relation": "above"},
        {"objects": [{"shape": "star", "colour": "red", "size": "large"}], "relation": None},
    ],
)
def test_invalid_labels_and_captions_raise_value_error(bad: dict) -> None:
    with pytest.raises(ValueError):
        caption_from_label(bad, "en")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("a large red star", "en")
    with pytest.raises(ValueError, match="lang"):
        parse_caption("a large red circle", "fr")  # type: ignore[arg-type]


def test_items_are_deterministic_and_independent_of_split_size() -> None:
    a = ShapesCaptionsDataModule(resolution=16, num_train=200).dataset("train")
    b = ShapesCaptionsDataModule(resolution=16, num_train=500).dataset("train")
    for i in (0, 17, 199):
        assert torch.equal(a[i]["x"], b[i]["x"]) and a[i]["caption_zh"] == b[i]["caption_zh"]
    c = ShapesCaptionsDataModule(resolution=16, num_train=200, data_seed=1).dataset("train")
    assert not all(torch.equal(a[i]["objects"], c[i]["objects"]) for i in range(20))
    # batched (__getitems__) and single-item access render the same pixels
    batch = next(iter(DataLoader(a, batch_size=5)))
    assert torch.equal(batch["x"][3], a[3]["x"])


def test_heldout_pairs_never_in_train_or_val_and_always_in_heldout(dm: ShapesCaptionsDataModule) -> None:
    held = {tuple(p) for p in HELDOUT_PAIRS}
    for split in ("train", "val", "heldout"):
        s = sample_scenes(0, split, np.arange(20_000 if split == "train" else 3000))
        pairs = [{(int(a), int(b)) for a, b, _ in obj if a >= 0} for obj in s.objects]
        with_held = np.array([len(p & held) for p in pairs])
        if split == "heldout":
            assert (with_held == 1).all()
        else:
            assert (with_held == 0).all()
            seen = set().union(*pairs)
            assert len(seen) == 32 - len(held)  # every other pair does occur
    assert 0.4 < float(dm.scenes("train").relation.astype(bool).mean()) < 0.6


def test_relations_hold_in_the_rendered_layout() -> None:
    s = sample_scenes(5, "train", np.arange(2000))
    assert np.array_equal(relation_from_cells(s.cells), s.relation)
    x = render_scenes(s, 32)
    for i in range(0, 2000, 50):  # each object's colour sits at its own cell centre, in reading order
        cells = [int(c) for c in s.cells[i] if c >= 0]
        assert cells == sorted(cells)
        for k, cell in enumerate(cells):
            r, c = cell // GRID, cell % GRID
            px = x[i, :, int((r + 0.5) * 32 / 3), int((c + 0.5) * 32 / 3)]
            if s.objects[i, k, 0] != 2:  # a triangle's centre pixel may sit on its slanted edge
                assert torch.allclose((px + 1) / 2, torch.from_numpy(COLOUR_RGB[s.objects[i, k, 1]]), atol=1e-6)
    counts = np.bincount(s.relation, minlength=len(RELATIONS))
    assert (counts > 0).all()


def test_x_flip_and_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="x_flip"):
        ShapesCaptionsDataModule(x_flip=True)
    with pytest.raises(ValueError, match="resolution"):
        ShapesCaptionsDataModule(resolution=24)
    with pytest.raises(ValueError, match="num_val"):
        ShapesCaptionsDataModule(num_val=0)
    with pytest.raises(ValueError, match="split"):
        ShapesCaptionsDataModule().scenes("test")  # type: ignore[arg-type]


def test_generation_conditions_index_the_prompt_list(dm: ShapesCaptionsDataModule) -> None:
    prompts = dm.prompts()
    assert len(prompts) == 200 and [p["complexity"] for p in prompts] == [0] * 100 + [1] * 100
    assert set(prompts[0]) == {"caption_en", "caption_zh", "label", "complexity"}
    cond = dm.generation_conditions(torch.tensor([0, 5, 199, 200, 401]))
    assert set(cond) == {"prompt_index", "caption_en", "caption_zh"}
    assert cond["prompt_index"].tolist() == [0, 5, 199, 0, 1]
    assert cond["caption_en"] == [prompts[i]["caption_en"] for i in (0, 5, 199, 0, 1)]
    assert cond["caption_zh"][2] == prompts[199]["caption_zh"]
    batch = next(iter(dm.predict_dataloader()))
    assert torch.equal(batch["prompt_index"], batch["seed"] % 200)
    assert batch["caption_en"] == [prompts[i]["caption_en"] for i in batch["prompt_index"].tolist()]
    val = ShapesCaptionsDataModule(resolution=16, num_val=30, predict_prompts="val")
    assert val.generation_conditions(torch.tensor([31]))["prompt_index"].tolist() == [1]
    assert val.prompts("val")[1]["label"] == val.dataset("val").label(1)


def test_ot_pool_stacks_tensor_entries_and_keeps_captions(dm: ShapesCaptionsDataModule) -> None:
    pool = dm.draw_pool(16, rank=0, pool_index=0)
    assert pool["x"].shape == (16, 3, 16, 16) and pool["objects"].shape == (16, 3, 3)
    train = dm.dataset("train")
    assert pool["caption_en"] == [train[int(i)]["caption_en"] for i in pool["index"]]  # the pool's own prompts


def test_committed_benchmark_equals_the_generator_and_parses(tmp_path: Path) -> None:
    files = benchmark_files()
    for rel, text in files.items():
        assert (BENCH / rel).read_text(encoding="utf-8") == text, f"{rel} differs: rerun make_prompts.py"
    bench = read_benchmark(BENCH)
    held = {(s, c) for s, c in HELDOUT_PAIRS}
    for name, complexity in (("simple_scene", 0), ("complex_scene", 1)):
        records = bench[name]
        assert len(records) == 100 and {r["complexity"] for r in records} == {complexity}
        for r in records:
            objects, n, _ = label_arrays(r["label"])
            assert sum((int(a), int(b)) in held for a, b, _ in objects[:n]) == 1  # from the held-out split
    lines = (BENCH / "labels" / "complex_scene.jsonl").read_text(encoding="utf-8").splitlines()
    first_zh = (BENCH / "Chinese" / "complex_scene.txt").read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(lines[0]) == parse_caption(first_zh, "zh")
    # a misaligned copy is refused with the file named
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text if rel != "Chinese/simple_scene.txt" else text + "一个大的红色圆形\n", "utf-8")
    with pytest.raises(ValueError, match="simple_scene has 100 English, 101 Chinese"):
        read_benchmark(tmp_path)


def test_training_loader_yields_captioned_batches(dm: ShapesCaptionsDataModule) -> None:
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (8, 3, 16, 16) and len(batch["caption_en"]) == 8
    ds = dm.dataset("train")
    assert [ds.label(int(i)) for i in batch["index"]] == [parse_caption(c, "en") for c in batch["caption_en"]]
