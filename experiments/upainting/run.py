"""UPainting-style ablation on the embedded shapes benchmark: none / CFG / CLIP / CFG + CLIP under three schedules.

One trained text-to-image model (part 1, ``configs/text2img/shapes.yaml``), one trained matching model that guides
(``configs/matching/shapes_guide.yaml``) and a different one that only scores (``configs/matching/shapes_judge.yaml``),
the 100 simple + 100 complex prompts of ``benchmarks/shapes_bench`` (held-out attribute pairs, English and Chinese
lines aligned). Every setting generates with the same sampler and per-sample seeds; with cross-modal guidance the
guide reads the evaluated language's line (EN or ZH: the bilingual guide), the LM always the English one.

Settings (``--settings``, all by default):

* ``none``            w = 1, no cross-modal guidance (the plain conditional model)
* ``cfg``             w = ``--cfg-scale``
* ``clip``            w = 1 and cross-modal guidance, constant s
* ``cfg_clip``        CFG + cross-modal guidance, constant s
* ``cfg_clip_early``  CFG + cross-modal guidance only for tau in [0.5, 1] (the first half of the trajectory)
* ``cfg_clip_decay``  CFG + cross-modal guidance decaying linearly from 2 s at tau = 1 to 0 at tau = 0
* ``cfg_clip_late``   CFG + cross-modal guidance for tau in [0, 0.8] (Paddle UPainting: no guidance in the first 20 %)

Writes ``<out>/results.csv`` (one row per setting x split x language: caption accuracy exact and per attribute,
judge CLIP score, classifier-feature FID with counts, seconds per image, peak memory) and ``<out>/<setting>/``
(grids per split and language, prompts.csv). Prints a summary table.

    OMP_NUM_THREADS=1 python experiments/upainting/run.py --ckpt <t2i .ckpt> --guide <guide .ckpt> \\
        --judge <judge .ckpt> --out experiments/upainting/results [--max-prompts 100] [--k 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_dpmot.data.prompt_sets import read_prompt_set
from lightning_dpmot.diffusion import CrossModalSpec, CutoutSpec, GuidanceSpec, GuideModel, Linear, Window
from lightning_dpmot.metrics.clip_score import ClipScorer
from lightning_dpmot.metrics.prompt_set_eval import evaluate_prompt_set
from lightning_dpmot.metrics.shapes_captions import ShapesCaptionScorer
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier
from lightning_dpmot.models.dpm_ot import load_diffusion_module
from lightning_dpmot.nets.matching import load_matching_model
from lightning_dpmot.sampling.spec import SamplerSpec

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("none", "cfg", "clip", "cfg_clip", "cfg_clip_early", "cfg_clip_decay", "cfg_clip_late")


def guidance_for(name: str, args: argparse.Namespace) -> GuidanceSpec:
    """The guidance of one setting (the schedules of the module docstring)."""
    w = 1.0 if name in ("none", "clip") else args.cfg_scale
    if name in ("none", "cfg"):
        return GuidanceSpec(scale=w)
    s = args.clip_scale
    scale = {
        "clip": s,
        "cfg_clip": s,
        "cfg_clip_early": Window(s, tau_min=0.5, tau_max=1.0),
        "cfg_clip_decay": Linear(start=2 * s, end=0.0),
        "cfg_clip_late": Window(s, tau_min=0.0, tau_max=0.8),
    }[name]
    cross = CrossModalSpec(
        guides=[GuideModel(args.guide, text_key="caption_en")],
        scale=scale,
        cutouts=CutoutSpec(overview=args.overview, inner=args.inner),
        clamp_rms=args.clamp_rms,
        range_weight=args.range_weight,
    )
    return GuidanceSpec(scale=w, cross_modal=cross)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="text-to-image checkpoint (EMA weights are used)")
    parser.add_argument("--guide", required=True, help="matching model that guides")
    parser.add_argument("--judge", required=True, help="a different matching model that only scores")
    parser.add_argument("--out", required=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--prompts", default=str(ROOT / "benchmarks" / "shapes_bench"))
    parser.add_argument("--max-prompts", type=int, default=None, help="first n prompts of each split")
    parser.add_argument("--k", type=int, default=1, help="images per prompt")
    parser.add_argument("--steps", type=int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--clip-scale", type=float, default=10.0)
    parser.add_argument("--clamp-rms", type=float, default=None, help="RMS cap of s * g (default: none)")
    parser.add_argument("--range-weight", type=float, default=0.03)
    parser.add_argument("--overview", type=int, default=2)
    parser.add_argument("--inner", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    if Path(args.guide).resolve() == Path(args.judge).resolve():
        raise SystemExit("the guide may never be the judge: give two different matching models")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = load_diffusion_module(args.ckpt).eval()
    judge = ClipScorer(load_matching_model(args.judge), name=Path(args.judge).name)
    classifier = ShapesAttributeClassifier.for_data(int(module.data_shape[-1]))
    captions = ShapesCaptionScorer(classifier)
    prompt_set = read_prompt_set(args.prompts, max_prompts=args.max_prompts)
    sampler = SamplerSpec(name="heun", num_steps=args.steps)
    rows: list[dict[str, Any]] = []
    for name in args.settings:
        start = time.perf_counter()
        rows += evaluate_prompt_set(
            module,
            prompt_set,
            k=args.k,
            batch_size=args.batch_size,
            sampler=sampler,
            guidance=guidance_for(name, args),
            scorer=judge,
            caption_scorer=captions,
            out_dir=out / name,
            extra={"setting": name},
            log=lambda line, n=name: print(f"[{n}] {line}", flush=True),
        )
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
        columns = list(rows[0])
        with open(out / "results.csv", "w", newline="") as f:  # rewritten after every setting
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    run = {k: v for k, v in vars(args).items()}
    run["sampler"] = repr(sampler)
    run["torch_threads"] = torch.get_num_threads()
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(f"\n{'setting':<16} {'split':<14} {'lang':<8} {'exact':>6} {'clip':>6} {'fid':>8} {'s/img':>6}")
    for r in rows:
        print(
            f"{r['setting']:<16} {r['split']:<14} {r['language']:<8} {r.get('exact') or 0:>6.3f} "
            f"{r.get('clip_score') or 0:>6.2f} {r.get('fid') or 0:>8.1f} {r['seconds_per_image']:>6.2f}"
        )


if __name__ == "__main__":
    main()
