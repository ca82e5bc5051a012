"""Caption accuracy and classifier-feature FID of a trained text-to-image checkpoint vs the CFG scale.

Generates, for every CFG scale, k samples of each prompt of

* ``benchmark`` — the embedded benchmark (``benchmarks/shapes_bench``): 100 simple + 100 complex prompts from the
  **held-out** split (each names a (shape, colour) pair the training split never shows);
* ``val`` (``--num-seen``, default 50 simple + 50 complex) — prompts of the val split, whose (shape, colour) pairs
  all occur in training ("seen" combinations),

with the same per-sample seeds at every scale (seed of sample j of prompt i = i + j * P), scores them with the
attribute classifier of :mod:`lightning_dpmot.metrics.shapes_classifier` (trained on train-split renders only,
independent of the model) and writes

* ``results.csv``: one row per (split, scale, group in all/simple/complex): exact caption accuracy, count,
  relation, shape, colour, size accuracies, the held-out pair's accuracy (benchmark only), FID on the
  classifier's features against real renders of the same prompts' scenes, and the generation time;
  rows with ``scale = real`` score real renders of the same scenes (the classifier's ceiling; FID 0 by
  construction), the row ``real-floor`` is the FID of a second, disjoint set of real renders of the same split
  against them (the FID floor at this sample size: with a few hundred images in 288 dimensions the estimate is
  dominated by its bias, so compare FIDs across scales only, not with other tables);
* ``panel.png``: a few benchmark prompts (rows) x real render + CFG scales (columns), sample j = 0;
* ``panel_prompts.csv``: the prompts of the panel's rows.

The LM (all-MiniLM-L6-v2) is English-only: prompts are fed as ``caption_en``. The Chinese line of each bilingual
pair is the aligned translation of the same label, so an LM-only model has no separate Chinese score (the
bilingual matching model of part 2 reads ``caption_zh``).

    OMP_NUM_THREADS=1 python experiments/text2img/evaluate.py --ckpt runs/.../checkpoints/last.ckpt \\
        --out experiments/text2img/results
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lightning_dpmot.data.shapes import (
    BENCHMARK_SEED,
    BENCHMARK_SIZE,
    ShapesCaptionsDataModule,
    label_arrays,
    prompt_records,
    read_benchmark,
)
from lightning_dpmot.data.shapes_render import HELDOUT_PAIRS, render_scenes, sample_scenes
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.metrics.frechet import feature_statistics, frechet_distance
from lightning_dpmot.metrics.shapes_captions import label_targets
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier
from lightning_dpmot.models.dpm_ot import load_diffusion_module
from lightning_dpmot.sampling.spec import SamplerSpec

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("exact", "count", "relation", "shape", "colour", "size")


def targets_of(records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return label_targets([r["label"] for r in records])


def first_scenes(seed: int, split: str, per_group: int, skip: int = 0, pool: int = 8000):
    """The first ``per_group`` simple and ``per_group`` complex scenes of ``split`` (after skipping ``skip`` of
    each), simple first — the benchmark's own rule (``make_prompts.py``) for split = heldout, seed 2022."""
    scenes = sample_scenes(seed, split, np.arange(pool))
    simple = np.flatnonzero(scenes.num_objects == 1)[skip : skip + per_group]
    complex_ = np.flatnonzero(scenes.num_objects > 1)[skip : skip + per_group]
    if len(simple) < per_group or len(complex_) < per_group:
        raise ValueError("scene pool too small")
    return scenes.take(np.concatenate([simple, complex_]))


def prompt_sets(resolution: int, num_seen: int) -> dict[str, dict[str, Any]]:
    """``{split: {"records", "real", "floor"}}``: prompts, real renders of their scenes, and renders of the next,
    disjoint scenes of the same split (FID floor)."""
    bench = read_benchmark(ROOT / "benchmarks" / "shapes_bench")
    records = bench["simple_scene"] + bench["complex_scene"]
    scenes = first_scenes(BENCHMARK_SEED, "heldout", BENCHMARK_SIZE, pool=40 * BENCHMARK_SIZE)
    if [r["label"] for r in prompt_records(scenes)] != [r["label"] for r in records]:
        raise RuntimeError("benchmark files do not match the held-out scenes they were made from")
    floor = first_scenes(BENCHMARK_SEED, "heldout", BENCHMARK_SIZE, skip=BENCHMARK_SIZE, pool=40 * BENCHMARK_SIZE)
    out = {"benchmark": {"records": records, "real": scenes, "floor": floor}}
    if num_seen:
        half = num_seen // 2
        seen = first_scenes(0, "val", half)  # the DataModule's val split (data seed 0)
        out["val"] = {"records": prompt_records(seen), "real": seen, "floor": first_scenes(0, "val", half, skip=half)}
    for entry in out.values():
        entry["real"] = render_scenes(entry["real"], resolution)
        entry["floor"] = render_scenes(entry["floor"], resolution)
    return out


