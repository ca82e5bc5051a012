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

GPU (issue F item 7b, the DDPM++ CIFAR-10 network of configs/edm/cifar10_ddpmpp.yaml on random 3x32x32 uint8 images,
bf16 autocast in both arms; CUDA is synchronised before every time stamp):

    python benchmarks/train_step.py --device cuda --precision bf16-mixed --net ddpmpp-cifar10

Defaults (``--device cpu --precision 32-true --net quickstart``) are the CPU measurement of benchmarks/README.md.
``--model-channels`` shrinks the chosen network (smoke runs only).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_dpmot.callbacks import EMAHalfLife
from lightning_dpmot.callbacks.ema import ema_beta
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.data.base import TensorDictDataset
from lightning_dpmot.models import EDMModule
from lightning_dpmot.models.base import SIGMA
from lightning_dpmot.nets import DDPMppUNet

HALFLIFE, RAMPUP = 20_000, 0.05
# network and one-sample shape of each --net choice (quickstart: configs/quickstart.yaml; ddpmpp-cifar10:
# configs/edm/cifar10_ddpmpp.yaml)
NETS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "quickstart": (
        dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0),
        (1, 8, 8),
    ),
    "ddpmpp-cifar10": (
        dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
        (3, 32, 32),
    ),
}


def build_model(args: argparse.Namespace) -> EDMModule:
    """The ``--net`` model (``--model-channels`` overrides its width), seeded, without LR warm-up."""
    torch.manual_seed(0)
    kwargs, shape = NETS[args.net]
    if args.model_channels:
        kwargs = {**kwargs, "model_channels": args.model_channels}
    return EDMModule(net=partial(DDPMppUNet, **kwargs), data_shape=shape, num_classes=10, lr_warmup_images=0)


class RandomImages(L.LightningDataModule):
    """Random uint8 images of one shape with labels (CIFAR-10's 3x32x32 without the download), fixed seed."""

    def __init__(self, shape: tuple[int, ...], batch_size: int, num_items: int = 2048) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (num_items, *shape), generator=g, dtype=torch.uint8)
        self.dataset = TensorDictDataset(x, torch.randint(0, 10, (num_items,), generator=g))
        self.batch_size = batch_size

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)


def build_data(args: argparse.Namespace) -> L.LightningDataModule:
    if args.net == "quickstart":
        return DigitsDataModule(batch_size=args.batch_size)
    return RandomImages(NETS[args.net][1], args.batch_size)


def stamp(device: torch.device) -> float:
    """Wall-clock time after the device finished the queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class StepClock(L.Callback):
    """Wall-clock time at the end of every training step (after the EMA update: listed last)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stamps.append(stamp(pl_module.device))


def lightning_block(dm: L.LightningDataModule, args: argparse.Namespace) -> list[float]:
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if args.device == "cuda" else "cpu",
            devices=1,
            precision=args.precision,
            max_steps=args.steps,
            limit_val_batches=0,
            logger=CSVLogger(tmp, name="bench"),
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[EMAHalfLife(HALFLIFE, RAMPUP), clock],
        )
        trainer.fit(build_model(args), dm)
    return clock.stamps


def bare_block(dm: L.LightningDataModule, args: argparse.Namespace) -> list[float]:
    device, steps = torch.device(args.device), args.steps
    model = build_model(args).to(device)
    model.train()
    bf16 = args.precision == "bf16-mixed"
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    dm.setup("fit")
    stamps: list[float] = []
    step = 0
    while step < steps:
        for batch_idx, batch in enumerate(dm.train_dataloader()):
            batch = {k: v.to(device) for k, v in batch.items()}
            x = batch["x"]
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
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
            stamps.append(stamp(device))
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
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    parser.add_argument("--net", choices=list(NETS), default="quickstart")
    parser.add_argument("--model-channels", type=int, default=None, help="override the network's width (smoke runs)")
    args = parser.parse_args()
    dm = build_data(args)
    light: list[float] = []
    bare: list[float] = []
    for b in range(args.blocks):
        arms = [("bare", bare_block), ("lightning", lightning_block)]
        for name, block in arms if b % 2 == 0 else reversed(arms):
            (bare if name == "bare" else light).extend(step_times(block(dm, args), args.warmup))
    t_bare, t_light = statistics.median(bare), statistics.median(light)
    ips_bare, ips_light = args.batch_size / t_bare, args.batch_size / t_light
    slower = t_light / t_bare - 1
    what = "quickstart EDMModule (DDPM++ on 8x8 digits)" if args.net == "quickstart" else f"EDMModule {args.net}"
    width = f", model_channels {args.model_channels}" if args.model_channels else ""
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, torch threads {torch.get_num_threads()}"
    print(
        f"{what}{width}, batch {args.batch_size}, EMA + Adam, {args.precision}, "
        f"{len(bare)} + {len(light)} timed steps, {device}"
    )
    print(f"  bare PyTorch loop: median step {1e3 * t_bare:8.2f} ms  ({ips_bare:8.1f} images/s)")
    print(f"  Lightning        : median step {1e3 * t_light:8.2f} ms  ({ips_light:8.1f} images/s)")
    verdict = "PASS" if slower <= args.target else "FAIL"
    print(f"  Lightning slower by {100 * slower:+.2f} %  (target <= {100 * args.target:.0f} %)  {verdict}")


if __name__ == "__main__":
    main()
