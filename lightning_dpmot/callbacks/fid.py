"""FID (and KID) during training: EMA samples at several (sampler, NFE) settings, computed on all ranks.

Each evaluation generates the same ``num_samples`` seeds (split across ranks), feeds them to torchmetrics'
FID/KID with the dataset's feature extractor (Inception-v3 for RGB >= 32 px, the small-data classifier
otherwise), and computes collectively — every rank calls ``compute`` and gets the same value, so nothing hangs.
Real statistics are computed once per (dataset, split, extractor) and cached on disk.

Logged to every logger: ``val/fid@nfe=<K>`` (and ``val/kid@nfe=<K>``); with several sampler kinds the key
carries the name, ``val/fid_<sampler>@nfe=<K>``. Rank 0 keeps ``fid_curve.csv`` and ``fid_curve.png`` (FID
against training images seen, one line per setting) in the log directory.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from typing_extensions import override

from lightning_dpmot.callbacks.reference import prepare_reference
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.metrics.extractors import DEFAULT_CACHE_DIR, FeatureKind
from lightning_dpmot.metrics.reference_stats import to_unit_range
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.distributed import rank_seeds
from lightning_dpmot.utils.progress import progress


def metric_key(metric: str, spec: SamplerSpec, specs: list[SamplerSpec]) -> str:
    """``val/fid@nfe=35``, or ``val/fid_heun-karras-rho7@nfe=35`` when the settings differ in more than NFE."""
    several_kinds = len({s.tag for s in specs}) > 1
    return f"val/{metric}_{spec.tag}@nfe={spec.nfe}" if several_kinds else f"val/{metric}@nfe={spec.nfe}"


class FIDCallback(L.Callback):
    """Periodic FID/KID of EMA samples.

    Args:
        samplers: settings to evaluate (default: the model's own ``sampler``).
        guidance: guidance of the generated samples (default: the model's own ``guidance``).
        num_samples: generated samples per setting (EDM's protocol uses 50,000; fewer is noisier and biased up).
        every_n_validations: evaluate after every n-th validation run (sanity checks excluded).
        feature: "auto", "inception" or "classifier" (see ``lightning_dpmot.metrics.extractors``).
        real_split: split whose statistics are the reference ("train", as EDM).
        kid: also compute KID (needs ``num_samples >= kid_subset_size``).
        kid_subset_size: KID subset size.
        batch_size: generation batch size per rank.
        seed_offset: first generation seed (the same seeds every evaluation).
        cache_dir: where reference statistics and trained classifiers are cached.
        inception_weights: path of the Inception weights file.
    """

    def __init__(
        self,
        samplers: list[SamplerSpec] | None = None,
        guidance: GuidanceSpec | None = None,
        num_samples: int = 5000,
        every_n_validations: int = 1,
        feature: FeatureKind = "auto",
        real_split: str = "train",
        kid: bool = False,
        kid_subset_size: int = 1000,
        batch_size: int = 256,
        seed_offset: int = 1_000_000,
        cache_dir: str = DEFAULT_CACHE_DIR,
        inception_weights: str | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}")
        if kid and num_samples < kid_subset_size:
            raise ValueError(f"kid needs num_samples >= kid_subset_size ({num_samples} < {kid_subset_size})")
        self.samplers, self.guidance = samplers, guidance
        self.num_samples, self.every_n_validations, self.feature_kind = num_samples, every_n_validations, feature
        self.real_split, self.kid, self.kid_subset_size = real_split, kid, kid_subset_size
        self.batch_size, self.seed_offset = batch_size, seed_offset
        self.cache_dir, self.inception_weights = cache_dir, inception_weights
        self.history: list[dict[str, Any]] = []
        self.validations = 0
        self._fid: nn.Module | None = None
        self._kid: nn.Module | None = None

    # ------------------------------------------------------------------------------------------------- set-up
    def prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Build the extractor and load real statistics (rank 0 first fills the caches; collective)."""
        from lightning_dpmot.metrics.fid_metrics import build_fid_metric, build_kid_metric

        feature, stats = prepare_reference(
            trainer,
            pl_module,
            self.feature_kind,
            self.real_split,
            self.cache_dir,
            self.inception_weights,
            self.batch_size,
        )
        rank, world = trainer.global_rank, trainer.world_size
        self._fid = build_fid_metric(feature, stats, rank=rank).to(pl_module.device)
        if self.kid:
            self._kid = build_kid_metric(
                feature, stats, subset_size=self.kid_subset_size, rank=rank, world_size=world
            ).to(pl_module.device)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.prepare(trainer, pl_module)

    # ------------------------------------------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate and score every setting; collective (call on all ranks). Returns {key: value}."""
        if self._fid is None:
            self.prepare(trainer, pl_module)
        specs = self.samplers or [pl_module.sampler]
        seeds = rank_seeds(self.num_samples, trainer.global_rank, trainer.world_size, self.seed_offset)
        results: dict[str, float] = {}
        for spec in specs:
            self._fid.reset()
            if self._kid is not None:
                self._kid.reset()
            key = metric_key("fid", spec, specs)
            with progress(trainer, -(-len(seeds) // self.batch_size), f"{key} ({self.num_samples} samples)") as bar:
                for _, _, sample in pl_module.generate_many(seeds, self.batch_size, spec, self.guidance):
                    images = to_unit_range(sample.x.float())
                    self._fid.update(images, real=False)
                    if self._kid is not None:
                        self._kid.update(images, real=False)
                    bar.advance()
                results[key] = float(self._fid.compute())
                bar.result(f"{results[key]:.3f}")
            if self._kid is not None:
                results[metric_key("kid", spec, specs)] = float(self._kid.compute()[0])
        return results

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        results = self.evaluate(trainer, pl_module)  # generate() swaps EMA weights in (sampling_mode)
        images_seen = pl_module.images_seen() if hasattr(pl_module, "images_seen") else trainer.global_step
        for key, value in results.items():
            pl_module.log(key, value, sync_dist=False)  # identical on every rank
            self.history.append({"step": trainer.global_step, "images": images_seen, "key": key, "value": value})
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # collective: outside rank-zero code
        if trainer.is_global_zero:
            self.write_curve(log_dir, trainer)

    def write_curve(self, log_dir: Path, trainer: L.Trainer) -> Path:
        """``fid_curve.csv`` and ``fid_curve.png``: every evaluation so far, one line per metric key."""
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "fid_curve.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "images", "key", "value"])
            writer.writeheader()
            writer.writerows(self.history)
        ylabel = f"{curve_ylabel(self.history)} ({self.num_samples:,} samples)"
        path = plot_curves(self.history, log_dir / "fid_curve.png", ylabel)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="fid_curve", images=[str(path)], step=trainer.global_step)
        return path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "validations": self.validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.validations = int(state_dict.get("validations", 0))


def curve_ylabel(history: list[dict[str, Any]]) -> str:
    """The y-axis name of the curve from its metric keys: ``FID`` for ``val/fid@nfe=35``, ``FID / KID`` for both."""
    names = dict.fromkeys(h["key"].split("/")[-1].split("@")[0].split("_")[0].upper() for h in history)
    return " / ".join(names) or "FID"


def plot_curves(history: list[dict[str, Any]], path: Path, ylabel: str | None = None) -> Path:
    """Metric value against training images, one line per key (log-scaled y); ``ylabel`` names the y-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in sorted({h["key"] for h in history}):
        rows = [h for h in history if h["key"] == key]
        ax.plot([r["images"] for r in rows], [r["value"] for r in rows], marker="o", label=key)
    ax.set_xlabel("training images")
    ax.set_ylabel(ylabel or curve_ylabel(history))
    if history and min(h["value"] for h in history) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
