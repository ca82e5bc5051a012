"""Denoiser networks: pure ``nn.Module`` classes, no Lightning imports.

Every net follows one interface (the LightningModules rely on it)::

    net = SomeNet(data_shape, num_classes, **architecture_kwargs)
    out = net(x, noise_labels, class_labels)
    # x: (B, *data_shape); noise_labels: (B,) float; class_labels: (B,) int64 or None; out: like x

``class_labels == -1`` (or ``None``) is the "no class" label of classifier-free guidance; unconditional nets
(``num_classes == 0``) ignore ``class_labels``.
"""

from lightning_dpmot.nets.embeddings import FourierEmbedding, PositionalEmbedding, class_one_hot
from lightning_dpmot.nets.layers import Resample2d, SelfAttention2d, UNetBlock
from lightning_dpmot.nets.mlp import MLPDenoiserNet, ResidualMLPBlock
from lightning_dpmot.nets.unet import DDPMppUNet

__all__ = [
    "DDPMppUNet",
    "FourierEmbedding",
    "MLPDenoiserNet",
    "PositionalEmbedding",
    "Resample2d",
    "ResidualMLPBlock",
    "SelfAttention2d",
    "UNetBlock",
    "class_one_hot",
]
