"""Train (or load from the cache) the shapes attribute classifier and print its accuracy on real renders.

    OMP_NUM_THREADS=1 python benchmarks/shapes_bench/classifier_accuracy.py --resolution 16 [--cache-dir DIR]
        [--num-eval 2000] [--set epochs=6 width=16 ...]

Trains on the train split only (:meth:`ShapesAttributeClassifier.for_data`); evaluates on the first ``num-eval``
scenes of the held-out split (combinations never seen in training) and of the val split. Prints the fit time
(0 on a cache hit) and :func:`scene_accuracy` for each split.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from lightning_dpmot.data.shapes_render import render_scenes, sample_scenes
from lightning_dpmot.metrics.shapes_classifier import ShapesAttributeClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (always trains)")
    parser.add_argument("--num-eval", type=int, default=2000)
    parser.add_argument("--set", nargs="*", default=[], help="hyperparameter overrides key=value")
    args = parser.parse_args()
    hparams = {k: (float(v) if "." in v or "e-" in v else int(v)) for k, v in (s.split("=", 1) for s in args.set)}
    torch.set_num_threads(1)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="shapes-clf-")
    start = time.perf_counter()
    model = ShapesAttributeClassifier.for_data(args.resolution, cache_dir=cache, **hparams)
    print(f"{model.name}: {args.resolution} px, fit/load {time.perf_counter() - start:.1f} s, hparams {hparams}")
    for split in ("heldout", "val"):
        scenes = sample_scenes(0, split, np.arange(args.num_eval))
        x = (render_scenes(scenes, args.resolution) + 1) / 2
        target = {k: torch.from_numpy(getattr(scenes, k)) for k in ("objects", "num_objects", "relation")}
        scores = model.evaluate(x, target)
        print(split, " ".join(f"{k}={v:.4f}" for k, v in scores.items() if not k.startswith("n")))


if __name__ == "__main__":
    main()
