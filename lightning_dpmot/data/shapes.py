"""Embedded captioned dataset for text-to-image: coloured shapes with aligned English and Chinese captions.

Scenes (layout, sampling, rendering: :mod:`.shapes_render`) are generated on the fly from (data seed, split,
index): no files. Captions are a function of the structured label (:func:`caption_from_label`) and parse back to
it (:func:`parse_caption`)::

    simple   "a large red circle"                                 "一个大的红色圆形"
    left_of  "a large red circle to the left of a small blue square"
             "一个大的红色圆形在一个小的蓝色正方形的左边"
    above    "a small green cross above a large white triangle"   "一个小的绿色十字形在一个大的白色三角形的上面"
    between  "a large red circle between a small blue square and a small green cross"
             "一个大的红色圆形在一个小的蓝色正方形和一个小的绿色十字形之间"

The pure-Python label (:func:`scene_label`, :func:`parse_caption`) is
``{"objects": [{"shape": "circle", "colour": "red", "size": "large"}, ...], "relation": "left_of"}`` with the
objects in reading order (left to right / top to bottom; for ``between`` the middle one is ``objects[1]``) and
``relation`` one of ``None``, ``"left_of"``, ``"above"``, ``"between"``.

Dataset items (collated by Lightning's default collate; strings become lists)::

    x            (3, R, R) float32 in [-1, 1]
    index        () int64
    caption_en   str
    caption_zh   str
    objects      (3, 3) int64   (shape, colour, size) per slot in reading order, -1 padded
    num_objects  () int64       1..3
    relation     () int64       index into RELATIONS (0 = none)
    mention_order (3,) int64    slots in the order the caption mentions them, -1 padded
    cells        (3,) int64     grid cell (3 * row + col) per slot, -1 padded
    complexity   () int64       0 = simple (one object), 1 = complex

The structured label is kept in these flat entries, not under ``"label"``: across the project ``batch["label"]`` is
a (B,) class id (class conditioning, per-class OT coupling, classifier features), and this data has no classes.

Splits: ``train``, ``val`` (same distribution, independent scenes) and ``heldout`` (scenes containing a
(shape, colour) pair that never occurs in train/val, see :data:`~.shapes_render.HELDOUT_PAIRS`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule
from lightning_dpmot.data.prompts import read_prompt_files
from lightning_dpmot.data.shapes_render import (
    COLOURS,
    MAX_OBJECTS,
    MENTION_ORDER,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneArrays,
    render_scenes,
    sample_scenes,
)

Lang = Literal["en", "zh"]
ShapesSplit = Literal["train", "val", "heldout"]
SHAPES_RESOLUTIONS = (16, 32)
#: Seed and sizes of the embedded benchmark (``benchmarks/shapes_bench``), drawn from the held-out split.
BENCHMARK_SEED = 2022
BENCHMARK_SIZE = 100
BENCHMARK_FILES = ("simple_scene", "complex_scene")

_ZH_SHAPES = ("正方形", "圆形", "三角形", "十字形")
_ZH_COLOURS = ("红色", "绿色", "蓝色", "黄色", "紫色", "橙色", "白色", "青色")
_ZH_SIZES = ("小的", "大的")
_EN_RELATION = {"left_of": "to the left of", "above": "above"}
_ZH_RELATION = {"left_of": "的左边", "above": "的上面"}


def scene_label(objects: np.ndarray | Tensor, num_objects: int, relation: int) -> dict[str, Any]:
    """Pure-Python label of one scene from its arrays: ``objects`` (3, 3), ``num_objects``, ``relation`` id."""
    obj = np.asarray(objects, dtype=np.int64)
    return {
        "objects": [
            {"shape": SHAPES[s], "colour": COLOURS[c], "size": SIZES[z]} for s, c, z in obj[: int(num_objects)]
        ],
        "relation": None if int(relation) == 0 else RELATIONS[int(relation)],
    }


def label_arrays(label: dict[str, Any]) -> tuple[np.ndarray, int, int]:
    """Inverse of :func:`scene_label`: ``(objects (3, 3) int64 -1 padded, num_objects, relation id)``."""
    objects = label.get("objects")
    relation = label.get("relation")
    if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"label['objects'] must be a list of 1-{MAX_OBJECTS} objects, got {objects!r}")
    allowed = {1: (None,), 2: ("left_of", "above"), 3: ("between",)}[len(objects)]
    if relation not in allowed:
        raise ValueError(f"relation {relation!r} does not fit {len(objects)} object(s); expected one of {allowed}")
    out = np.full((MAX_OBJECTS, 3), -1, dtype=np.int64)
    for i, obj in enumerate(objects):
        try:
            out[i] = (SHAPES.index(obj["shape"]), COLOURS.index(obj["colour"]), SIZES.index(obj["size"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"object {i} of the label is not a valid shape/colour/size dict: {obj!r}") from None
    return out, len(objects), RELATIONS.index(relation or "none")


def _phrase(obj: dict[str, str], lang: Lang) -> str:
    if lang == "en":
        return f"a {obj['size']} {obj['colour']} {obj['shape']}"
    return (
        f"一个{_ZH_SIZES[SIZES.index(obj['size'])]}{_ZH_COLOURS[COLOURS.index(obj['colour'])]}"
        f"{_ZH_SHAPES[SHAPES.index(obj['shape'])]}"
    )


def caption_from_label(label: dict[str, Any], lang: Lang = "en") -> str:
    """The caption of a pure-Python label in English (``"en"``) or Chinese (``"zh"``); see the module docstring."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    objects, n, relation = label_arrays(label)
    p = [_phrase(o, lang) for o in label["objects"]]
    rel = RELATIONS[relation]
    if n == 1:
        return p[0]
    if rel == "between":
        return f"{p[1]} between {p[0]} and {p[2]}" if lang == "en" else f"{p[1]}在{p[0]}和{p[2]}之间"
    return f"{p[0]} {_EN_RELATION[rel]} {p[1]}" if lang == "en" else f"{p[0]}在{p[1]}{_ZH_RELATION[rel]}"


