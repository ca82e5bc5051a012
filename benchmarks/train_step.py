"""Training throughput of ``EDMModule`` under Lightning vs a bare PyTorch loop of the same work, in one run.

Both arms train the quickstart model (DDPM++ U-Net on the 8x8 digits, as configs/quickstart.yaml, batch 128) from
the same DataLoader with the same per-step work: the module's noise hook, condition dropout, seeded dropout RNG and
EDM loss, backward, Adam, the LR-warm-up scheduler step and EDM's EMA update (``torch._foreach_lerp_`` with the
``EMAHalfLife`` decay). The Lightning arm is ``Trainer.fit`` as users run it (``EMAHalfLife`` callback, a
``CSVLogger`` writing every 50 steps, ``train/loss`` logged every step; no checkpointing, no progress bar, no
validation); the bare arm is a ``for`` loop over the same loader. Arms alternate in blocks so that machine-load drift
hits both; each block's first steps are warm-up. Prints images/s of both, the ratio and PASS/FAIL against the target
(Lightning at most 5 % slower).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py [--batch-size 128] [--blocks 4] [--steps 60] [--warmup 10]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from functools import partial

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_dpmot.callbacks import EMAHalfLife
from lightning_dpmot.callbacks.ema import ema_beta
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.models import EDMModule
from lightning_dpmot.models.base import SIGMA
from lightning_dpmot.nets import DDPMppUNet

HALFLIFE, RAMPUP = 20_000, 0.05


def quickstart_model() -> EDMModule:
    torch.manual_seed(0)
    net = partial(DDPMppUNet, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    return EDMModule(net=net, data_shape=(1, 8, 8), num_classes=10, lr_warmup_images=0)


class StepClock(L.Callback):
    """Wall-clock time at the end of every training step (after the EMA update: listed last)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(time.perf_counter())


def lightning_block(dm: DigitsDataModule, steps: int) -> list[float]:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            limit_val_batches=0,
            logger=CSVLogger(tmp, name="bench"),
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[EMAHalfLife(HALFLIFE, RAMPUP), clock],
        )
        trainer.fit(quickstart_model(), dm)
    return clock.stamps


def bare_block(dm: DigitsDataModule, steps: int) -> list[float]:
    model = quickstart_model()
    model.train()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    dm.setup("fit")
    stamps: list[float] = []
    step = 0
    while step < steps:
        for batch_idx, batch in enumerate(dm.train_dataloader()):
            x = batch["x"]
            noise = model.draw_noise(x, batch_idx)
            cond = model.training_condition(batch, batch_idx)
            with model.step_rng(batch_idx):
                loss = model.loss(x, noise, cond, model.step_generator(SIGMA, batch_idx)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            beta = ema_beta(x.shape[0], HALFLIFE, step * x.shape[0], RAMPUP)
            torch._foreach_lerp_(ema_params, params, 1.0 - beta)
            float(loss.detach())  # the Lightning arm logs the loss every step (a sync on GPU)
            stamps.append(time.perf_counter())
            step += 1
            if step >= steps:
                break
    return stamps


def step_times(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="alternating blocks per arm")
    parser.add_argument("--steps", type=int, default=60, help="steps per block")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of every block")
    parser.add_argument("--target", type=float, default=0.05)
    args = parser.parse_args()
    dm = DigitsDataModule(batch_size=args.batch_size)
    light: list[float] = []
    bare: list[float] = []
    for b in range(args.blocks):
        arms = [("bare", bare_block), ("lightning", lightning_block)]
        for name, block in arms if b % 2 == 0 else reversed(arms):
            (bare if name == "bare" else light).extend(step_times(block(dm, args.steps), args.warmup))
    t_bare, t_light = statistics.median(bare), statistics.median(light)
    ips_bare, ips_light = args.batch_size / t_bare, args.batch_size / t_light
    slower = t_light / t_bare - 1
    print(
        f"quickstart EDMModule (DDPM++ on 8x8 digits), batch {args.batch_size}, EMA + Adam, "
        f"{len(bare)} + {len(light)} timed steps, torch threads {torch.get_num_threads()}"
    )
    print(f"  bare PyTorch loop: median step {1e3 * t_bare:8.2f} ms  ({ips_bare:8.1f} images/s)")
    print(f"  Lightning        : median step {1e3 * t_light:8.2f} ms  ({ips_light:8.1f} images/s)")
    verdict = "PASS" if slower <= args.target else "FAIL"
    print(f"  Lightning slower by {100 * slower:+.2f} %  (target <= {100 * args.target:.0f} %)  {verdict}")


if __name__ == "__main__":
    main()
