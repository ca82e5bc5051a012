"""Full-precision islands inside mixed-precision training (Lightning's ``precision="bf16-mixed"``).

Under ``bf16-mixed`` Lightning runs ``training_step`` (and the other ``*_step`` methods) inside
``torch.autocast(device_type, dtype=torch.bfloat16)``: GEMMs and convolutions on float32 tensors run in bf16 (8 bits of
mantissa, ~4e-3 relative), elementwise ops keep their inputs' dtype, and float64 tensors are never cast. The network
is meant to run that way; the numerics around it are not. The EDM preconditioning and loss, OT costs and solvers, the
contrastive logits and distance-based metrics therefore run their GEMMs in one of the two blocks below, whatever the
caller's autocast state:

- :func:`autocast_off`: autocast disabled for the device (float32 inputs stay float32);
- :func:`exact_fp32`: that, and ``torch.set_float32_matmul_precision("highest")`` (no TF32 on GPUs), for GEMMs whose
  result ranks or assigns (OT, nearest neighbours), where ~1e-3 relative error moves samples across cell faces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def autocast_off(device: torch.device | str) -> Iterator[None]:
    """Disable autocast for ``device``'s type in the enclosed block (restored on exit)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


@contextlib.contextmanager
def exact_fp32(device: torch.device | str) -> Iterator[None]:
    """Run the enclosed GEMMs in true fp32: autocast off and ``float32_matmul_precision("highest")``.

    TF32/bf16 round scores ~1e-3 relative and mis-assign samples near cell faces. The previous precision is
    restored on exit (the setting is process-global; use from the thread that runs the model).
    """
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with autocast_off(device):
            yield
    finally:
        torch.set_float32_matmul_precision(previous)


__all__ = ["autocast_off", "exact_fp32"]
