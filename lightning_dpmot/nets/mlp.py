"""Residual MLP denoiser for vector data (2-D toy distributions): F_theta(x; c_noise, class), x (B, D).

Layout (EDM's conventions carried over from the U-Net)::

    e   = embed(noise_labels) + label_map(one_hot * sqrt(K))      # (B, noise_channels)
    emb = silu(map_layer1(silu(map_layer0(e))))                    # (B, hidden)
    h   = input(x)                                                 # (B, hidden)
    h   = h + fc1(dropout(silu(fc0(norm(h)) + affine(emb))))      # num_layers residual blocks
    out = output(silu(norm(h)))                                    # (B, D)

Weights are xavier-uniform; the last layer of every residual branch and the output layer start at gain 1e-5,
so a fresh net outputs nearly zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpmot.nets.embeddings import (
    ClassEmbedding,
    check_batch,
    class_labels_of,
    noise_embedding,
    noise_vector,
)
from lightning_dpmot.nets.layers import GAIN_ZERO, linear


def _norm(width: int, layer_norm: bool) -> nn.Module:
    return nn.LayerNorm(width) if layer_norm else nn.Identity()


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block with additive conditioning.

    ``h + fc1(dropout(silu(fc0(norm(h)) + affine(emb))))``.

    Args:
        width: feature width.
        emb_channels: width of the conditioning vector.
        dropout: dropout probability before ``fc1``.
        layer_norm: use LayerNorm (else identity) before ``fc0``.
    """

    def __init__(self, width: int, emb_channels: int, dropout: float = 0.0, layer_norm: bool = True) -> None:
        super().__init__()
        self.dropout = dropout
        self.norm = _norm(width, layer_norm)
        self.fc0 = linear(width, width)
        self.affine = linear(emb_channels, width)
        self.fc1 = linear(width, width, gain=GAIN_ZERO)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: (B, width), emb: (B, emb_channels) -> (B, width)."""
        r = F.silu(self.fc0(self.norm(h)) + self.affine(emb))
        return h + self.fc1(F.dropout(r, p=self.dropout, training=self.training))


class MLPDenoiserNet(nn.Module):
    """Residual MLP denoiser for data of shape (D,), with noise-level and optional class conditioning.

    ``forward(x, noise_labels, cond)`` returns (B, D). An unconditional net (``num_classes == 0``)
    ignores ``class_labels``; with classes, label -1 or ``class_labels=None`` is the null class (all-zero
    one-hot).

    Args:
        data_shape: (D,) of one sample.
        num_classes: number of classes K; 0 = unconditional.
        hidden: width of the residual stream and of the conditioning vector.
        num_layers: number of residual blocks.
        noise_channels: width of the sinusoidal noise embedding.
        embedding_type: "positional" (sinusoids; suit c_noise = ln(sigma)/4 and timesteps 0..999) or
            "fourier".
        layer_norm: LayerNorm before each block and before the output layer.
        dropout: dropout probability inside the blocks.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        hidden: int = 256,
        num_layers: int = 4,
        noise_channels: int = 64,
        embedding_type: Literal["positional", "fourier"] = "positional",
        layer_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) if isinstance(s, Integral) else s for s in data_shape)
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError(f"MLPDenoiserNet needs a vector data_shape (D,) with D >= 1, got {shape}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if hidden < 1 or num_layers < 0:
            raise ValueError(f"hidden must be >= 1 and num_layers >= 0, got {hidden} and {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.data_shape = shape
        self.num_classes = num_classes
        dim = shape[0]

        self.map_noise = noise_embedding(embedding_type, noise_channels)
        self.map_label = ClassEmbedding(num_classes, noise_channels) if num_classes else None
        self.map_layer0 = linear(noise_channels, hidden)
        self.map_layer1 = linear(hidden, hidden)

        self.input = linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout, layer_norm) for _ in range(num_layers))
        self.out_norm = _norm(hidden, layer_norm)
        self.output = linear(hidden, dim, gain=GAIN_ZERO)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """noise_labels (B,) float, class_labels (B,) int64 | None -> emb (B, hidden)."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels, noise_labels.shape[0])
        emb = emb.to(self.map_layer0.weight.dtype)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, noise_labels: Tensor, cond: Mapping[str, Tensor] | None = None) -> Tensor:
        """x: (B, D); noise_labels: (B,) float (or one value for all); cond: ``{"label": (B,) int64 in [-1, K)}``
        or None -> (B, D)."""
        batch_size = check_batch(x, self.data_shape)
        emb = self.embed(noise_vector(noise_labels, batch_size, x.device), class_labels_of(cond))
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h)))
