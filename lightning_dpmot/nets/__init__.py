"""Denoiser networks F_theta (pure ``nn.Module``, no Lightning).

Every net follows one interface, relied on by the LightningModules and LightningCLI::

    net = Net(data_shape, **conditioner.net_kwargs(), **architecture_kwargs)   # e.g. num_classes=10
    out = net(x, noise_labels, cond=None)                  # x: (B, *data_shape) -> (B, *data_shape)

``noise_labels``: (B,) float (EDM's c_noise = ln(sigma) / 4, or a DDPM timestep). ``cond``: the condition mapping
(:mod:`lightning_dpmot.diffusion.conditioning`); these nets read its ``"label"`` entry, (B,) int64 with -1 = no
class (classifier-free-guidance null label); ``None`` equals all -1. Unconditional nets ignore it.
"""

from lightning_dpmot.nets.embeddings import (
    ClassEmbedding,
    FourierEmbedding,
    PositionalEmbedding,
    class_one_hot,
    noise_embedding,
)
from lightning_dpmot.nets.layers import Conv2d, UNetBlock
from lightning_dpmot.nets.matching import MatchingModel, load_matching_model
from lightning_dpmot.nets.mlp import MLPDenoiserNet
from lightning_dpmot.nets.text_encoder import TextEncoder
from lightning_dpmot.nets.unet import DDPMppUNet

__all__ = [
    "ClassEmbedding",
    "Conv2d",
    "DDPMppUNet",
    "FourierEmbedding",
    "MLPDenoiserNet",
    "MatchingModel",
    "PositionalEmbedding",
    "TextEncoder",
    "UNetBlock",
    "class_one_hot",
    "load_matching_model",
    "noise_embedding",
]
