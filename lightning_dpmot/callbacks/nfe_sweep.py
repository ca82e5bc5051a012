"""FID against NFE for a checkpoint: samplers x rho x NFE, written as a CSV table and a PNG plot.

    dpmot test --config configs/quickstart.yaml --config configs/eval/fid_vs_nfe.yaml \\
        --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt

Protocol (EDM's, where it applies): every setting uses the same seeds; ``seed_ranges`` > 1 repeats the evaluation on
disjoint seed ranges [r * num_samples, (r + 1) * num_samples) and reports the minimum (EDM's paper numbers), the
mean and the standard deviation; statistics of the real data are those of the training split. Alongside FID:
improved precision/recall (k-NN manifolds, first seed range), the mode-mixture rate when the features come from a
classifier, the copy rate against the training images, seconds per sample, and — once per checkpoint — the
straightness of the ODE trajectories on a fine Heun grid (see :mod:`lightning_dpmot.metrics.curvature`).

Streaming and resuming: each finished setting is written to ``fid_vs_nfe.csv`` (and the plot redrawn) at once, so an
interrupted sweep keeps what it finished. A rerun into the same folder skips the settings whose row is there already
— same :func:`setting_key`: sampler, schedule, rho, steps, NFE, samples, seed ranges and checkpoint — and logs and
prints the table of every row.
"""

from __future__ import annotations

import csv
import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_dpmot.callbacks.reference import prepare_reference
from lightning_dpmot.metrics.copy_rate import copy_rate, self_nearest_distance
from lightning_dpmot.metrics.curvature import TrajectoryRecorder, mean_trajectory_metrics
from lightning_dpmot.metrics.extractors import DEFAULT_CACHE_DIR, FeatureKind
from lightning_dpmot.metrics.mode_mixture import mode_mixture_rate
from lightning_dpmot.metrics.precision_recall import precision_recall
from lightning_dpmot.metrics.reference_stats import ReferenceStats, to_unit_range
from lightning_dpmot.sampling.spec import SamplerName, SamplerSpec
from lightning_dpmot.utils.distributed import gather_rows, rank_seeds
from lightning_dpmot.utils.progress import progress

#: columns that identify a setting: a row with the same values is not computed again
KEY_COLUMNS = ("sampler", "schedule", "rho", "num_steps", "nfe", "num_samples", "seeds", "checkpoint")


