"""Top-1 retrieval of trained matching models on held-out renders of the embedded shapes benchmark.

For each checkpoint (a ``ContrastiveMatchingModule`` ``.ckpt`` or a local Hugging Face CLIP directory, read by
:func:`~lightning_dpmot.nets.matching.load_matching_model`) and each split of ``benchmarks/shapes_bench``
(``simple_scene``, ``complex_scene``: 100 prompts each, every one naming a (shape, colour) pair never seen in
training), the scene behind each prompt is rendered (the benchmark's own rule: the first 100 simple and 100 complex
scenes of the held-out split, data seed 2022; checked against the label files) and scored:

- ``i2t``: image -> text top-1 among the 100 prompts of the same split, per language (English, Chinese); a retrieved
  prompt identical to the image's own counts as correct (simple prompts repeat: 8 distinct);
- ``t2i``: text -> image top-1 among the 100 renders (an image whose prompt is identical counts);
- ``chance_i2t``: the i2t accuracy of a random ranking (mean share of identical prompts).

``--seen`` adds the same measurement on the first 100 simple + 100 complex scenes of the validation split (seen
(shape, colour) pairs; data seed 0), for comparison.

    OMP_NUM_THREADS=1 python experiments/upainting/matcher_retrieval.py \\
        --ckpt /tmp/matchers/guide/.../last.ckpt /tmp/matchers/judge/.../last.ckpt --out retrieval.csv --seen
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_dpmot.data.shapes import (
    BENCHMARK_SEED,
    BENCHMARK_SIZE,
    SHAPES_RESOLUTIONS,
    prompt_records,
    read_benchmark,
)
from lightning_dpmot.data.shapes_render import render_scenes, sample_scenes
from lightning_dpmot.models.matching import retrieval_accuracy
from lightning_dpmot.nets.matching import load_matching_model

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("model", "set", "split", "lang", "n", "distinct", "i2t", "t2i", "chance_i2t")


def first_scenes(seed: int, split: str, per_group: int, pool: int) -> dict[str, Any]:
    """``{"simple_scene": scenes, "complex_scene": scenes}``: the first ``per_group`` of each kind in ``split``."""
    scenes = sample_scenes(seed, split, np.arange(pool))
    simple = np.flatnonzero(scenes.num_objects == 1)[:per_group]
    complex_ = np.flatnonzero(scenes.num_objects > 1)[:per_group]
    if len(simple) < per_group or len(complex_) < per_group:
        raise ValueError(f"the pool of {pool} {split} scenes has too few simple or complex scenes")
    return {"simple_scene": scenes.take(simple), "complex_scene": scenes.take(complex_)}


def evaluation_sets(resolution: int, seen: bool) -> dict[str, dict[str, tuple[torch.Tensor, list[dict[str, Any]]]]]:
    """``{set: {split: (images (100, 3, R, R) in [-1, 1], prompt records)}}``."""
    bench = read_benchmark(ROOT / "benchmarks" / "shapes_bench")
    scenes = first_scenes(BENCHMARK_SEED, "heldout", BENCHMARK_SIZE, 40 * BENCHMARK_SIZE)
    out: dict[str, dict[str, tuple[torch.Tensor, list[dict[str, Any]]]]] = {"benchmark": {}}
    for split, records in bench.items():
        if [r["label"] for r in prompt_records(scenes[split])] != [r["label"] for r in records]:
            raise RuntimeError(f"benchmark {split}: the label files do not match the held-out scenes")
        out["benchmark"][split] = (render_scenes(scenes[split], resolution), records)
    if seen:
        val = first_scenes(0, "val", BENCHMARK_SIZE, 40 * BENCHMARK_SIZE)  # the DataModule's val split
        out["val_seen"] = {s: (render_scenes(v, resolution), prompt_records(v)) for s, v in val.items()}
    return out


def evaluate(source: str, name: str, sets: dict[str, Any]) -> list[dict[str, Any]]:
    model = load_matching_model(source)
    rows = []
    for set_name, splits in sets.items():
        for split, (images, records) in splits.items():
            for lang in ("en", "zh"):
                texts = [r[f"caption_{lang}"] for r in records]
                acc = retrieval_accuracy(model, images, texts)
                rows.append(
                    {
                        "model": name,
                        "set": set_name,
                        "split": split.removesuffix("_scene"),
                        "lang": lang,
                        "n": len(texts),
                        "distinct": acc["num_distinct"],
                        "i2t": round(acc["i2t"], 4),
                        "t2i": round(acc["t2i"], 4),
                        "chance_i2t": round(acc["chance_i2t"], 4),
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", nargs="+", required=True, help="checkpoints (.ckpt) or local HF directories")
    parser.add_argument("--name", nargs="*", default=None, help="a name per --ckpt (default: the run folder)")
    parser.add_argument("--out", type=Path, required=True, help="CSV file to write")
    parser.add_argument("--resolution", type=int, default=16, choices=SHAPES_RESOLUTIONS, help="render size")
    parser.add_argument("--seen", action="store_true", help="also score 200 validation-split scenes (seen pairs)")
    args = parser.parse_args(argv)
    names = args.name or [
        Path(c).parent.parent.parent.name if Path(c).suffix == ".ckpt" else Path(c).name for c in args.ckpt
    ]
    if len(names) != len(args.ckpt):
        parser.error("give one --name per --ckpt")
    torch.manual_seed(0)
    sets = evaluation_sets(args.resolution, args.seen)
    rows = []
    for source, name in zip(args.ckpt, names):
        start = time.perf_counter()
        rows += evaluate(source, name, sets)
        print(f"{name}: scored in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    writer = csv.DictWriter(sys.stdout, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