@functools.lru_cache(maxsize=2)
def _caption_regex(lang: Lang) -> re.Pattern[str]:
    if lang == "en":
        obj = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
        rel = "|".join(_EN_RELATION.values())
        pattern = rf"{obj}(?: (?:({rel}) {obj}|between {obj} and {obj}))?"
    else:
        obj = rf"一个({'|'.join(_ZH_SIZES)})({'|'.join(_ZH_COLOURS)})({'|'.join(_ZH_SHAPES)})"
        rel = "|".join(_ZH_RELATION.values())
        pattern = rf"{obj}(?:在(?:{obj}({rel})|{obj}和{obj}之间))?"
    return re.compile(pattern)


def parse_caption(caption: str, lang: Lang = "en") -> dict[str, Any]:
    """Parse a caption of this dataset's grammar back to its pure-Python label (``parse_caption(caption_from_label(
    label, lang), lang) == label``). Raises ValueError naming the caption if it does not parse."""
    if lang not in ("en", "zh"):
        raise ValueError(f"lang must be 'en' or 'zh', got {lang!r}")
    match = _caption_regex(lang).fullmatch(caption.strip())
    if match is None:
        raise ValueError(f"cannot parse {lang} caption {caption!r}")
    g = match.groups()
    vocab = (SIZES, COLOURS, SHAPES) if lang == "en" else (_ZH_SIZES, _ZH_COLOURS, _ZH_SHAPES)

    def obj(i: int) -> dict[str, str]:
        size, colour, shape = (v.index(t) for v, t in zip(vocab, g[i : i + 3]))
        return {"shape": SHAPES[shape], "colour": COLOURS[colour], "size": SIZES[size]}

    if lang == "en":  # groups: obj0 | relation, obj1 | between obj_a, obj_b
        if g[3] is not None:
            rel = next(k for k, v in _EN_RELATION.items() if v == g[3])
            return {"objects": [obj(0), obj(4)], "relation": rel}
        if g[7] is not None:
            return {"objects": [obj(7), obj(0), obj(10)], "relation": "between"}
    else:  # groups: obj0 | obj1, relation | between obj_a, obj_b
        if g[6] is not None:
            rel = next(k for k, v in _ZH_RELATION.items() if v == g[6])
            return {"objects": [obj(0), obj(3)], "relation": rel}
        if g[7] is not None:
            return {"objects": [obj(7), obj(0), obj(10)], "relation": "between"}
    return {"objects": [obj(0)], "relation": None}


