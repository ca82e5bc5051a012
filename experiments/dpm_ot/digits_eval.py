"""8x8 digits: FID, precision/recall, mode-mixture rate and copy rates of DDIM, EDM Heun and DPM-OT settings.

    python experiments/dpm_ot/digits_eval.py --runs experiments/dpm_ot/runs --dpm-ckpt <...> --edm-ckpt <...>

Every setting generates ``--num-samples`` samples from seeds 0..n-1 and is cached as
``<runs>/digits_eval/<key>.json`` (+ ``.pt`` with the first 64 samples), so a rerun only computes what is missing.
DPM-OT potentials are read from ``<runs>/ot_digits/{train,val}_t<t_s>/checkpoints/last.ckpt``.

Metrics (classifier features of the package, ``lightning_dpmot.metrics``):

- ``fid``: Frechet distance of the samples' features to the training split's cached statistics (all samples);
  ``fid269``: the same on the first 269 samples, comparable with the real val split (269 images);
- ``precision`` / ``recall``: k-NN (k = 3) manifolds against the cached real training features;
- ``mmr@tau``: share of samples with two classes at probability >= tau;
- ``copy_train`` / ``copy_val``: share of samples 3x closer (pixels) to an image of that split than the image's own
  nearest neighbour in the split (``copy_rate``, threshold 1/3); ``*_med``: median copy ratio;
- DPM-OT only: ``cells``: distinct power cells hit; ``own_target``: share of samples whose nearest image in the target
  split is the clean image of the target they were mapped to; ``map_ms`` / ``net_ms``: per-sample wall time of the
  OT map and of the reverse steps (1 CPU thread). NFE counts network evaluations only (the map is one GEMM).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_dpmot.callbacks.reference import load_reference
from lightning_dpmot.data.digits import DigitsDataModule
from lightning_dpmot.diffusion.vp import VPSchedule
from lightning_dpmot.metrics.copy_rate import copy_rate, self_nearest_distance
from lightning_dpmot.metrics.extractors import DEFAULT_CACHE_DIR
from lightning_dpmot.metrics.frechet import feature_statistics, frechet_distance
from lightning_dpmot.metrics.mode_mixture import mode_mixture_rate
from lightning_dpmot.metrics.precision_recall import manifold_radii, precision_recall
from lightning_dpmot.metrics.reference_stats import to_unit_range
from lightning_dpmot.models.dpm_ot import DPMOTModule, load_diffusion_module
from lightning_dpmot.sampling.spec import SamplerSpec

TAUS = (0.1, 0.2, 0.3, 0.4)
LEVELS = (5, 20, 50, 100, 250)
NFES = (5, 10, 20)
HEUN_NFES = (5, 9, 11, 19, 21)
MAPS = {"train": ("hard", "renoise", "aeot", "soft"), "val": ("hard", "renoise", "aeot")}
BATCH = 500


class Evaluator:
    """Holds the reference data (features, statistics, split images) and scores sample sets."""

    def __init__(self) -> None:
        self.dm = DigitsDataModule(resolution=8)
        self.feature, self.stats = load_reference(self.dm, (1, 8, 8), "classifier", "train", DEFAULT_CACHE_DIR)
        self.real = torch.as_tensor(self.stats.features)
        self.real_radii = manifold_radii(self.real, k=3)
        self.images = {split: self.dm.dataset(split).x.float() for split in ("train", "val")}
        self.nn = {split: self_nearest_distance(x) for split, x in self.images.items()}

    @torch.no_grad()
    def score(self, x: Tensor) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Metrics of samples x (N, 1, 8, 8) in [-1, 1]; also the copy reports' nearest-neighbour indices."""
        unit = to_unit_range(x)
        feats = torch.cat([self.feature(b) for b in unit.split(BATCH)])
        probs = torch.cat([self.feature.predict_proba(b) for b in unit.split(BATCH)])
        row: dict[str, Any] = {"n": len(x), "fid": self.fid(feats)}
        row["fid269"] = self.fid(feats[:269]) if len(x) >= 269 else float("nan")
        pr = precision_recall(self.real, feats, k=3, real_radii=self.real_radii)
        row.update(precision=pr.precision, recall=pr.recall)
        row.update({f"mmr@{t:g}": v for t, v in mode_mixture_rate(probs, TAUS).items()})
        nn_index = {}
        for split in ("train", "val"):
            report = copy_rate(x, self.images[split], train_nn_dist=self.nn[split])
            row[f"copy_{split}"] = report.rate
            row[f"copy_{split}_med"] = report.quantiles[0.5]
            nn_index[split] = report.nn_index
        return row, nn_index

    def fid(self, feats: Tensor) -> float:
        mu, sigma = feature_statistics(feats.double().numpy())
        return frechet_distance(mu, sigma, self.stats.mu, self.stats.sigma)


def sigma_of(t: int) -> float:
    """The discrete linear-VP level sigma_t (float32 value, as DPMModule uses it)."""
    return float(VPSchedule("linear").sigmas[t])


def generate_baseline(module: Any, spec: SamplerSpec, n: int) -> tuple[Tensor, dict[str, Any]]:
    """Samples of a diffusion model from pure noise, seeds 0..n-1."""
    xs, seconds, nfe = [], 0.0, 0
    for chunk in torch.arange(n).split(BATCH):
        start = time.perf_counter()
        result = module.generate(chunk, spec=spec)
        seconds += time.perf_counter() - start
        xs.append(result.x)
        nfe = result.nfe
    return torch.cat(xs), {"nfe": nfe, "net_ms": 1e3 * seconds / n}


