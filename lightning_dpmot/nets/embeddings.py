"""Embeddings of the noise level and of the class label, shared by all networks.

* :class:`PositionalEmbedding`: transformer sinusoids of a scalar (DDPM++: EDM's ``endpoint=True`` variant).
* :class:`FourierEmbedding`: random Fourier features (NCSN++). The ``freqs`` buffer comes from a private
  generator with a fixed seed, so every process (every DDP rank) builds the same buffer, whatever the global
  seed.
* :func:`class_one_hot` / :class:`ClassEmbedding`: EDM's label map, a Linear layer on one-hot * sqrt(K). The
  null label -1 (and ``class_labels=None``) is an all-zero one-hot, so only the layer's bias enters (EDM's
  label dropout produces exactly this input).
* :func:`check_batch`, :func:`noise_vector`, :func:`check_class_labels`: input checks of the common net
  interface ``forward(x (B, *data_shape), noise_labels (B,), cond | None)`` (class labels: ``cond["label"]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

Order = Literal["sin_cos", "cos_sin"]

#: Seed of the private generator behind :class:`FourierEmbedding`'s ``freqs`` (the same on every rank).
FOURIER_SEED = 0


def _sinusoids(phase: Tensor, order: Order) -> Tensor:
    """phase: (B, N) -> (B, 2N), the sines and cosines concatenated in the given order."""
    parts = [phase.sin(), phase.cos()] if order == "sin_cos" else [phase.cos(), phase.sin()]
    return torch.cat(parts, dim=1)


def _check_embedding_args(num_channels: int, order: str) -> None:
    if num_channels < 2 or num_channels % 2:
        raise ValueError(f"num_channels must be an even number >= 2, got {num_channels}")
    if order not in ("sin_cos", "cos_sin"):
        raise ValueError(f"order must be 'sin_cos' or 'cos_sin', got {order!r}")


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of one scalar per sample with geometrically spaced frequencies.

    Frequency i is ``max_positions ** (-i / n)`` for i = 0 .. N/2 - 1, where n = N/2 - 1 with ``endpoint``
    (the lowest frequency is exactly 1 / max_positions; EDM's DDPM++) and n = N/2 without it (transformer,
    ADM).

    Args:
        num_channels: output width N (even).
        max_positions: inverse of the lowest frequency.
        endpoint: make the lowest frequency exactly ``1 / max_positions``.
        order: ``"sin_cos"`` (SongUNet, after its swap) or ``"cos_sin"`` (ADM).
    """

    freqs: Tensor

    def __init__(
        self,
        num_channels: int,
        max_positions: float = 10_000.0,
        endpoint: bool = False,
        order: Order = "sin_cos",
    ) -> None:
        super().__init__()
        _check_embedding_args(num_channels, order)
        half = num_channels // 2
        if endpoint and half < 2:
            raise ValueError(f"endpoint=True needs num_channels >= 4, got {num_channels}")
        self.num_channels, self.max_positions, self.endpoint, self.order = (
            num_channels,
            max_positions,
            endpoint,
            order,
        )
        exponent = torch.arange(half, dtype=torch.float64, device="cpu") / (half - 1 if endpoint else half)
        freqs = (1.0 / max_positions) ** exponent
        self.register_buffer("freqs", freqs.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) float -> (B, num_channels)."""
        return _sinusoids(torch.outer(x, self.freqs.to(x.dtype)), self.order)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, max_positions={self.max_positions}, endpoint={self.endpoint}, order={self.order}"


class FourierEmbedding(nn.Module):
    """Random Fourier features ``sin/cos(2 pi f x)`` with ``f ~ N(0, scale^2)`` (NCSN++).

    ``freqs`` is drawn from ``torch.Generator().manual_seed(seed)``, never from the global RNG: two
    constructions with equal arguments give identical buffers, so DDP ranks agree even when buffers are not
    broadcast. The buffer is persistent (checkpoints carry it; EDM's state dicts load unchanged).

    Args:
        num_channels: output width N (even).
        scale: standard deviation of the frequencies (16 in NCSN++).
        seed: seed of the private generator.
        order: ``"sin_cos"`` (SongUNet, after its swap) or ``"cos_sin"``.
    """

    freqs: Tensor

    def __init__(
        self, num_channels: int, scale: float = 16.0, seed: int = FOURIER_SEED, order: Order = "sin_cos"
    ) -> None:
        super().__init__()
        _check_embedding_args(num_channels, order)
        self.num_channels, self.scale, self.seed, self.order = num_channels, scale, seed, order
        generator = torch.Generator(device="cpu").manual_seed(seed)
        freqs = torch.randn(num_channels // 2, generator=generator, device="cpu") * scale
        self.register_buffer("freqs", freqs)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) float -> (B, num_channels)."""
        return _sinusoids(torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype)), self.order)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, scale={self.scale}, seed={self.seed}, order={self.order}"


