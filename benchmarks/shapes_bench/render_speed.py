"""Rendering throughput of the embedded shapes dataset (one CPU thread).

    OMP_NUM_THREADS=1 python benchmarks/shapes_bench/render_speed.py [--num 50000]

Prints images/s for scene sampling + rendering at 16 and 32 px, vectorised (``render_scenes`` on the whole
split) and through a DataLoader of batch 128 (``__getitems__``: batched rendering plus the caption strings).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_dpmot.data.shapes import ShapesCaptionsDataModule
from lightning_dpmot.data.shapes_render import coverage_stamps, render_scenes, sample_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=50_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for resolution in (16, 32):
        coverage_stamps(resolution)  # the lookup table is built once per process
        start = time.perf_counter()
        render_scenes(sample_scenes(0, "train", np.arange(args.num)), resolution)
        vectorised = args.num / (time.perf_counter() - start)
        dm = ShapesCaptionsDataModule(resolution=resolution, num_train=args.num)
        start = time.perf_counter()
        for _ in DataLoader(dm.dataset("train"), batch_size=128):
            pass
        loader = args.num / (time.perf_counter() - start)
        print(f"{resolution} px: {vectorised:,.0f} images/s vectorised, {loader:,.0f} images/s through a DataLoader")


if __name__ == "__main__":
    main()
