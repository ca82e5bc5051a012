"""Collect the AOT-vs-EDM sweeps into one table (markdown + CSV) and one plot.

python experiments/aot_vs_edm/summarize.py experiments/aot_vs_edm/runs experiments/aot_vs_edm/results
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(runs: Path) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    rows, curvature = [], {}
    for arm in ("edm", "aot"):
        for seed_dir in sorted((runs / f"{arm}-eval").glob("seed*")):
            sweep = seed_dir / "fid_vs_nfe"
            for row in csv.DictReader(open(sweep / "fid_vs_nfe.csv")):
                rows.append({"arm": arm, "seed": seed_dir.name, **row})
            curvature[(arm, seed_dir.name)] = json.loads((sweep / "curvature.json").read_text())
    return rows, curvature


def training_summary(runs: Path) -> list[str]:
    """Per training run: final val loss, the FIDCallback's last values (500 samples) and the OT callback's log."""
    lines = [
        "Training runs (the FIDCallback's 500-sample FIDs at the last validation; OT columns: mean over steps):",
        "",
        "| arm | seed | val loss | FID@9 (500) | FID@35 (500) | OT cost before | OT cost after | reduction | solve ms |"
        " cost ms | gather ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ("edm", "aot"):
        for seed_dir in sorted((runs / arm).glob("seed*")):
            metrics = list(csv.DictReader(open(seed_dir / "metrics.csv")))

            def last(key: str, metrics: list[dict] = metrics) -> str:
                values = [r[key] for r in metrics if r.get(key)]
                return f"{float(values[-1]):.3f}" if values else "–"

            def mean(key: str, metrics: list[dict] = metrics) -> str:
                values = [float(r[key]) for r in metrics if r.get(key)]
                return f"{np.mean(values):.4g}" if values else "–"

            cells = [last("val/loss"), last("val/fid@nfe=9"), last("val/fid@nfe=35")]
            cells += [mean(k) for k in ("ot/cost_before", "ot/cost_after", "ot/reduction", "ot/solve_ms")]
            cells += [mean(k) for k in ("ot/cost_ms", "ot/gather_ms")]
            lines.append(f"| {arm} | {seed_dir.name} | " + " | ".join(cells) + " |")
    return lines + [""]


def summarize(rows: list[dict], curvature: dict, out: Path, runs: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table: dict[tuple[str, float, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["arm"], float(r["rho"]), int(r["nfe"]))
        for metric in ("fid", "precision", "recall"):
            table[key][metric].append(float(r[metric]))
    seeds = sorted({r["seed"] for r in rows})
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["arm", "rho", "nfe", "fid_mean", "fid_per_seed", "precision_mean", "recall_mean"])
        for (arm, rho, nfe), m in sorted(table.items()):
            writer.writerow(
                [
                    arm,
                    rho,
                    nfe,
                    np.mean(m["fid"]),
                    " ".join(f"{v:.3f}" for v in m["fid"]),
                    np.mean(m["precision"]),
                    np.mean(m["recall"]),
                ]
            )
    lines = [
        f"FID (classifier features, 2,000 samples, mean over seeds {', '.join(seeds)}; per-seed values in "
        "brackets). Heun sampler, sigma in [0.002, 80].",
        "",
        "| NFE | EDM rho=7 | AOT rho=7 | EDM rho=90 | AOT rho=90 |",
        "|---|---|---|---|---|",
    ]
    for nfe in sorted({k[2] for k in table}):
        cells = []
        for rho, arm in ((7.0, "edm"), (7.0, "aot"), (90.0, "edm"), (90.0, "aot")):
            v = table[(arm, rho, nfe)]["fid"]
            cells.append(f"{np.mean(v):.2f} [{', '.join(f'{x:.2f}' for x in v)}]")
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Trajectory straightness (64 samples, 64 Heun steps on rho = 7; lower = straighter):",
        "",
        "| arm | seed | deviation | curvature | total variation |",
        "|---|---|---|---|---|",
    ]
    for (arm, seed), c in sorted(curvature.items()):
        lines.append(f"| {arm} | {seed} | {c['deviation']:.4f} | {c['curvature']:.4f} | {c['total_variation']:.4f} |")
    if runs is not None:
        lines += [""] + training_summary(runs)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(table, out / "fid_vs_nfe.png")


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    styles = {"edm": "-", "aot": "--"}
    for arm in ("edm", "aot"):
        for rho, color in ((7.0, "tab:blue"), (90.0, "tab:orange")):
            pts = sorted((k[2], np.mean(v["fid"])) for k, v in table.items() if k[0] == arm and k[1] == rho)
            if pts:
                ax.plot(*zip(*pts), styles[arm], marker="o", color=color, label=f"{arm.upper()}, rho={rho:g}")
    ax.set_xlabel("NFE (Heun)")
    ax.set_ylabel("FID (classifier features)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    summarize(*load(runs), out, runs)