def noise_embedding(embedding_type: Literal["positional", "fourier"], num_channels: int) -> nn.Module:
    """SongUNet's noise embedding by name: positional (DDPM++, endpoint) or Fourier (NCSN++, scale 16)."""
    if embedding_type == "positional":
        return PositionalEmbedding(num_channels, endpoint=True)
    if embedding_type == "fourier":
        return FourierEmbedding(num_channels)
    raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")


def class_labels_of(cond: Mapping[str, Tensor] | None) -> Tensor | None:
    """The class labels (B,) of a condition mapping (its ``"label"`` entry), or None (= all null)."""
    if cond is None:
        return None
    if not isinstance(cond, Mapping):
        raise TypeError(f"cond must be a mapping such as {{'label': labels}}, got {type(cond).__name__}")
    return cond.get("label")


def check_class_labels(class_labels: Tensor, num_classes: int, batch_size: int) -> None:
    """Raise ValueError unless class_labels is a (batch_size,) integer tensor with values in [-1, K).

    The value range is checked only for CPU tensors outside ``torch.compile`` (reading values from an
    accelerator would force a device sync every step); elsewhere an out-of-range label matches no class.
    """
    if class_labels.shape != (batch_size,):
        raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(class_labels.shape)}")
    if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.dtype == torch.bool:
        raise ValueError(f"class_labels must be an integer tensor (int64), got dtype {class_labels.dtype}")
    if class_labels.device.type != "cpu" or torch.compiler.is_compiling() or class_labels.numel() == 0:
        return
    low, high = int(class_labels.min()), int(class_labels.max())
    if low < -1 or high >= num_classes:
        raise ValueError(
            f"class_labels must lie in [-1, {num_classes - 1}] (-1 = no class), got values in [{low}, {high}]"
        )


def class_one_hot(class_labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot labels scaled by sqrt(K), the input of EDM's label map.

    Args:
        class_labels: (B,) int64 in [-1, K); -1 (no class: the classifier-free-guidance null label) gives a
            row of zeros.
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


class ClassEmbedding(nn.Linear):
    """EDM's label map: ``Linear(one_hot(labels) * sqrt(K))`` with xavier-uniform weight and zero bias.

    A subclass of ``nn.Linear`` (parameters ``weight`` (out, K) and ``bias``), so EDM's ``map_label`` weights
    load unchanged. Labels -1 and ``None`` are the null class: an all-zero one-hot, so the output is the
    bias.

    Args:
        num_classes: K >= 1.
        out_features: embedding width.
    """

    def __init__(self, num_classes: int, out_features: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        super().__init__(num_classes, out_features)
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)
        self.num_classes = num_classes

    def forward(self, class_labels: Tensor | None, batch_size: int) -> Tensor:  # type: ignore[override]
        """class_labels: (B,) int64 in [-1, K) or None -> (B, out_features); None gives (1, out_features)."""
        if class_labels is None:
            return self.bias.unsqueeze(0)
        check_class_labels(class_labels, self.num_classes, batch_size)
        return super().forward(class_one_hot(class_labels, self.num_classes, self.weight.dtype))


def check_batch(x: Tensor, data_shape: tuple[int, ...]) -> int:
    """Return B for x of shape (B, *data_shape); raise ValueError otherwise."""
    if tuple(x.shape[1:]) != data_shape or x.ndim != len(data_shape) + 1:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, data_shape))}), got {tuple(x.shape)}")
    return x.shape[0]


def noise_vector(noise_labels: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """noise_labels (B,), (1,) or scalar (any real dtype) -> float32 (B,); a single value is broadcast."""
    noise_labels = torch.as_tensor(noise_labels, device=device)
    if noise_labels.numel() == 1 and noise_labels.ndim <= 1:
        noise_labels = noise_labels.reshape(1).expand(batch_size)
    if noise_labels.shape != (batch_size,):
        raise ValueError(
            f"noise_labels must have shape ({batch_size},) or hold a single value, got {tuple(noise_labels.shape)}"
        )
    return noise_labels.to(torch.float32)