class ShapesCaptionsDataset(Dataset):
    """N scenes rendered on demand (batched through ``__getitems__``); items as in the module docstring.

    Args:
        scenes: the scenes of the split.
        resolution: image side R.
        supersample: anti-aliasing sub-samples per pixel side.
    """

    def __init__(self, scenes: SceneArrays, resolution: int, supersample: int = 4) -> None:
        self.scenes, self.resolution, self.supersample = scenes, resolution, supersample

    def __len__(self) -> int:
        return len(self.scenes)

    def label(self, index: int) -> dict[str, Any]:
        """The pure-Python label of item ``index``."""
        s = self.scenes
        return scene_label(s.objects[index], int(s.num_objects[index]), int(s.relation[index]))

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a split of {len(self)} scenes")
        idx = idx % max(len(self), 1)
        s = self.scenes.take(idx)
        x = render_scenes(s, self.resolution, self.supersample)
        tensors = {
            "objects": torch.from_numpy(s.objects),
            "num_objects": torch.from_numpy(s.num_objects),
            "relation": torch.from_numpy(s.relation),
            "mention_order": torch.from_numpy(MENTION_ORDER[s.relation]),
            "cells": torch.from_numpy(s.cells),
            "complexity": torch.from_numpy((s.num_objects > 1).astype(np.int64)),
        }
        items = []
        for j, i in enumerate(idx.tolist()):
            item: dict[str, Any] = {"x": x[j], "index": torch.tensor(i, dtype=torch.long)}
            item.update({k: v[j] for k, v in tensors.items()})
            label = scene_label(s.objects[j], int(s.num_objects[j]), int(s.relation[j]))
            item["caption_en"] = caption_from_label(label, "en")
            item["caption_zh"] = caption_from_label(label, "zh")
            items.append(item)
        return items

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


def prompt_records(scenes: SceneArrays) -> list[dict[str, Any]]:
    """``[{"caption_en", "caption_zh", "label", "complexity"}]`` for the scenes, in order."""
    records = []
    for i in range(len(scenes)):
        label = scene_label(scenes.objects[i], int(scenes.num_objects[i]), int(scenes.relation[i]))
        records.append(
            {
                "caption_en": caption_from_label(label, "en"),
                "caption_zh": caption_from_label(label, "zh"),
                "label": label,
                "complexity": int(scenes.num_objects[i] > 1),
            }
        )
    return records


@functools.lru_cache(maxsize=4)
def _benchmark_scenes(seed: int, size: int) -> tuple[SceneArrays, SceneArrays]:
    pool = sample_scenes(seed, "heldout", np.arange(40 * size))
    simple, complex_ = np.flatnonzero(pool.num_objects == 1), np.flatnonzero(pool.num_objects > 1)
    if len(simple) < size or len(complex_) < size:
        raise ValueError(f"the held-out pool of {40 * size} scenes has too few simple or complex scenes")
    return pool.take(simple[:size]), pool.take(complex_[:size])


def benchmark_prompts(seed: int = BENCHMARK_SEED, size: int = BENCHMARK_SIZE) -> dict[str, list[dict[str, Any]]]:
    """The embedded benchmark: the first ``size`` simple and ``size`` complex scenes of the held-out split drawn
    with data seed ``seed``, as ``{"simple_scene": [record, ...], "complex_scene": [...]}`` (records as in
    :func:`prompt_records`). Simple held-out prompts repeat: only 8 distinct ones exist (4 pairs x 2 sizes)."""
    simple, complex_ = _benchmark_scenes(seed, size)
    return {"simple_scene": prompt_records(simple), "complex_scene": prompt_records(complex_)}


