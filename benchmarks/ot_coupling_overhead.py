"""Training-step overhead of the OT coupling callback on the quickstart model, measured in one run.

The quickstart EDM (DDPM++ U-Net, 8x8 digits) trains with and without ``OTCouplingCallback`` in alternating
blocks of steps (so machine-load drift hits both alike); each step is timed from the first callback hook of the
batch to the end of the optimizer step. Prints median step times, the overhead ratio and PASS/FAIL against the
target (<= 3 % at batch 128).

    python benchmarks/ot_coupling_overhead.py [--batch-size 128] [--blocks 6] [--steps 20] [--solver exact]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning as L
import torch

from lightning_dpmot.callbacks import OTCouplingCallback
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.models import EDMModule
from lightning_dpmot.nets import DDPMppUNet


class StepTimer(L.Callback):
    """Listed first: its batch-start hook runs before any other callback's."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._start)


def quickstart_model() -> EDMModule:
    net = partial(DDPMppUNet, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    return EDMModule(net=net, data_shape=(1, 8, 8), num_classes=10)


def time_block(model: EDMModule, dm: DigitsDataModule, steps: int, coupling: OTCouplingCallback | None) -> list[float]:
    timer = StepTimer()
    callbacks = [timer] + ([coupling] if coupling else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, dm)
    return timer.times[2:]  # drop warm-up steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per variant")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--solver", default="exact")
    parser.add_argument("--cost", default="l2")
    parser.add_argument("--target", type=float, default=0.03)
    args = parser.parse_args()
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=args.batch_size)
    plain: list[float] = []
    coupled: list[float] = []
    for _ in range(args.blocks):
        plain += time_block(quickstart_model(), dm, args.steps, None)
        coupled += time_block(quickstart_model(), dm, args.steps, OTCouplingCallback(args.solver, args.cost))
    t_plain, t_coupled = statistics.median(plain), statistics.median(coupled)
    overhead = t_coupled / t_plain - 1
    print(
        f"quickstart EDM, batch {args.batch_size}, {len(plain)} + {len(coupled)} timed steps, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"  median step without coupling: {1e3 * t_plain:8.2f} ms")
    print(f"  median step with coupling   : {1e3 * t_coupled:8.2f} ms  (solver={args.solver}, cost={args.cost})")
    print(
        f"  overhead: {100 * overhead:+.2f} %  (target <= {100 * args.target:.0f} %)  "
        f"{'PASS' if overhead <= args.target else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
