"""Residual MLP denoiser for low-dimensional toy data (2-D mixtures, rings, moons).

Same conditioning scheme as the DDPM++ U-Net, on vectors instead of feature maps: the noise label is embedded
(sinusoids), the optional class adds ``Linear(one-hot * sqrt(K))``, a two-layer MLP maps this to a
conditioning vector ``emb``, and every residual block adds ``affine(emb)`` to its hidden activation. The
last layer of each residual branch and the output layer start near zero (gain 1e-5), so a fresh net is close
to the identity on its hidden state and outputs nearly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpmot.nets.embeddings import check_class_labels, class_one_hot, noise_embedding
from lightning_dpmot.nets.layers import GAIN_ZERO, check_batch, linear, noise_vector


class ResidualMLPBlock(nn.Module):
    """``h + fc2(dropout(silu(fc1(silu(norm(h))) + affine(emb)))))`` with ``fc2`` initialised near zero.

    Args:
        hidden: width H of h.
        emb_channels: width E of the conditioning vector.
        dropout: dropout probability before ``fc2``.
        layer_norm: use LayerNorm (otherwise the identity) before the first activation.
    """

    def __init__(self, hidden: int, emb_channels: int, dropout: float = 0.0, layer_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.fc1 = linear(hidden, hidden)
        self.affine = linear(emb_channels, hidden)
        self.fc2 = linear(hidden, hidden, gain=GAIN_ZERO)
        self.dropout = dropout

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        """h: (B, H), emb: (B, E) -> (B, H)."""
        r = F.silu(self.fc1(F.silu(self.norm(h))) + self.affine(emb))
        return h + self.fc2(F.dropout(r, p=self.dropout, training=self.training))


class MLPDenoiserNet(nn.Module):
    """Residual MLP F(x; noise_label, class) for vector data, output shaped like x.

    With ``num_classes == 0`` the net is unconditional and ignores ``class_labels``; with classes, label -1 or
    ``class_labels=None`` is the null class (all-zero one-hot).

    Args:
        data_shape: (D,) of one sample.
        num_classes: number of classes K; 0 = unconditional.
        hidden: width of the hidden layers and of the conditioning vector.
        num_layers: number of residual blocks.
        noise_channels: width of the sinusoidal noise embedding (even).
        embedding_type: "positional" (sinusoids with geometric frequencies) or "fourier" (random, scale 16).
        layer_norm: LayerNorm at the start of each residual branch and before the output layer.
        dropout: dropout probability inside the residual blocks.
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
        shape = tuple(data_shape)
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError(f"MLPDenoiserNet needs vector data_shape (D,), got {shape}")
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
        self.map_label = linear(num_classes, noise_channels) if num_classes else None
        self.map_layer0 = linear(noise_channels, hidden)
        self.map_layer1 = linear(hidden, hidden)

        self.input = linear(dim, hidden)
        self.blocks = nn.ModuleList(
            ResidualMLPBlock(hidden, hidden, dropout, layer_norm) for _ in range(num_layers)
        )
        self.out_norm = nn.LayerNorm(hidden) if layer_norm else nn.Identity()
        self.output = linear(hidden, dim, gain=GAIN_ZERO)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        """Conditioning vector: noise_labels (B,), class_labels (B,) or None -> (B, hidden)."""
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                one_hot = emb.new_zeros(emb.shape[0], self.num_classes)
            else:
                check_class_labels(class_labels, self.num_classes, emb.shape[0])
                one_hot = class_one_hot(class_labels, self.num_classes, emb.dtype)
            emb = emb + self.map_label(one_hot)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (B, D); noise_labels: (B,) or scalar; class_labels: (B,) int64 in [-1, K) or None -> (B, D)."""
        batch = check_batch(x, self.data_shape)
        emb = self.embed(noise_vector(noise_labels, batch, x.device), class_labels)
        h = self.input(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.out_norm(h)))