def setting_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The identity of a table row, equal for a freshly computed row and the same row read back from the CSV."""
    values = []
    for column in KEY_COLUMNS:
        value = row.get(column, "")
        if column == "rho":
            value = f"{float(value):g}"
        elif column in ("num_steps", "nfe", "num_samples"):
            value = str(int(float(value)))
        values.append(str(value))
    return tuple(values)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an existing ``fid_vs_nfe.csv`` (numbers parsed back to int/float), or [] if there is none."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """All ``rows`` as a CSV (columns: the union, in first-seen order), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the main columns, one line per row."""
    lines = [f"{'sampler':<10} {'schedule':<9} {'rho':>5} {'NFE':>4} {'FID':>9} {'s/sample':>9}"]
    for r in rows:
        lines.append(
            f"{r['sampler']:<10} {r['schedule']:<9} {float(r['rho']):>5g} {int(r['nfe']):>4} "
            f"{float(r['fid']):>9.3f} {_number(r.get('sec_per_sample')):>9.4f}"
        )
    return "\n".join(lines)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _parse(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def sweep_specs(
    samplers: Sequence[str], nfes: Sequence[int], rhos: Sequence[float], schedule: str = "karras"
) -> list[SamplerSpec]:
    """Every valid (sampler, rho, NFE) combination (2nd-order samplers need an odd NFE; others are skipped).

    With ``schedule="timesteps"`` (a discrete model's own DDIM-spaced levels) rho plays no role: one rho is used.
    """
    specs = []
    for name in samplers:
        for rho in rhos if schedule == "karras" else rhos[:1]:
            for nfe in nfes:
                try:
                    specs.append(SamplerSpec.from_nfe(name, nfe, rho=rho, schedule=schedule))  # type: ignore[arg-type]
                except ValueError as err:
                    warnings.warn(f"NFESweep: skipping {name} at NFE {nfe}: {err}", stacklevel=2)
    return specs


class NFESweep(L.Callback):
    """Evaluate a trained model over a grid of samplers and NFEs at the end of ``dpmot test``.

    Args:
        samplers: sampler names ("heun", "euler", "ddim", ...).
        nfe: NFE values (odd for heun/stochastic; even values are skipped for them with a warning).
        rho: Karras-schedule exponents (EDM: 7; AOT: 90 unconditional, 72 conditional).
        schedule: "karras" (EDM's rho-schedule) or "timesteps" (a discrete VP model's own DDIM-spaced levels, e.g.
            ``samplers: [ddim]`` for DDIM as published).
        num_samples: samples per setting and seed range (EDM: 50,000 for CIFAR-10).
        seed_ranges: number of disjoint seed ranges (EDM reports the minimum over 3).
        feature: "auto", "inception" or "classifier".
        real_split: split of the reference statistics.
        precision_recall: compute k-NN precision/recall (k = pr_k) against the stored real-feature subset.
        pr_k: k of the k-NN manifolds.
        mode_mixture_taus: thresholds of the mode-mixture rate (needs classifier features).
        copy_threshold: report the copy rate (pixel-space nearest training image closer than this fraction of
            that image's own nearest-neighbour distance; first seed range) and the median ratio; 0 disables.
        curvature_samples: samples whose ODE trajectories are measured (0 disables).
        curvature_steps: Heun steps of the fine reference grid used for the trajectories.
        batch_size: generation batch size per rank.
        output_dir: where ``fid_vs_nfe.csv``, ``fid_vs_nfe.png`` and ``curvature.json`` go (default:
            ``<log_dir>/fid_vs_nfe``); the rows of an existing table are kept and their settings not recomputed.
        cache_dir: reference statistics and classifier cache.
        inception_weights: path of the Inception weights file.
    """

    def __init__(
        self,
        samplers: list[SamplerName] | None = None,
        nfe: list[int] | None = None,
        rho: list[float] | None = None,
        schedule: Literal["karras", "timesteps"] = "karras",
        num_samples: int = 5000,
        seed_ranges: int = 1,
        feature: FeatureKind = "auto",
        real_split: str = "train",
        precision_recall: bool = True,
        pr_k: int = 3,
        mode_mixture_taus: list[float] | None = None,
        copy_threshold: float = 1.0 / 3.0,
        curvature_samples: int = 64,
        curvature_steps: int = 64,
        batch_size: int = 256,
        output_dir: str | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        inception_weights: str | None = None,
    ) -> None:
        super().__init__()
        if seed_ranges < 1 or num_samples < 2:
            raise ValueError(f"need seed_ranges >= 1 and num_samples >= 2, got {seed_ranges} and {num_samples}")
        self.specs = sweep_specs(samplers or ["heun"], nfe or [3, 5, 9, 13, 19, 27, 35], rho or [7.0], schedule)
        if not self.specs:
            raise ValueError("NFESweep: no valid (sampler, NFE) combination")
        self.num_samples, self.seed_ranges = num_samples, seed_ranges
        self.feature_kind, self.real_split, self.batch_size = feature, real_split, batch_size
        self.do_pr, self.pr_k = precision_recall, pr_k
        self.taus = mode_mixture_taus or [0.1, 0.2, 0.3, 0.4]
        self.copy_threshold = copy_threshold
        self._train_images: Tensor | None = None
        self._train_nn: Tensor | None = None
        self.curvature_samples, self.curvature_steps = curvature_samples, curvature_steps
        self.output_dir, self.cache_dir, self.inception_weights = output_dir, cache_dir, inception_weights
        self.rows: list[dict[str, Any]] = []

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: every rank
        out_dir = Path(self.output_dir) if self.output_dir else log_dir / "fid_vs_nfe"
        with torch.inference_mode(False), torch.no_grad():
            self.run(trainer, pl_module, out_dir)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path) -> list[dict[str, Any]]:
        """The whole sweep (collective). Returns every row of the table (complete on rank 0)."""
        csv_path = out_dir / "fid_vs_nfe.csv"
        rows = read_rows(csv_path) if trainer.is_global_zero else []
        rows = trainer.strategy.broadcast(rows)  # one skip decision for all ranks
        done = {setting_key(row): row for row in rows}
        checkpoint = str(trainer.ckpt_path or "")
        todo = [s for s in self.specs if setting_key(self.setting(s, checkpoint)) not in done]
        if len(todo) < len(self.specs):
            rank_zero_info(
                f"NFESweep: {len(self.specs) - len(todo)} of {len(self.specs)} settings already in {csv_path}; "
                f"computing {len(todo)}"
            )
        self.rows = rows
        if todo:
            feature, stats, fid = self.prepare(trainer, pl_module)
        for spec in todo:
            result = self.evaluate_setting(trainer, pl_module, spec, fid, feature, stats)
            row = {**self.setting(spec, checkpoint), **result}
            done[setting_key(row)] = row
            self.rows.append(row)
            if trainer.is_global_zero:  # streamed: an interrupted sweep keeps every finished setting
                self.write(out_dir)
        for spec in self.specs:
            row = done[setting_key(self.setting(spec, checkpoint))]
            pl_module.log(f"test/fid_{spec.tag}@nfe={spec.nfe}", float(row["fid"]), sync_dist=False)
        measure = self.curvature_samples and not (out_dir / "curvature.json").is_file()
        curvature = self.measure_curvature(pl_module, trainer) if measure and trainer.is_global_zero else {}
        if trainer.is_global_zero:
            self.write(out_dir, curvature)
            rank_zero_info(f"NFESweep: {csv_path}\n{format_table(self.rows)}")
        return self.rows

    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[nn.Module, ReferenceStats, nn.Module]:
        """Extractor, reference statistics and the FID metric (collective)."""
        from lightning_dpmot.metrics.fid_metrics import build_fid_metric

        feature, stats = prepare_reference(
            trainer,
            pl_module,
            self.feature_kind,
            self.real_split,
            self.cache_dir,
            self.inception_weights,
            self.batch_size,
        )
        fid = build_fid_metric(feature, stats, rank=trainer.global_rank).to(pl_module.device)
        return feature, stats, fid

    def setting(self, spec: SamplerSpec, checkpoint: str) -> dict[str, Any]:
        """The key columns of ``spec``'s row (see :func:`setting_key`)."""
        return {
            "sampler": spec.name,
            "schedule": spec.schedule,
            "rho": spec.rho,
            "num_steps": spec.num_steps,
            "nfe": spec.nfe,
            "num_samples": self.num_samples,
            "seeds": f"0-{self.seed_ranges * self.num_samples - 1}",
            "checkpoint": checkpoint,
        }

    def evaluate_setting(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        spec: SamplerSpec,
        fid: nn.Module,
        feature: nn.Module,
        stats: ReferenceStats,
    ) -> dict[str, Any]:
        values, first_features, first_probs, first_images, seconds = [], None, None, None, 0.0
        chunks = -(-len(rank_seeds(self.num_samples, trainer.global_rank, trainer.world_size)) // self.batch_size)
        title = f"NFE sweep {spec.name} NFE {spec.nfe}" + (f" rho {spec.rho:g}" if spec.schedule == "karras" else "")
        with progress(trainer, self.seed_ranges * chunks, title) as bar:
            for r in range(self.seed_ranges):
                fid.reset()
                seeds = rank_seeds(self.num_samples, trainer.global_rank, trainer.world_size, r * self.num_samples)
                feats, probs, pixels = [], [], []
                for chunk in seeds.split(self.batch_size):
                    cond = pl_module.generation_conditions(chunk)
                    start = time.perf_counter()
                    sample = pl_module.generate(chunk, cond, spec)
                    seconds += time.perf_counter() - start
                    images = to_unit_range(sample.x.float())
                    fid.update(images, real=False)
                    if r == 0:
                        feats.append(feature(images).float())
                        if self.copy_threshold > 0:
                            pixels.append(sample.x.float())
                        if hasattr(feature, "predict_proba"):
                            probs.append(feature.predict_proba(images).float())
                    bar.advance()
                values.append(float(fid.compute()))
                if r == 0:
                    first_features = gather_rows(trainer, torch.cat(feats))
                    first_probs = gather_rows(trainer, torch.cat(probs)) if probs else None
                    first_images = gather_rows(trainer, torch.cat(pixels)) if pixels else None
            bar.result(f"FID {min(values):.3f}")
        row: dict[str, Any] = {
            "fid": min(values),
            "fid_mean": float(np.mean(values)),
            "fid_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "sec_per_sample": seconds
            / max(1, self.seed_ranges * len(rank_seeds(self.num_samples, trainer.global_rank, trainer.world_size))),
        }
        if trainer.is_global_zero and self.do_pr and stats.features is not None:
            real = torch.as_tensor(stats.features, dtype=torch.float32, device=first_features.device)
            pr = precision_recall(real, first_features, k=self.pr_k)
            row.update(precision=pr.precision, recall=pr.recall)
        if trainer.is_global_zero and first_probs is not None:
            row.update({f"mmr@{tau:g}": v for tau, v in mode_mixture_rate(first_probs, self.taus).items()})
        if trainer.is_global_zero and first_images is not None:
            train, train_nn = self.train_images(trainer, first_images.device)
            report = copy_rate(first_images, train, self.copy_threshold, train_nn_dist=train_nn)
            row.update(copy_rate=report.rate, copy_ratio_median=report.quantiles.get(0.5, float("nan")))
            row.update(copy_rate_nn2=report.rate_second_nn)  # Gu et al. 2023: nearest / second-nearest < 1/3
        return row

    def train_images(self, trainer: L.Trainer, device: torch.device) -> tuple[Tensor, Tensor]:
        """The training split's images and their nearest-neighbour distances (computed once)."""
        if self._train_images is None:
            loader = torch.utils.data.DataLoader(trainer.datamodule.dataset("train"), batch_size=1024)
            with progress(trainer, len(loader) + 1, "copy rate: training images and their nearest neighbours") as bar:
                images = []
                for batch in loader:
                    images.append(batch["x"])
                    bar.advance()
                self._train_images = torch.cat(images).float().to(device)
                self._train_nn = self_nearest_distance(self._train_images)
                bar.advance()
        return self._train_images, self._train_nn

    def measure_curvature(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> dict[str, float]:
        """Straightness of the module's own Heun trajectories on a fine rho = 7 grid (rank 0, no collectives).

        The trajectories are recorded through ``generate``'s step callback, so they start where the module's
        generation starts (DPM-OT: the OT-mapped latents at sigma_s, not Gaussian noise).
        """
        spec = SamplerSpec("heun", num_steps=self.curvature_steps)
        seeds = torch.arange(self.curvature_samples) + 10_000_000
        recorder = TrajectoryRecorder()

        with progress(trainer if trainer is not None else False, self.curvature_steps, "trajectory curvature") as bar:

            def record(info: dict[str, Any]) -> None:
                recorder(info)
                bar.advance()

            pl_module.generate(seeds, pl_module.generation_conditions(seeds), spec, callback=record)
        metrics = mean_trajectory_metrics(*recorder.stack())
        return {**metrics, "num_samples": self.curvature_samples, "heun_steps": self.curvature_steps}

    def write(self, out_dir: Path, curvature: dict[str, float] | None = None) -> None:
        """The table (every row so far), ``curvature.json`` when given, and the plot (rank 0)."""
        write_rows(out_dir / "fid_vs_nfe.csv", self.rows)
        if curvature:
            (out_dir / "curvature.json").write_text(json.dumps(curvature, indent=2))
        plot_fid_vs_nfe(self.rows, out_dir / "fid_vs_nfe.png")


def plot_fid_vs_nfe(rows: list[dict[str, Any]], path: Path) -> Path:
    """FID (log scale) against NFE, one line per (sampler, rho)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for key in dict.fromkeys((r["sampler"], r["rho"]) for r in rows):
        line = sorted((r["nfe"], r["fid"]) for r in rows if (r["sampler"], r["rho"]) == key)
        ax.plot(*zip(*line), marker="o", label=f"{key[0]}, rho={key[1]:g}")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
