"""Collect the discriminator-guidance sweeps (runs/dg/sweep_<arm>_w<w>_d<disc>[_smax<s>]/seed0) into
results/dg_seed0.csv, with each discriminator's final validation BCE/accuracy. The held-out-seed runs
(runs/dg/sr2_..., two seed ranges) add rows for seeds 2000-3999: FID_1 = 2 * fid_mean - FID_0, with FID_0 the
seeds 0-1999 value of the same setting (identical seeds and code, so bit-identical to the one-range sweep).

    python experiments/aot_vs_edm/dg_collect.py
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs" / "dg"
FIELDS = ["arm", "guidance", "weight", "sigma_max", "disc", "disc_coupling", "disc_val_acc", "disc_val_bce"]
KEEP = ["sampler", "nfe", "fid", "precision", "recall", "sec_per_sample", "num_samples", "seeds"]
PATTERN = re.compile(
    r"(?P<kind>sweep|sr2)_(?P<arm>edm|aot)_w(?P<w>[0-9.]+)_d(?P<disc>[a-z]+)(?:_smax(?P<smax>[0-9.]+))?$"
)


def disc_metrics(disc: str) -> tuple[str, str, str]:
    """(coupling, last val/acc, last val/bce) of the discriminator run ``disc``."""
    run = RUNS / f"disc_{disc}" / "seed0"
    hparams = (run / "hparams.yaml").read_text()
    coupling = re.search(r"noise_coupling: (\w+)", hparams).group(1)  # type: ignore[union-attr]
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/acc")]
    return coupling, f"{float(rows[-1]['val/acc']):.4f}", f"{float(rows[-1]['val/bce']):.4f}"


def second_range(row: dict[str, str], rows: list[dict], weight: float, match: re.Match) -> dict[str, str] | None:
    """The seeds 2000-3999 row of a two-range run, from its mean and the one-range row of the same setting."""
    smax = float(match["smax"] or 152.0)
    first = [
        r
        for r in rows
        if int(r["nfe"]) == int(row["nfe"])
        and r["seeds"] == "0-1999"
        and r["weight"] == weight
        and (weight == 0 or (r["disc"] == match["disc"] and r["sigma_max"] == smax))
    ]
    if not first:
        return None
    fid = 2 * float(row["fid_mean"]) - float(first[0]["fid"])
    return {**row, "fid": f"{fid:.6f}", "seeds": "2000-3999", "precision": "", "recall": "", "num_samples": "2000"}


def main() -> None:
    out = []
    for run in [*sorted(RUNS.glob("sweep_*")), *sorted(RUNS.glob("sr2_*"))]:
        match = PATTERN.match(run.name)
        table = run / "seed0" / "fid_vs_nfe" / "fid_vs_nfe.csv"
        if match is None or not table.is_file():
            continue
        weight = float(match["w"])
        coupling, acc, bce = disc_metrics(match["disc"]) if weight else ("", "", "")  # w = 0: no discriminator
        with open(table) as f:
            for row in csv.DictReader(f):
                if match["kind"] == "sr2":
                    row = second_range(row, [r for r in out if r["arm"] == match["arm"]], weight, match)
                    if row is None:
                        continue
                out.append(
                    {
                        "arm": match["arm"],
                        "guidance": "dg" if weight else "none",
                        "weight": weight,
                        "sigma_max": float(match["smax"] or 152.0) if weight else "",
                        "disc": match["disc"] if weight else "",
                        "disc_coupling": coupling,
                        "disc_val_acc": acc,
                        "disc_val_bce": bce,
                        **{k: row[k] for k in KEEP},
                    }
                )
    path = HERE / "results" / "dg_seed0.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + KEEP)
        writer.writeheader()
        key = lambda r: (r["arm"], r["seeds"], r["weight"], r["disc"], str(r["sigma_max"]), int(r["nfe"]))  # noqa: E731
        writer.writerows(sorted(out, key=key))
    print(f"{len(out)} rows -> {path}")


if __name__ == "__main__":
    main()
