"""2-D toy (5x5 Gaussian grid): DDIM / DDPM from pure noise vs the DPM-OT expressway at a junction level.

    python experiments/dpm_ot/toy2d.py --dpm-ckpt <DPMModule ckpt> --ot t27=<OT ckpt> [--ot t100=<...>]

Writes ``results/toy2d.csv``, ``results/toy2d.md`` and ``results/toy2d_scatter.png`` under experiments/dpm_ot/.
Samples are never clamped (DPMOTModule.expressway clamps to [-1, 1]; we call the map and the inner sampler
directly, see common.expressway_unclamped).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import EXP_DIR, expressway_unclamped, markdown_table, write_csv
from torch import Tensor

from lightning_dpmot.data.toy2d import Toy2DDataModule
from lightning_dpmot.metrics.mode_mixture import mode_coverage, off_mode_rate
from lightning_dpmot.models.dpm import DPMModule
from lightning_dpmot.models.dpm_ot import DPMOTModule, load_diffusion_module
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.random import StackedGenerator

K_STD = 3.0


def metrics(x: Tensor, dm: Toy2DDataModule) -> dict[str, Any]:
    """Off-mode share (farther than 3 std from every centre), modes hit, per-mode count range, distinct points."""
    counts, hit = mode_coverage(x, dm.centers, dm.std, K_STD)
    return {
        "off_mode": off_mode_rate(x, dm.centers, dm.std, K_STD),
        "modes_hit": hit,
        "min_per_mode": int(counts.min()),
        "max_per_mode": int(counts.max()),
        "distinct": len(torch.unique(x.round(decimals=4), dim=0)),
        "abs_max": float(x.abs().max()),
    }


def oracle_latents(dm: Toy2DDataModule, n: int, sigma_s: float, seed: int) -> Tensor:
    """Exact forward-process latents at sigma_s: fresh training points plus sigma_s Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    train = dm.dataset("train").x
    idx = torch.randint(len(train), (n,), generator=gen)
    return train[idx] + sigma_s * torch.randn(n, 2, generator=gen)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = EXP_DIR / "results"
    dm = Toy2DDataModule(dataset="grid25")
    seeds = torch.arange(args.num_samples)
    model = load_diffusion_module(args.dpm_ckpt)
    assert isinstance(model, DPMModule)
    rows: list[dict[str, Any]] = []
    panels: dict[str, Tensor] = {"training data (first 2,000)": dm.dataset("train").x[: args.num_samples]}
    rows.append({"method": "training data", "nfe": 0, **metrics(panels["training data (first 2,000)"], dm)})

    def add(name: str, x: Tensor, nfe: int, seconds: float, panel: bool, **extra: Any) -> None:
        rows.append({"method": name, "nfe": nfe, **metrics(x, dm), "seconds": seconds, **extra})
        if panel:
            panels[f"{name} (NFE {nfe})"] = x
        print(rows[-1], flush=True)

    baselines = [
        ("DDIM 10", SamplerSpec("ddim", 10, "timesteps")),
        ("DDIM 1000", SamplerSpec("ddim", 1000, "timesteps")),
        ("DDPM ancestral 1000", model.ddpm_spec()),
    ]
    for name, spec in baselines:
        start = time.perf_counter()
        result = model.generate(seeds, spec=spec)
        add(name, result.x, result.nfe, time.perf_counter() - start, True)

    for item in args.ot:
        level, ckpt = item.split("=", 1)
        spec = SamplerSpec("ddim", args.ot_steps, "timesteps")
        maps: list[tuple[str, dict[str, Any]]] = [
            ("hard", {}),
            ("renoise", {}),
            ("soft", {"temperature": 1.0}),
            ("soft", {"temperature": 0.1}),
            ("aeot", {}),
        ]
        for ot_map, kwargs in maps:
            module = DPMOTModule(args.dpm_ckpt, ckpt, ot_map=ot_map, data_shape=(2,), sampler=spec, **kwargs)
            tag = ot_map + (f" T={kwargs['temperature']:g}" if "temperature" in kwargs else "")
            x, index, map_s, rev_s = expressway_unclamped(module, seeds, spec)
            name = f"DPM-OT {tag}, {level} (sigma_s={module.sigma_s:.3f})"
            panel = level == args.panel_level and tag in ("hard", "renoise", "soft T=0.1", "aeot")
            add(name, x, args.ot_steps, map_s + rev_s, panel, map_seconds=map_s, cells_used=len(index.unique()))
        # oracle: the exact forward marginal at sigma_s (infinitely many targets), same reverse steps
        sigmas = module.sigmas_for(spec)
        latents = oracle_latents(dm, args.num_samples, module.sigma_s, seed=1)
        start = time.perf_counter()
        x = model.sample_from(latents.double(), sigmas, spec=spec, generator=StackedGenerator(seeds)).x.float()
        add(f"oracle latent (fresh data + noise), {level}", x, args.ot_steps, time.perf_counter() - start, False)

    write_csv(rows, out / "toy2d.csv")
    cols = ["method", "nfe", "off_mode", "modes_hit", "min_per_mode", "max_per_mode", "distinct", "cells_used"]
    text = markdown_table(rows, cols)
    (out / "toy2d.md").write_text(text + "\n")
    print(text)
    scatter(panels, dm, out / "toy2d_scatter.png")


def scatter(panels: dict[str, Tensor], dm: Toy2DDataModule, path: Path) -> None:
    """One panel per method: samples, with the 3-std discs around the 25 centres."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = 3
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=70)
    for ax, (title, x) in zip(axes.flat, panels.items()):
        for c in dm.centers:
            ax.add_patch(plt.Circle(tuple(c.tolist()), K_STD * dm.std, fill=False, lw=0.5, color="tab:red"))
        off = torch.cdist(x.double(), dm.centers.double()).min(1).values > K_STD * dm.std
        ax.scatter(x[~off, 0], x[~off, 1], s=1, c="tab:blue", alpha=0.5, rasterized=True)
        ax.scatter(x[off, 0], x[off, 1], s=1, c="black", alpha=0.7, rasterized=True)
        ax.set_title(f"{title}\noff-mode {off.double().mean():.1%}", fontsize=8)
        ax.set_xlim(-1.5, 1.5)
        ax.set_ylim(-1.5, 1.5)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dpm-ckpt", required=True)
    parser.add_argument("--ot", action="append", default=[], help="LEVEL=OT_CKPT (repeatable)")
    parser.add_argument("--panel-level", default="t27", help="junction level shown in the scatter plot")
    parser.add_argument("--ot-steps", type=int, default=10, help="DDIM steps below sigma_s")
    parser.add_argument("--num-samples", type=int, default=2000)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
