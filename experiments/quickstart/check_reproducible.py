"""Check that the quickstart's FID-during-training values are reproduced exactly.

Trains ``configs/quickstart.yaml`` (``num_threads: 1``) to step 440 — the first FID evaluation (validation every 20
epochs of 11 steps, FID every 2nd validation) — reads ``fid_curve.csv`` back and compares every value with the
constants below, bit for bit (with empty caches). Exit status 0: identical; 1: a value differs (all measured values
are printed with every digit, so the constants can be updated when a change of the numerics is intended); 2: the run
failed.

    OMP_NUM_THREADS=1 python experiments/quickstart/check_reproducible.py            # about 2-3 minutes on 2 cores
    python experiments/quickstart/check_reproducible.py --root /tmp/repro --keep

The values hold for one thread; another ``num_threads`` changes the order of floating-point reductions and the last
digits of every number (the reason the config pins ``num_threads: 1``).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEP = 440
# Measured with torch 2.13.0 (CPU), lightning 2.6.6, num_threads 1, empty caches:
# `python experiments/quickstart/check_reproducible.py` (the README rounds them to 17.9 / 7.19). Before commit
# f570940 (attention output made contiguous before its 1x1 projection) they were 17.90692138671875 / 7.196000576019287.
EXPECTED: dict[str, float] = {
    "val/fid@nfe=9": 17.906871795654297,
    "val/fid@nfe=35": 7.19463586807251,
}


def train(root: Path) -> Path:
    """Run the quickstart to ``STEP`` under ``root``; return its fid_curve.csv."""
    cmd = [
        sys.executable,
        "-m",
        "lightning_dpmot",
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        f"--trainer.max_steps={STEP}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    # An empty HOME: the FID callback's feature classifier and reference statistics are retrained in the run instead
    # of coming from ~/.cache/lightning_dpmot, where an older run (another thread count) may have left other ones.
    (root / "home").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HOME": str(root / "home")}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"check_reproducible: training failed with exit status {result.returncode}")
    curves = sorted(root.rglob("fid_curve.csv"))
    if len(curves) != 1:
        raise SystemExit(f"check_reproducible: expected one fid_curve.csv under {root}, found {len(curves)}")
    return curves[0]


def read_curve(path: Path, step: int) -> dict[str, float]:
    with path.open(newline="") as f:
        return {row["key"]: float(row["value"]) for row in csv.DictReader(f) if int(row["step"]) == step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--curve", type=Path, default=None, help="check this fid_curve.csv instead of training")
    args = parser.parse_args()
    if args.curve is not None:
        measured = read_curve(args.curve, STEP)
    else:
        root = args.root or Path(tempfile.mkdtemp(prefix="dpmot-repro-"))
        try:
            measured = read_curve(train(root), STEP)
        finally:
            if not args.keep and args.root is None:
                shutil.rmtree(root, ignore_errors=True)
    ok = set(measured) == set(EXPECTED)
    for key in sorted(set(measured) | set(EXPECTED)):
        got, want = measured.get(key), EXPECTED.get(key)
        same = got is not None and want is not None and got == want
        ok &= same
        print(f"step {STEP} {key}: measured {got!r} expected {want!r} {'OK' if same else 'MISMATCH'}")
    print("reproduced exactly" if ok else "NOT reproduced")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
