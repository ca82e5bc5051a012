"""Tables and plots of the digits evaluation: results/digits*.md, digits_sweep.png, digits_samples.png.

python experiments/dpm_ot/summarize.py --runs experiments/dpm_ot/runs
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

import torch
from common import EXP_DIR, markdown_table

LEVELS = (5, 20, 50, 100, 250)
REF_COLS = ["method", "nfe", "fid", "fid269", "precision", "recall", "mmr@0.1", "mmr@0.2", "mmr@0.3", "mmr@0.4"]
REF_COLS += ["copy_train", "copy_train_med", "copy_val", "copy_val_med", "net_ms"]
OT_COLS = ["targets", "map", "t_s", "sigma_s", "nfe", "fid", "fid269", "precision", "recall", "mmr@0.1", "mmr@0.2"]
OT_COLS += ["mmr@0.4", "copy_train", "copy_train_med", "copy_val", "copy_val_med", "own_target", "cells", "map_ms"]
OT_COLS += ["net_ms"]


def load_rows(path: Path) -> list[dict[str, Any]]:
    """CSV rows with numbers parsed."""

    def parse(v: str) -> Any:
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path) as f:
        return [{k: parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def headline_nfe(row: dict[str, Any]) -> bool:
    """The NFE shown in the condensed DPM-OT table: 10 (5 where t_s = 5 allows no more)."""
    return row["nfe"] == (5 if row["t_s"] == 5 else 10)


def tables(rows: list[dict[str, Any]], out: Path) -> None:
    refs = [r for r in rows if r["method"] != "DPM-OT"]
    ot = [r for r in rows if r["method"] == "DPM-OT"]
    ot.sort(key=lambda r: (r["targets"] != "train", r["map"], r["t_s"], r["nfe"]))
    parts = [
        "## References and baselines (1,000 samples; real val: all 269 images)\n",
        markdown_table(refs, REF_COLS),
        "\n\n## DPM-OT, headline NFE (10; 5 at t_s = 5)\n",
        markdown_table([r for r in ot if headline_nfe(r)], OT_COLS),
        "\n",
    ]
    (out / "digits.md").write_text("\n".join(parts))
    full = ["## DPM-OT, every setting (1,000 samples each)\n", markdown_table(ot, OT_COLS), "\n"]
    (out / "digits_full.md").write_text("\n".join(full))


def plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ot = [r for r in rows if r["method"] == "DPM-OT"]
    ref = {(r["method"], r["nfe"]): r for r in rows if r["method"] != "DPM-OT"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8), dpi=80)
    panels = [
        ("fid", "FID (classifier features)", True),
        ("copy", "copy rate vs the target split", False),
        ("mmr@0.2", "mode-mixture rate, tau = 0.2", False),
    ]
    styles = {"hard": "o", "renoise": "s", "aeot": "^", "soft": "v"}  # markers; line style per split
    for ax, (key, label, log) in zip(axes[:3], panels):
        for split, ls in (("train", "-"), ("val", "--")):
            for ot_map, style in styles.items():
                pts = sorted(
                    (r["sigma_s"], r[f"copy_{split}"] if key == "copy" else r[key])
                    for r in ot
                    if r["targets"] == split and r["map"] == ot_map and headline_nfe(r)
                )
                if pts:
                    ax.plot(*zip(*pts), style, ls=ls, ms=4, label=f"{ot_map}, {split} targets")
        if key != "copy":
            ax.axhline(ref[("DDIM", 10)][key], color="gray", ls=":", label="DDIM 10 (from T)")
            ax.axhline(ref[("EDM Heun", 11)][key], color="k", ls="-.", lw=0.8, label="EDM Heun 11")
            ax.axhline(ref[("real val", 0)][key], color="tab:green", lw=0.8, label="real val images")
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("junction level sigma_s (NFE 10; 5 at the smallest)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    ax = axes[3]
    for method, style in (("DDIM", "o:"), ("EDM Heun", "s-.")):
        pts = sorted((nfe, r["fid"]) for (m, nfe), r in ref.items() if m == method)
        ax.plot(*zip(*pts), style, color="gray" if method == "DDIM" else "k", label=f"{method} (from noise)")
    for ot_map, style in styles.items():
        for t_s in (50, 100):
            pts = sorted(
                (r["nfe"], r["fid"]) for r in ot if r["targets"] == "train" and r["map"] == ot_map and r["t_s"] == t_s
            )
            if pts:
                ax.plot(
                    *zip(*pts), style + "-", ms=4, alpha=1.0 if t_s == 100 else 0.5, label=f"DPM-OT {ot_map}, t_s={t_s}"
                )
    ax.set_yscale("log")
    ax.set_xlabel("NFE (network evaluations; the OT map is not counted)")
    ax.set_title("FID vs NFE (train targets)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "digits_sweep.png")
    plt.close(fig)


def sample_grid(runs: Path, out: Path) -> None:
    """First 32 samples of a few settings (from the evaluation cache)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = runs / "digits_eval"
    shown = [
        ("real_val", "real val images"),
        ("ddim_nfe10", "DDIM, NFE 10"),
        ("edm_heun_nfe11", "EDM Heun, NFE 11"),
        ("dpmot_train_t5_hard_nfe5", "DPM-OT hard, t_s=5, NFE 5"),
        ("dpmot_train_t100_hard_nfe10", "DPM-OT hard, t_s=100, NFE 10"),
        ("dpmot_train_t100_renoise_nfe10", "DPM-OT renoise, t_s=100, NFE 10"),
        ("dpmot_train_t100_aeot_nfe10", "DPM-OT aeot, t_s=100, NFE 10"),
        ("dpmot_train_t100_soft_nfe10", "DPM-OT soft, t_s=100, NFE 10"),
    ]
    shown = [(k, t) for k, t in shown if (cache / f"{k}.pt").is_file()]
    fig, axes = plt.subplots(2, (len(shown) + 1) // 2, figsize=(2.6 * ((len(shown) + 1) // 2), 3.2), dpi=80)
    for ax, (key, title) in zip(axes.flat, shown):
        x = torch.load(cache / f"{key}.pt")[:32, 0]
        grid = x.reshape(4, 8, 8, 8).permute(0, 2, 1, 3).reshape(32, 64)
        ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "digits_samples.png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", default="experiments/dpm_ot/runs")
    args = parser.parse_args()
    out = EXP_DIR / "results"
    rows = load_rows(out / "digits.csv")
    tables(rows, out)
    plots(rows, out)
    sample_grid(Path(args.runs), out)
    print(f"wrote {out}/digits.md, digits_full.md, digits_sweep.png, digits_samples.png")


if __name__ == "__main__":
    main()