def generate_dpm_ot(module: DPMOTModule, spec: SamplerSpec, n: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Expressway samples (clamped images, as ``dpmot predict``), the mapped cells and timings."""
    xs, idx, map_s, total, nfe = [], [], 0.0, 0.0, 0
    for chunk in torch.arange(n).split(BATCH):
        start = time.perf_counter()
        result = module.expressway(chunk, spec=spec)
        total += time.perf_counter() - start
        map_s += result.map_seconds
        xs.append(result.x)
        idx.append(result.index)
        nfe = result.nfe
    info = {"nfe": nfe, "map_ms": 1e3 * map_s / n, "net_ms": 1e3 * (total - map_s) / n}
    return torch.cat(xs), torch.cat(idx), info


def dpm_ot_row(
    ev: Evaluator, module: DPMOTModule | None, spec: SamplerSpec, split: str, t_s: int, ot_map: str, n: int
) -> tuple[dict[str, Any], Tensor]:
    """One DPM-OT setting: samples, metrics, and the share of samples nearest to their own target's image."""
    assert module is not None
    x, index, info = generate_dpm_ot(module, spec, n)
    row, nn_index = ev.score(x)
    own = (nn_index[split] == module.target_ids[index]).double().mean().item()
    head = {"method": "DPM-OT", "targets": split, "t_s": t_s, "sigma_s": module.sigma_s, "map": ot_map}
    extra = {"own_target": own, "cells": len(index.unique()), "num_targets": len(module.target_ids)}
    return {**head, **info, **row, **extra}, x


def cached(path: Path, compute: Any) -> dict[str, Any]:
    """Load a row from ``path`` or compute ``(row, samples)`` and store both."""
    if path.is_file():
        return json.loads(path.read_text())
    row, samples = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(samples[:64].clone(), path.with_suffix(".pt"))
    path.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    runs = Path(args.runs)
    cache = runs / "digits_eval"
    ev = Evaluator()
    n = args.num_samples
    rows: list[dict[str, Any]] = []

    # real-data references
    def real(split: str, count: int | None) -> tuple[dict[str, Any], Tensor]:
        x = ev.images[split]
        if count is not None:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:count]]
        row, _ = ev.score(x)
        if split == "val":
            row["copy_val"] = row["copy_val_med"] = float("nan")  # every val image is its own copy
        return {"method": f"real {split}", "targets": "", "t_s": "", "sigma_s": "", "map": "", "nfe": 0, **row}, x

    rows.append(cached(cache / "real_val.json", lambda: real("val", None)))
    rows.append(cached(cache / f"real_train{n}.json", lambda: real("train", n)))
    # train images scored against themselves are copies by construction; keep only what is meaningful
    rows[-1]["copy_train"] = rows[-1]["copy_train_med"] = float("nan")

    dpm = load_diffusion_module(args.dpm_ckpt)
    for nfe in NFES:
        spec = SamplerSpec("ddim", nfe, "timesteps")

        def ddim(spec: SamplerSpec = spec) -> tuple[dict[str, Any], Tensor]:
            x, info = generate_baseline(dpm, spec, n)
            row, _ = ev.score(x)
            return {"method": "DDIM", "targets": "", "t_s": 999, "sigma_s": sigma_of(999), "map": "", **info, **row}, x

        rows.append(cached(cache / f"ddim_nfe{nfe}.json", ddim))
    edm = load_diffusion_module(args.edm_ckpt)
    for nfe in HEUN_NFES:
        spec = SamplerSpec.from_nfe("heun", nfe)

        def heun(spec: SamplerSpec = spec) -> tuple[dict[str, Any], Tensor]:
            x, info = generate_baseline(edm, spec, n)
            row, _ = ev.score(x)
            return {"method": "EDM Heun", "targets": "", "t_s": "", "sigma_s": 80.0, "map": "", **info, **row}, x

        rows.append(cached(cache / f"edm_heun_nfe{nfe}.json", heun))

    for split, maps in MAPS.items():
        for t_s in LEVELS:
            ot_ckpt = runs / "ot_digits" / f"{split}_t{t_s}" / "checkpoints" / "last.ckpt"
            if not ot_ckpt.is_file():
                print(f"missing {ot_ckpt}; skipped", flush=True)
                continue
            for ot_map in maps:
                module: DPMOTModule | None = None
                for nfe in NFES:
                    if nfe > t_s + 1:  # only t_s + 1 discrete levels at or below sigma_s
                        continue
                    key = cache / f"dpmot_{split}_t{t_s}_{ot_map}_nfe{nfe}.json"
                    spec = SamplerSpec("ddim", nfe, "timesteps")
                    if module is None and not key.is_file():  # the default sampler (50 steps) may not fit below t_s
                        module = DPMOTModule(args.dpm_ckpt, str(ot_ckpt), ot_map=ot_map, sampler=spec)

                    compute = partial(dpm_ot_row, ev, module, spec, split, t_s, ot_map, n)
                    rows.append(cached(key, compute))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="experiments/dpm_ot/runs")
    parser.add_argument("--dpm-ckpt", required=True)
    parser.add_argument("--edm-ckpt", required=True)
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args()
    rows = run(args)
    from common import EXP_DIR, write_csv

    write_csv(rows, EXP_DIR / "results" / "digits.csv")
    print(f"{len(rows)} rows -> {EXP_DIR / 'results' / 'digits.csv'}")


if __name__ == "__main__":
    main()
