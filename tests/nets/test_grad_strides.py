"""Gradient layout of the DDPM++ U-Nets: every parameter contiguous and every ``.grad`` with the parameter's strides.

DDP copies each gradient into a flat bucket view with the parameter's strides and warns "Grad strides do not match
bucket view strides" (and copies slowly) when they differ. The single-head attention output used to reach the 1x1
convs as a channels-last view; oneDNN then returned (O, I, 1, 1) weight gradients with channels-last strides, which
``.is_contiguous()`` does not see (size-1 dims), so strides are compared exactly here. oneDNN runs the 1x1 convs
(and shows the bug) for batches of 16 or more even on one thread, hence B = 16.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_unet
from torch import nn

from lightning_dpmot.nets import DDPMppUNet

BATCH = 16


def text_unet(num_heads: int) -> DDPMppUNet:
    """The text-to-image U-Net of ``tiny_text2img`` (cross-attention at 8x8), with self-attention at 8x8 too."""
    return DDPMppUNet(
        (3, 16, 16),
        model_channels=8,
        channel_mult=[1, 2],
        num_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
        cross_attn_resolutions=[8],
        context_dim=16,
        num_heads=num_heads,
    )


def mismatched_grads(net: nn.Module, loss: torch.Tensor) -> list[str]:
    """Names (with strides) of the parameters whose gradient strides differ from the parameter's after backward."""
    loss.backward()
    bad = []
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        if p.grad.stride() != p.stride():
            bad.append(f"{name}: param {p.stride()} grad {p.grad.stride()}")
    return bad


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_unet()((1, 8, 8), num_classes=10),
        lambda: tiny_unet(embedding_type="fourier", encoder_type="residual", resample_filter=[1, 3, 3, 1])((3, 8, 8)),
    ],
    ids=["ddpmpp", "ncsnpp"],
)
def test_ddpmpp_params_contiguous_and_grads_keep_their_strides(build) -> None:
    torch.manual_seed(0)
    net = build()
    assert all(p.is_contiguous() for p in net.parameters())
    x = torch.randn(BATCH, *net.data_shape)
    cond = {"label": torch.arange(BATCH) % 10} if net.num_classes else None
    out = net(x, torch.randn(BATCH), cond)
    assert out.is_contiguous()
    assert mismatched_grads(net, out.square().mean()) == []


@pytest.mark.parametrize("num_heads", [1, 2])
def test_text_unet_params_contiguous_and_grads_keep_their_strides(num_heads: int) -> None:
    torch.manual_seed(0)
    net = text_unet(num_heads)
    assert all(p.is_contiguous() for p in net.parameters())
    cond = {
        "tokens": torch.randn(BATCH, 5, 16),
        "mask": torch.arange(5).expand(BATCH, 5) < torch.arange(BATCH)[:, None] % 6,  # row 0: empty (null)
        "pooled": torch.randn(BATCH, 16),
    }
    out = net(torch.randn(BATCH, 3, 16, 16), torch.randn(BATCH), cond)
    assert mismatched_grads(net, out.square().mean()) == []


DDP_SCRIPT = """
import sys
from functools import partial

import lightning as L
import torch

from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.models import EDMModule
from lightning_dpmot.nets import DDPMppUNet

if __name__ == "__main__":
    torch.set_num_threads(1)
    L.seed_everything(0)
    net = partial(DDPMppUNet, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    model = EDMModule(net=net, data_shape=(1, 8, 8), num_classes=10)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=sys.argv[1],
    )
    trainer.fit(model, DigitsDataModule(batch_size=16))
    print("STEPS", trainer.global_step, flush=True)
"""


@pytest.mark.slow
def test_ddp_training_of_ddpmpp_emits_no_grad_stride_warning(tmp_path: Path) -> None:
    """2-process DDP (gloo) for 2 steps of EDM with the DDPM++ net: the reducer's C++ warning is printed to the
    children's stderr, so the run is a script in a subprocess (Lightning's DDP launcher re-runs it per rank)."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always", "PYTHONPATH": str(REPO)}
    env.pop("PL_GLOBAL_SEED", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "root")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert proc.stdout.count("STEPS 2") == 2, output[-4000:]  # both ranks trained
    assert "Grad strides do not match" not in output, output[-4000:]
