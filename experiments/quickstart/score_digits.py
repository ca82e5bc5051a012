"""Score generated digits: share recognised with probability >= 0.5 by a pixel logistic regression trained on
the digits train split, and the class histogram. Also scores the real val split as a reference.

    python experiments/quickstart/score_digits.py <run>/predict-<time>/predictions/samples.npz [--resolution 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.metrics.recognizability import fit_pixel_classifier, recognizability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="samples.npz written by `dpmot predict` (key 'x')")
    parser.add_argument("--resolution", type=int, default=None, help="digits resolution (default: from samples)")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    if not args.samples.is_file():
        sys.exit(f"score_digits: no such file {args.samples} (run `dpmot predict` first)")
    samples = np.load(args.samples)["x"]
    resolution = args.resolution or samples.shape[-1]
    dm = DigitsDataModule(resolution=resolution)
    train, val = dm.dataset("train"), dm.dataset("val")
    clf = fit_pixel_classifier(train.x.numpy(), train.labels.numpy())
    real = recognizability(clf, val.x.numpy(), args.threshold)
    fake = recognizability(clf, samples, args.threshold)
    val_acc = float((clf.predict(val.x.numpy().reshape(len(val), -1)) == val.labels.numpy()).mean())
    print(f"classifier: logistic regression on {resolution}x{resolution} pixels, val accuracy {val_acc:.3f}")
    print(f"real val images ({len(val)}): share with p >= {args.threshold}: {real.share_confident:.3f}")
    print(
        f"generated ({len(samples)}): share with p >= {args.threshold}: {fake.share_confident:.3f}, "
        f"mean top probability {fake.mean_top_probability:.3f}"
    )
    print(f"class histogram (all samples): {fake.histogram.tolist()}")
    print(f"classes present: {int((fake.histogram > 0).sum())} / {len(fake.histogram)}")
    out = args.samples.with_name("recognizability.json")
    out.write_text(
        json.dumps(
            {
                "generated": fake.as_dict(),
                "real_val": real.as_dict(),
                "val_accuracy": val_acc,
                "num_samples": len(samples),
                "resolution": resolution,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