def heldout_slot(records: list[dict[str, Any]]) -> torch.Tensor:
    """(P,) slot of the held-out (shape, colour) pair in each label (reading order), -1 if none."""
    out = []
    for r in records:
        objects, n, _ = label_arrays(r["label"])
        slots = [i for i in range(n) if (int(objects[i, 0]), int(objects[i, 1])) in HELDOUT_PAIRS]
        out.append(slots[0] if slots else -1)
    return torch.tensor(out)


def score(
    clf: ShapesAttributeClassifier,
    x01: torch.Tensor,
    target: dict[str, torch.Tensor],
    slot: torch.Tensor,
    reference: tuple[np.ndarray, np.ndarray],
) -> list[dict[str, Any]]:
    """Rows for all / simple / complex."""
    pred = clf.predict_scenes(x01)
    from lightning_dpmot.metrics.shapes_classifier import scene_accuracy

    acc = scene_accuracy(pred, target)
    feats = clf(x01).double().numpy()
    simple = target["num_objects"] == 1
    rows = []
    for group, mask in (("all", torch.ones_like(simple)), ("simple", simple), ("complex", ~simple)):
        key = "" if group == "all" else f"/{group}"
        row: dict[str, Any] = {"group": group, "n": int(mask.sum())}
        for m in METRICS:
            row[m] = acc.get(f"{m}{key}", float("nan"))
        has = (slot >= 0) & mask
        if has.any():  # the held-out pair's shape and colour, at its slot
            idx = torch.nonzero(has).squeeze(1)
            s = slot[idx]
            p = pred["objects"][idx, s, :2]
            t = target["objects"][idx, s, :2]
            row["novel_pair"] = float((p == t).all(1).float().mean())
            row["novel_shape"] = float((p[:, 0] == t[:, 0]).float().mean())
            row["novel_colour"] = float((p[:, 1] == t[:, 1]).float().mean())
        if group == "all":
            row["fid"] = frechet_distance(*feature_statistics(feats), *reference)
        rows.append(row)
    return rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "text2img" / "results"))
    parser.add_argument("--k", type=int, default=2, help="samples per prompt")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 7.5])
    parser.add_argument("--num-seen", type=int, default=100, help="val-split prompts (half simple); 0 = none")
    parser.add_argument("--k-seen", type=int, default=None, help="samples per val prompt (default: --k)")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--sampler", default=None, help="sampler name (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    parser.add_argument(
        "--panel-prompts",
        type=int,
        nargs="+",
        default=None,
        help="benchmark indices (default: the first 4 distinct simple and the first 4 complex prompts)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    module = load_diffusion_module(args.ckpt)
    resolution = module.data_shape[-1]
    spec = module.sampler
    if args.sampler or args.steps:
        spec = SamplerSpec(name=args.sampler or spec.name, num_steps=args.steps or spec.num_steps)
    print(f"model {type(module).__name__} at {resolution} px, sampler {spec}", flush=True)
    t0 = time.perf_counter()
    clf = ShapesAttributeClassifier.for_data(resolution)
    print(f"classifier {clf.name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    ShapesCaptionsDataModule(resolution=resolution)  # validates the resolution

    if args.panel_prompts is None:
        bench = read_benchmark(ROOT / "benchmarks" / "shapes_bench")
        firsts = {r["caption_en"]: i for i, r in reversed(list(enumerate(bench["simple_scene"])))}
        args.panel_prompts = sorted(firsts.values())[:4] + [BENCHMARK_SIZE + i for i in range(4)]
    rows: list[dict[str, Any]] = []
    panel: dict[str, torch.Tensor] = {}
    for split, entry in prompt_sets(resolution, args.num_seen).items():
        records = entry["records"]
        P = len(records)
        k = args.k if split == "benchmark" or args.k_seen is None else args.k_seen
        target_1 = targets_of(records)
        slot_1 = heldout_slot(records)
        target = {key: v.repeat(k, *([1] * (v.ndim - 1))) for key, v in target_1.items()}
        slot = slot_1.repeat(k)
        seeds = torch.arange(P * k)
        prompts = [records[i % P]["caption_en"] for i in seeds.tolist()]
        real01 = (entry["real"] + 1) / 2
        reference = feature_statistics(clf(real01).double().numpy())
        base = {"split": split, "k": k, "prompts": P, "nfe": "", "seconds": ""}
        for row in score(clf, real01, target_1, slot_1, reference):
            rows.append({**base, "scale": "real", **row})
        floor = feature_statistics(clf((entry["floor"] + 1) / 2).double().numpy())
        rows.append(
            {**base, "scale": "real-floor", "group": "all", "n": P, "fid": frechet_distance(*floor, *reference)}
        )
        if split == "benchmark":
            panel["real"] = real01[args.panel_prompts]
        for w in args.scales:
            t0 = time.perf_counter()
            xs, nfe = [], 0
            for chunk in seeds.split(args.batch_size):
                result = module.generate(
                    chunk,
                    {"caption_en": [prompts[i] for i in chunk.tolist()]},
                    spec=spec,
                    guidance=GuidanceSpec(scale=w),
                )
                xs.append(result.x)
                nfe = result.nfe
            seconds = time.perf_counter() - t0
            x01 = ((torch.cat(xs) + 1) / 2).clamp(0, 1)
            if not torch.isfinite(x01).all():
                raise RuntimeError(f"non-finite samples at scale {w}")
            for row in score(clf, x01, target, slot, reference):
                rows.append({**base, "scale": w, "nfe": nfe, "seconds": round(seconds, 1), **row})
            if split == "benchmark":
                panel[f"w={w:g}"] = x01[args.panel_prompts]
            r = rows[-3:]
            print(
                f"{split:9s} w={w:<4g} exact {r[0]['exact']:.3f} (simple {r[1]['exact']:.3f}, complex "
                f"{r[2]['exact']:.3f}) colour {r[0]['colour']:.3f} shape {r[0]['shape']:.3f} "
                f"fid {r[0]['fid']:.2f}  [{seconds:.0f} s, nfe {nfe}]",
                flush=True,
            )

    fields = [
        "split",
        "scale",
        "group",
        "n",
        "k",
        "prompts",
        *METRICS,
        "novel_pair",
        "novel_shape",
        "novel_colour",
        "fid",
        "nfe",
        "seconds",
    ]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) and k != "scale" else v) for k, v in row.items()})

    # Panel: rows = prompts, columns = real render, then the CFG scales; nearest-neighbour upscaled x4.
    cols = list(panel)
    grid = torch.stack([panel[c] for c in cols], dim=1)  # (rows, cols, 3, R, R)
    rows_n, cols_n = grid.shape[:2]
    pad = 2
    tile = resolution * 4
    canvas = np.full((rows_n * (tile + pad) + pad, cols_n * (tile + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(rows_n):
        for j in range(cols_n):
            img = grid[i, j].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
            img = img.repeat(4, 0).repeat(4, 1)
            y, x = pad + i * (tile + pad), pad + j * (tile + pad)
            canvas[y : y + tile, x : x + tile] = img
    Image.fromarray(canvas).save(out / "panel.png", optimize=True)
    bench = read_benchmark(ROOT / "benchmarks" / "shapes_bench")
    records = bench["simple_scene"] + bench["complex_scene"]
    with open(out / "panel_prompts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "benchmark_index", "caption_en", "caption_zh", "columns"])
        for r, i in enumerate(args.panel_prompts):
            writer.writerow([r, i, records[i]["caption_en"], records[i]["caption_zh"], " | ".join(cols)])
    (out / "run.json").write_text(
        json.dumps(
            {
                "ckpt": str(args.ckpt),
                "k": args.k,
                "k_seen": args.k_seen,
                "scales": args.scales,
                "sampler": str(spec),
                "classifier": clf.name,
                "num_seen": args.num_seen,
            },
            indent=1,
        )
    )
    print(f"wrote {out}/results.csv, panel.png, panel_prompts.csv", flush=True)


if __name__ == "__main__":
    main()
