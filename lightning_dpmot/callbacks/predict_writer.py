"""Write ``dpmot predict`` results: one PNG per sample (named by seed), ``grid.png`` of the first 100 (enlarged to a
readable size) and one ``samples.npz``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.errors import NonFiniteError
from lightning_dpmot.utils.images import save_grid, save_png, save_scatter, to_uint8

#: samples shown in ``grid.png`` (the first by seed)
GRID_SAMPLES = 100


class SampleWriter(BasePredictionWriter):
    """Save generated samples.

    Every rank writes ``<output_dir>/<seed:06d>.png`` for its images as they come; at the end rank 0 merges all
    ranks' samples (sorted by seed, DDP padding duplicates removed) into ``<output_dir>/samples.npz`` with
    ``x`` (N, *S) float32 in [-1, 1], ``images`` (N, H, W, C) uint8 (images only), ``seeds`` and ``labels`` (N,)
    int64, ``nfe``, and any further tensors the model's ``predict_step`` returns (per sample when they have one
    row per sample, e.g. DPM-OT's ``target_index``/``target_id``; else one value per batch). 2-D data gets
    ``scatter.png`` instead of per-sample PNGs. String entries with one string per sample (prompts, e.g.
    ``caption_en``/``caption_zh`` of a text-to-image model) go to ``prompts.csv``: seed, PNG name and the prompts.

    Non-finite samples (NaN/inf anywhere in a sample) are never written: they get no PNG, and when any rank produced
    one, no ``samples.npz`` is written and :class:`~lightning_dpmot.errors.NonFiniteError` names how many samples
    (and which seeds) were affected (``dpmot predict`` exits 3).

    Args:
        output_dir: where to write (default: ``<log_dir>/predictions``, a fresh logger version per run); must be
            empty or absent unless ``overwrite`` is set.
        overwrite: allow writing into a non-empty directory.
        save_png: write one PNG per image sample.
    """

    def __init__(self, output_dir: str | None = None, overwrite: bool = False, save_png: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.requested_dir = output_dir
        self.output_dir = Path(output_dir or "predictions")
        self.overwrite = overwrite
        self.save_png = save_png
        self._parts: list[dict[str, torch.Tensor]] = []
        self._texts: dict[str, list[str]] = {}
        self._nonfinite_seeds: list[int] = []
        self._count = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.requested_dir is None:
            self.output_dir = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"  # collective
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"SampleWriter: output_dir {str(self.output_dir)!r} is not empty; choose another directory or set "
                "overwrite: true (existing files with the same seeds would be replaced)"
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._parts = []
        self._texts = {}
        self._nonfinite_seeds = []
        self._count = 0

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        x, seeds = prediction["x"].detach().cpu(), prediction["seed"].detach().cpu()
        labels = prediction.get("label")
        labels = labels.detach().cpu() if labels is not None else torch.full_like(seeds, -1)
        finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        self._nonfinite_seeds += seeds[~finite].tolist()
        self._count += len(seeds)
        if self.save_png and x.ndim == 4:
            for img, seed, ok in zip(x, seeds.tolist(), finite.tolist()):
                if ok:
                    save_png(img, self.output_dir / f"{seed:06d}.png")
        part = {"x": x, "seeds": seeds, "labels": labels, "nfe": prediction["nfe"].reshape(1).cpu()}
        for key, value in prediction.items():  # further per-sample entries, e.g. DPM-OT's target_index
            if key not in ("x", "seed", "label", "nfe") and isinstance(value, Tensor):
                value = value.detach().cpu()
                part[key] = value if value.ndim and len(value) == len(seeds) else value.reshape(1)
            elif (
                isinstance(value, (list, tuple)) and len(value) == len(seeds) and all(isinstance(v, str) for v in value)
            ):
                self._texts.setdefault(key, []).extend(value)  # prompts: one string per sample
        self._parts.append(part)

    @override
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = torch.tensor([len(self._nonfinite_seeds), self._count], dtype=torch.float64)
        counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        bad, total = int(counts[0]), int(counts[1])
        if bad:
            examples = ", ".join(str(s) for s in self._nonfinite_seeds[:8]) or "on other ranks"
            raise NonFiniteError(
                f"predict: {bad} of {total} generated samples are NaN/inf (seeds {examples}"
                f"{', …' if len(self._nonfinite_seeds) > 8 else ''}); no samples.npz written and no PNG of them in "
                f"{self.output_dir}; the checkpoint's weights or the sampler settings diverge"
            )
        part_file = self.output_dir / f".part-rank{trainer.global_rank}.pt"
        tensors = {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}
        torch.save({"tensors": tensors, "texts": self._texts}, part_file)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.merge(trainer.world_size)
        trainer.strategy.barrier()

    def merge(self, world_size: int) -> Path:
        parts, texts = [], []
        for rank in range(world_size):
            part_file = self.output_dir / f".part-rank{rank}.pt"
            saved = torch.load(part_file, weights_only=True)
            parts.append(saved["tensors"])
            texts.append(saved["texts"])
            part_file.unlink()
        merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        seeds, first = np.unique(merged["seeds"].numpy(), return_index=True)  # sorted, DDP duplicates dropped
        if texts and texts[0]:
            all_texts = {key: [t for part in texts for t in part[key]] for key in texts[0]}
            self.write_prompts_csv(seeds, {key: [value[i] for i in first] for key, value in all_texts.items()})
        x = merged["x"][torch.from_numpy(first)]
        arrays: dict[str, np.ndarray] = {
            "x": x.float().numpy(),
            "seeds": seeds,
            "labels": merged["labels"][torch.from_numpy(first)].numpy(),
            "nfe": merged["nfe"].max().numpy(),
        }
        per_sample = len(merged["seeds"])
        for key, value in merged.items():
            if key not in arrays and key != "x":
                arrays[key] = (value[torch.from_numpy(first)] if len(value) == per_sample else value).numpy()
        if x.ndim == 4:
            arrays["images"] = rearrange(to_uint8(x), "n c h w -> n h w c").numpy()
            shown = min(len(x), GRID_SAMPLES)  # one readable picture beside the individual PNGs
            title = f"seeds {seeds[0]}-{seeds[shown - 1]} of {len(seeds)} samples, NFE {int(arrays['nfe'])}"
            save_grid(x[:shown], self.output_dir / "grid.png", title=title)
        else:
            save_scatter(x[:, :2], self.output_dir / "scatter.png", title=f"{len(seeds)} samples")
        path = self.output_dir / "samples.npz"
        np.savez(path, **arrays)
        return path

    def write_prompts_csv(self, seeds: np.ndarray, texts: dict[str, list[str]]) -> Path:
        """``prompts.csv``: one row per sample (sorted by seed) with its PNG and its prompt entries."""
        path = self.output_dir / "prompts.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["seed", "png", *texts])
            for i, seed in enumerate(seeds.tolist()):
                png = f"{seed:06d}.png" if self.save_png else ""
                writer.writerow([seed, png, *(texts[key][i] for key in texts)])
        return path
