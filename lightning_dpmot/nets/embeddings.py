"""Noise-level and class-label embeddings shared by the networks.

* :class:`PositionalEmbedding`: the transformer sinusoids used by DDPM++ (EDM's ``endpoint=True`` variant).
* :class:`FourierEmbedding`: random Fourier features used by NCSN++. Its ``freqs`` buffer is drawn from a
  private generator with a fixed seed, so every process (every DDP rank) builds the identical buffer no matter
  how the global RNG was seeded.
* :func:`class_one_hot`: one-hot class labels scaled by sqrt(K); the null label -1 maps to all zeros.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

Order = Literal["cos_sin", "sin_cos"]

#: Seed of the generator behind :class:`FourierEmbedding`'s ``freqs`` (identical on every rank).
FOURIER_SEED = 0


def _sinusoids(phase: Tensor, order: Order) -> Tensor:
    """Concatenate cos/sin of phase: (B, N) -> (B, 2N) in the requested order."""
    if order == "cos_sin":
        return torch.cat([phase.cos(), phase.sin()], dim=1)
    return torch.cat([phase.sin(), phase.cos()], dim=1)


def _check_order(order: str) -> None:
    if order not in ("cos_sin", "sin_cos"):
        raise ValueError(f"order must be 'cos_sin' or 'sin_cos', got {order!r}")


def _check_channels(num_channels: int) -> None:
    if num_channels < 2 or num_channels % 2:
        raise ValueError(f"num_channels must be an even number >= 2, got {num_channels}")


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample with geometrically spaced frequencies.

    The frequencies are ``max_positions ** (-i / n)`` for ``i = 0 .. N/2 - 1``, with ``n = N/2 - 1`` when
    ``endpoint`` (so the lowest frequency is exactly ``1 / max_positions``, EDM's DDPM++) and ``n = N/2``
    otherwise (the original transformer / ADM convention).

    Args:
        num_channels: output width N (even).
        max_positions: inverse of the lowest frequency.
        endpoint: include the frequency ``1 / max_positions`` itself.
        order: ``"cos_sin"`` or ``"sin_cos"`` (EDM's SongUNet swaps to sin first).
    """

    freqs: Tensor

    def __init__(
        self,
        num_channels: int,
        max_positions: float = 10_000.0,
        endpoint: bool = False,
        order: Order = "cos_sin",
    ) -> None:
        super().__init__()
        _check_channels(num_channels)
        _check_order(order)
        if endpoint and num_channels < 4:
            raise ValueError(f"endpoint=True needs num_channels >= 4, got {num_channels}")
        self.num_channels, self.max_positions, self.endpoint, self.order = (
            num_channels,
            max_positions,
            endpoint,
            order,
        )
        half = num_channels // 2
        exponent = torch.arange(half, dtype=torch.float64) / (half - 1 if endpoint else half)
        self.register_buffer("freqs", (1.0 / max_positions) ** exponent.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) -> (B, num_channels)."""
        return _sinusoids(torch.outer(x, self.freqs.to(x.dtype)), self.order)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, max_positions={self.max_positions}, endpoint={self.endpoint}, "
            f"order={self.order}"
        )


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi f x), sin(2 pi f x)]`` with ``f ~ N(0, scale^2)``.

    ``freqs`` is sampled from ``torch.Generator().manual_seed(seed)``, never from the global RNG, so two
    constructions with the same ``num_channels``, ``scale`` and ``seed`` give identical buffers (DDP ranks
    agree even when the buffer is not broadcast). It is a persistent buffer, so checkpoints carry it.

    Args:
        num_channels: output width N (even).
        scale: standard deviation of the frequencies (16 in NCSN++).
        seed: seed of the private generator.
        order: ``"cos_sin"`` or ``"sin_cos"``.
    """

    freqs: Tensor

    def __init__(
        self, num_channels: int, scale: float = 16.0, seed: int = FOURIER_SEED, order: Order = "cos_sin"
    ) -> None:
        super().__init__()
        _check_channels(num_channels)
        _check_order(order)
        self.num_channels, self.scale, self.order = num_channels, scale, order
        generator = torch.Generator().manual_seed(seed)
        # drawn on the CPU (where the generator lives) whatever the default device, then moved with the module
        freqs = torch.randn(num_channels // 2, generator=generator, device="cpu") * scale
        self.register_buffer("freqs", freqs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) -> (B, num_channels)."""
        return _sinusoids(torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype)), self.order)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}, order={self.order}"


def noise_embedding(
    embedding_type: Literal["positional", "fourier"], num_channels: int, order: Order = "cos_sin"
) -> nn.Module:
    """EDM's noise embedding by name: positional (DDPM++, endpoint=True) or Fourier (NCSN++, scale 16)."""
    if embedding_type == "positional":
        return PositionalEmbedding(num_channels, endpoint=True, order=order)
    if embedding_type == "fourier":
        return FourierEmbedding(num_channels, order=order)
    raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")


def check_class_labels(class_labels: Tensor, num_classes: int, batch_size: int) -> None:
    """Raise ValueError unless class_labels is a (batch_size,) integer tensor with values in [-1, K).

    The range check reads the values (a device sync on accelerators); it is skipped while ``torch.compile``
    traces the model.
    """
    if class_labels.shape != (batch_size,):
        raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}")
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be an integer tensor (int64), got dtype {class_labels.dtype}")
    if torch.compiler.is_compiling() or class_labels.numel() == 0:
        return
    lo, hi = int(class_labels.min()), int(class_labels.max())
    if lo < -1 or hi >= num_classes:
        raise ValueError(
            f"class_labels must lie in [-1, {num_classes - 1}] (-1 = no class), got values in [{lo}, {hi}]"
        )


def class_one_hot(class_labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot labels scaled by sqrt(K), as fed to EDM's label map.

    Args:
        class_labels: (B,) int64 in [-1, K); -1 ("no class", the classifier-free-guidance null label) gives a
            row of zeros. Values are not range-checked here (see :func:`check_class_labels`).
        num_classes: K >= 1.
        dtype: dtype of the result.

    Returns:
        (B, K) with entries 0 or sqrt(K).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    classes = torch.arange(num_classes, device=class_labels.device)
    hot = class_labels.unsqueeze(1) == classes  # (B, K); -1 matches no column
    return hot.to(dtype) * math.sqrt(num_classes)
