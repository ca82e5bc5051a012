"""Sample grids during training: a PNG in the log directory every validation epoch, and a wandb image if active."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_dpmot.models.generation import GenerativeModule
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.images import save_captioned_grid, save_grid, save_scatter
from lightning_dpmot.utils.progress import progress


class SampleGrid(L.Callback):
    """Generate a fixed set of samples (same seeds every time, EMA weights) and save them.

    Images are tiled into ``samples/step=<global_step>.png`` (plus ``samples/latest.png``) under the trainer's log
    directory after every ``every_n_validations``-th validation, and into ``samples/final.png`` when training
    ends; 2-D data is drawn as a scatter plot. Runs on rank 0 only, with no collectives; skipped under
    ``fast_dev_run``.

    Args:
        num_samples: samples per grid.
        every_n_validations: write a grid after every n-th validation run (sanity checks excluded).
        sampler: sampler to use (default: the model's ``sampler``).
        seed_offset: first per-sample seed.
        log_key: wandb image key.
    """

    def __init__(
        self,
        num_samples: int = 64,
        every_n_validations: int = 1,
        sampler: SamplerSpec | None = None,
        seed_offset: int = 0,
        log_key: str = "samples",
    ) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.every_n_validations = every_n_validations
        self.sampler = sampler
        self.seed_offset = seed_offset
        self.log_key = log_key
        self.last_path: Path | None = None
        self.validations = 0

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return  # like ModelCheckpoint, skipped under fast_dev_run
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"  # log_dir is a collective
        if trainer.is_global_zero:
            self.last_path = self.write(trainer, pl_module, out_dir)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "samples"
        if trainer.is_global_zero:  # generate() runs under the module's sampling_mode: EMA weights swapped in
            self.last_path = self.write(trainer, pl_module, out_dir, name="final.png")

    def write(
        self, trainer: L.Trainer, pl_module: GenerativeModule, out_dir: Path, name: str | None = None
    ) -> Path | None:
        seeds = torch.arange(self.seed_offset, self.seed_offset + self.num_samples)
        conditions = pl_module.generation_conditions(seeds)
        spec = self.sampler or getattr(pl_module, "sampler", None)
        with progress(trainer, getattr(spec, "num_steps", None), f"sample grid ({len(seeds)} samples)") as bar:
            result = pl_module.generate(seeds, conditions, self.sampler, callback=lambda _: bar.advance())
        path = out_dir / (name or f"step={trainer.global_step:08d}.png")
        bad = int((~torch.isfinite(result.x.flatten(1)).all(1)).sum())
        if bad:  # never draw NaN as black pixels; NonFiniteGuard decides whether training goes on
            rank_zero_warn(
                f"SampleGrid: {bad} of {len(seeds)} samples at step {trainer.global_step} are NaN/inf; "
                f"{path.name} not written"
            )
            return None
        prompts = next((v for v in conditions.values() if _is_prompt_list(v, len(seeds))), None)
        if result.x.ndim == 4 and prompts is not None:  # text-to-image: each prompt under its image
            title = f"step {trainer.global_step}, NFE {result.nfe}"
            save_captioned_grid(result.x, list(prompts), path, title=title)
            if name is None:
                save_captioned_grid(result.x, list(prompts), out_dir / "latest.png", title=title)
        elif result.x.ndim == 4:  # enlarged to a readable size, with the step and NFE written above
            title = f"step {trainer.global_step}, NFE {result.nfe}"
            save_grid(result.x, path, title=title)
            if name is None:
                save_grid(result.x, out_dir / "latest.png", title=title)
        else:
            save_scatter(result.x[:, :2], path, title=f"step {trainer.global_step}, NFE {result.nfe}")
            if name is None:
                save_scatter(result.x[:, :2], out_dir / "latest.png", title=f"step {trainer.global_step}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=self.log_key, images=[str(path)], step=trainer.global_step, caption=[f"NFE {result.nfe}"]
                )
        return path


def _is_prompt_list(value: object, n: int) -> bool:
    """A list of n strings: the prompts of the samples (the first such generation condition is drawn)."""
    return isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, str) for v in value)
