"""Per-sample time of EDM sampling (UniPC, NFE 10) without and with discriminator guidance, in one process.

python experiments/aot_vs_edm/dg_timing.py
"""

from __future__ import annotations

import time

import torch

from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.models import EDMModule
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.checkpoint_io import load_lightning_module

RUNS = "experiments/aot_vs_edm/runs"
DISC = f"{RUNS}/dg/disc_edm/seed0/checkpoints/last.ckpt"
N, REPEATS = 250, 3


def main() -> None:
    torch.set_num_threads(1)
    model = load_lightning_module(f"{RUNS}/edm/seed0/checkpoints/last.ckpt", cls=EDMModule)
    spec = SamplerSpec("unipc", num_steps=10)
    settings = {
        "none": GuidanceSpec(),
        "dg_smax3.3": GuidanceSpec(discriminator={"checkpoint": DISC, "weight": 0.5, "sigma_max": 3.3}),
        "dg_smax152": GuidanceSpec(discriminator={"checkpoint": DISC, "weight": 0.5, "sigma_max": 152.0}),
    }
    seeds = torch.arange(N)
    model.generate(seeds[:8], spec=spec, guidance=settings["dg_smax152"])  # warm-up, loads the discriminator
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(REPEATS):  # interleaved, so load changes hit every setting alike
        for name, guidance in settings.items():
            start = time.perf_counter()
            model.generate(seeds, spec=spec, guidance=guidance)
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name}: min {min(values) / N * 1e3:.2f} ms/sample ({REPEATS} repeats of {N} samples, NFE 10, UniPC)")


if __name__ == "__main__":
    main()