def benchmark_files(seed: int = BENCHMARK_SEED, size: int = BENCHMARK_SIZE) -> dict[str, str]:
    """The benchmark's files laid out like UniBench, ``{relative path: text}``: ``English/<name>.txt`` and
    ``Chinese/<name>.txt`` (one prompt per line, aligned) and ``labels/<name>.jsonl`` (one label per line)."""
    files = {}
    for name, records in benchmark_prompts(seed, size).items():
        files[f"English/{name}.txt"] = "".join(r["caption_en"] + "\n" for r in records)
        files[f"Chinese/{name}.txt"] = "".join(r["caption_zh"] + "\n" for r in records)
        files[f"labels/{name}.jsonl"] = "".join(
            json.dumps(r["label"], ensure_ascii=False, sort_keys=True) + "\n" for r in records
        )
    return files


def read_benchmark(root: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read a benchmark folder written by :func:`benchmark_files` (``benchmarks/shapes_bench``).

    Returns:
        ``{"simple_scene": [record, ...], "complex_scene": [...]}``, records as in :func:`prompt_records`. Raises
        ValueError naming the file when a file is missing, the line counts differ, or a line does not parse to its
        label.
    """
    root = Path(root)
    out: dict[str, list[dict[str, Any]]] = {}
    for name in BENCHMARK_FILES:
        paths = [root / "English" / f"{name}.txt", root / "Chinese" / f"{name}.txt", root / "labels" / f"{name}.jsonl"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"benchmark file(s) missing: {missing}")
        en, zh, labels = (p.read_text(encoding="utf-8").splitlines() for p in paths)
        if not len(en) == len(zh) == len(labels) or not en:
            raise ValueError(f"{root}: {name} has {len(en)} English, {len(zh)} Chinese and {len(labels)} label lines")
        records = []
        for i, (cap_en, cap_zh, line) in enumerate(zip(en, zh, labels)):
            label = json.loads(line)
            if parse_caption(cap_en, "en") != label or parse_caption(cap_zh, "zh") != label:
                raise ValueError(f"{root}: line {i + 1} of {name} does not match its label {line}")
            records.append(
                {
                    "caption_en": cap_en,
                    "caption_zh": cap_zh,
                    "label": label,
                    "complexity": int(len(label["objects"]) > 1),
                }
            )
        out[name] = records
    return out


PROMPT_LISTS = ("benchmark", "train", "val", "heldout")


class ShapesCaptionsDataModule(DiffusionDataModule):
    """Coloured shapes with aligned English/Chinese captions and structured labels, rendered on the fly.

    Batches: the items of the module docstring, collated (``x`` (B, 3, R, R), ``caption_en``/``caption_zh`` lists
    of B strings, ``objects`` (B, 3, 3), ...). ``data_shape = (3, R, R)``, ``num_classes = 0``.

    **Generation API** (what the text-to-image model generates): :meth:`prompts` returns a fixed prompt list, each
    prompt ``{"caption_en": str, "caption_zh": str, "label": dict, "complexity": 0|1}``;
    :meth:`generation_conditions` maps (B,) seeds to ``{"prompt_index": (B,) int64 = seed % len(prompts),
    "caption_en": [B], "caption_zh": [B]}`` into ``prompts(predict_prompts)``, so seeds ``0 .. k * P - 1`` generate
    every prompt k times; the model's text conditioner encodes the caption it reads. ``predict_dataloader`` yields
    ``{"seed": (B,), "prompt_index": (B,), "caption_en": [B], "caption_zh": [B]}``.

    Args:
        resolution: image side R (16 or 32).
        num_train, num_val, num_heldout: split sizes (scenes ``0 .. n - 1`` of each split).
        complex_fraction: share of complex (2-3 object) scenes.
        data_seed: seed of the scenes (the split of (shape, colour) pairs is fixed).
        predict_prompts: the prompt list of generation: ``"benchmark"`` (the embedded benchmark's 100 simple +
            100 complex held-out prompts), ``"train"``/``"val"``/``"heldout"`` (the split's scenes), or the path of
            a prompt file (one English prompt per line, for the LM).
        predict_prompts_zh: with a prompt file, an optional line-aligned file of the same prompts in Chinese.
        supersample: anti-aliasing sub-samples per pixel side (1 = aliased).
        **kwargs: loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule`; ``x_flip`` is refused
            (a mirrored image contradicts "to the left of").
    """

    def __init__(
        self,
        resolution: int = 32,
        num_train: int = 50_000,
        num_val: int = 2_000,
        num_heldout: int = 2_000,
        complex_fraction: float = 0.5,
        data_seed: int = 0,
        predict_prompts: str = "benchmark",
        predict_prompts_zh: str | None = None,
        supersample: int = 4,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("x_flip"):
            raise ValueError("x_flip must be false for ShapesCaptionsDataModule: mirroring swaps 'to the left of'")
        super().__init__(**kwargs)
        if resolution not in SHAPES_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {SHAPES_RESOLUTIONS}, got {resolution}")
        for key, n in (("num_train", num_train), ("num_val", num_val), ("num_heldout", num_heldout)):
            if n < 1:
                raise ValueError(f"{key} must be >= 1, got {n}")
        if not 0.0 <= complex_fraction <= 1.0:
            raise ValueError(f"complex_fraction must be in [0, 1], got {complex_fraction}")
        if predict_prompts in PROMPT_LISTS and predict_prompts_zh is not None:
            raise ValueError("predict_prompts_zh goes with a prompt file in predict_prompts, not a built-in list")
        if predict_prompts not in PROMPT_LISTS:
            read_prompt_files(predict_prompts, predict_prompts_zh)  # fail now: missing, empty or misaligned files
        if supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {supersample}")
        self.resolution, self.complex_fraction, self.data_seed = resolution, complex_fraction, data_seed
        self.sizes = {"train": num_train, "val": num_val, "heldout": num_heldout}
        self.predict_prompts, self.predict_prompts_zh, self.supersample = (
            predict_prompts,
            predict_prompts_zh,
            supersample,
        )
        self.data_shape = (3, resolution, resolution)
        self.num_classes = 0

    @property
    @override
    def name(self) -> str:
        """E.g. ``"shapes-32px"``; settings that change the training images are appended (``"-n20000-seed1"``)."""
        name = f"shapes-{self.resolution}px"
        if self.sizes["train"] != 50_000:
            name += f"-n{self.sizes['train']}"
        if self.complex_fraction != 0.5:
            name += f"-complex{self.complex_fraction:g}"
        if self.data_seed != 0:
            name += f"-seed{self.data_seed}"
        if self.supersample != 4:
            name += f"-ss{self.supersample}"
        return name

    def scenes(self, split: ShapesSplit) -> SceneArrays:
        """The scene arrays of ``split`` (no rendering)."""
        if split not in self.sizes:
            raise ValueError(f"split must be one of {sorted(self.sizes)}, got {split!r}")
        return sample_scenes(self.data_seed, split, np.arange(self.sizes[split]), self.complex_fraction)

    @override
    def build_dataset(self, split: ShapesSplit) -> ShapesCaptionsDataset:  # type: ignore[override]
        return ShapesCaptionsDataset(self.scenes(split), self.resolution, self.supersample)

    def prompts(self, split: str = "benchmark") -> list[dict[str, Any]]:
        """A fixed prompt list: ``"benchmark"`` = the 100 simple then 100 complex benchmark prompts, a split name =
        every scene of that split (each ``{"caption_en", "caption_zh", "label", "complexity"}``), or a prompt file
        (``{"caption_en"[, "caption_zh"]}`` per line, the aligned file ``predict_prompts_zh`` when it is the one of
        ``predict_prompts``)."""
        if split not in PROMPT_LISTS:
            return read_prompt_files(split, self.predict_prompts_zh if split == self.predict_prompts else None)
        if split == "benchmark":
            bench = benchmark_prompts()
            return bench["simple_scene"] + bench["complex_scene"]
        return prompt_records(self.scenes(split))

    @functools.cached_property
    def _num_prompts(self) -> int:
        return len(self.prompts(self.predict_prompts))

    @override
    def generation_conditions(self, seeds: Tensor) -> dict[str, Any]:
        """(B,) int64 seeds -> the prompt of each: ``{"prompt_index": (B,) int64 = seed % P, "caption_en": [B],
        "caption_zh": [B]}`` into ``prompts(predict_prompts)`` (P prompts)."""
        index = seeds.to(torch.long) % self._num_prompts
        prompts = self.prompts(self.predict_prompts)
        keys = [k for k in ("caption_en", "caption_zh") if k in prompts[0]]
        return {"prompt_index": index, **{k: [prompts[i][k] for i in index.tolist()] for k in keys}}
