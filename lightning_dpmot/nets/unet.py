"""DDPM++ / NCSN++ U-Net as used by EDM (Karras et al. 2022), ``SongUNet`` with the "standard" decoder.

Layout for ``channel_mult = [2, 2, 2]`` on 32x32 (EDM's CIFAR-10 DDPM++, 55.73 M parameters):

* mapping: noise embedding of ``noise_labels`` (positional, 128 ch, sin/cos order)
  [+ Linear(one-hot * sqrt(K)) for classes] [+ Linear(augment labels)] -> Linear -> SiLU -> Linear -> SiLU,
  width ``4 * model_channels``;
* encoder: 3x3 input conv to ``model_channels``; per level a down block (levels > 0) and ``num_blocks``
  residual blocks; every output is kept as a skip;
* decoder: at the lowest level two blocks ("in0" with self-attention, "in1"); per level an up block (levels
  < max) and ``num_blocks + 1`` blocks that each concatenate one skip; attention on the last block of a level
  in ``attn_resolutions`` (every encoder block at such a level has it too);
* output: GroupNorm -> SiLU -> 3x3 conv initialised with gain 1e-5, so a fresh net outputs nearly zero.

``encoder_type="residual"`` adds NCSN++'s progressive input: at each down-sampling the raw input path is
downsampled by a fused conv + FIR filter and averaged into the features (56.40 M with the NCSN++ settings
``embedding_type="fourier", channel_mult_noise=2, resample_filter=[1, 3, 3, 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpmot.nets.embeddings import check_class_labels, class_one_hot, noise_embedding
from lightning_dpmot.nets.layers import (
    GAIN_ZERO,
    Resample2d,
    UNetBlock,
    check_batch,
    conv2d,
    group_norm,
    linear,
    noise_vector,
)


def check_image_shape(data_shape: Sequence[int], num_levels: int) -> tuple[int, int]:
    """Validate a U-Net ``data_shape`` (C, H, W) and return (C, H).

    Raises:
        ValueError: not three positive ints, not square, or H not divisible by ``2 ** (num_levels - 1)``.
    """
    shape = tuple(data_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"the U-Net needs image data_shape (C, H, W) of positive ints, got {shape}")
    channels, height, width = shape
    if height != width:
        raise ValueError(f"the U-Net needs square images, got data_shape {shape}")
    factor = 2 ** (num_levels - 1)
    if height % factor:
        raise ValueError(
            f"resolution {height} of data_shape {shape} is not divisible by "
            f"2**(len(channel_mult)-1) = {factor}"
        )
    return channels, height


class DDPMppUNet(nn.Module):
    """EDM's DDPM++ U-Net (``SongUNet``), optionally with NCSN++'s Fourier embedding and residual encoder.

    ``forward(x, noise_labels, class_labels)`` returns F_theta(x; c_noise) with the shape of x. With
    ``num_classes == 0`` the net is unconditional and **ignores** ``class_labels`` (data loaders pass labels
    whether or not the model uses them). With classes, label -1 (or ``class_labels=None``) is the null class:
    an all-zero one-hot, so only the label map's bias enters, exactly as in EDM's label dropout.

    Args:
        data_shape: (C, H, W) of one sample; square, H divisible by 2**(len(channel_mult) - 1).
        num_classes: number of classes K; 0 = unconditional.
        model_channels: base width; the input conv outputs this many channels.
        channel_mult: width multiplier per resolution level (level i has resolution H / 2**i).
        num_blocks: residual blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions (in pixels) whose blocks get single-head self-attention.
        dropout: dropout probability inside the residual blocks.
        channel_mult_noise: noise-embedding width = model_channels * this (1 DDPM++, 2 NCSN++).
        channel_mult_emb: conditioning-vector width = model_channels * this.
        embedding_type: "positional" (DDPM++) or "fourier" (NCSN++, random frequencies, fixed seed).
        encoder_type: "standard" (DDPM++) or "residual" (NCSN++ progressive input).
        resample_filter: FIR taps for up/downsampling: [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
        augment_dim: width of EDM's augmentation labels (9 with its AugmentPipe); 0 = none.
    """

    def __init__(
        self,
        data_shape: Sequence[int],
        num_classes: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        channel_mult_noise: int = 1,
        channel_mult_emb: int = 4,
        embedding_type: Literal["positional", "fourier"] = "positional",
        encoder_type: Literal["standard", "residual"] = "standard",
        resample_filter: Sequence[int] = (1, 1),
        augment_dim: int = 0,
    ) -> None:
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
        in_channels, resolution = check_image_shape(data_shape, len(channel_mult))
        resolutions = [resolution >> level for level in range(len(channel_mult))]
        unknown = sorted(set(attn_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(
                f"attn_resolutions {unknown} are not among the U-Net's resolutions {resolutions}"
            )
        if num_classes < 0 or augment_dim < 0:
            raise ValueError(f"num_classes and augment_dim must be >= 0, got {num_classes} and {augment_dim}")
        if model_channels < 1 or num_blocks < 1:
            raise ValueError(
                f"model_channels and num_blocks must be >= 1, got {model_channels} and {num_blocks}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"encoder_type must be 'standard' or 'residual', got {encoder_type!r}")

        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes, self.augment_dim = num_classes, augment_dim
        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        block_kwargs = dict(
            emb_channels=emb_channels, dropout=dropout, resample_filter=tuple(resample_filter)
        )

        # Mapping network. SongUNet swaps EDM's cos/sin embedding to sin first.
        self.map_noise = noise_embedding(embedding_type, noise_channels, order="sin_cos")
        self.map_label = linear(num_classes, noise_channels) if num_classes else None
        self.map_augment = linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)

        # Encoder: names follow EDM ("32x32_block0", ...); enc_aux holds the residual-encoder input paths.
        self.enc = nn.ModuleDict()
        self.enc_aux = nn.ModuleDict()
        self.enc[f"{resolution}x{resolution}_conv"] = conv2d(in_channels, model_channels, kernel=3)
        skip_channels = [model_channels]
        cout, caux = model_channels, in_channels
        for level, (res, mult) in enumerate(zip(resolutions, channel_mult, strict=True)):
            if level > 0:
                name = f"{res}x{res}_down"
                self.enc[name] = UNetBlock(cout, cout, resample="down", **block_kwargs)
                skip_channels.append(cout)
                if encoder_type == "residual":
                    self.enc_aux[name] = _FusedDownConv(caux, cout, tuple(resample_filter))
                    caux = cout
            for idx in range(num_blocks):
                block = UNetBlock(
                    cout, model_channels * mult, attention=res in attn_resolutions, **block_kwargs
                )
                self.enc[f"{res}x{res}_block{idx}"] = block
                cout = block.out_channels
                skip_channels.append(cout)

        # Decoder: _dec_skip[i] says whether decoder block i concatenates the next skip.
        self.dec = nn.ModuleDict()
        dec_skip: list[bool] = []
        for level in reversed(range(len(channel_mult))):
            res, mult = resolutions[level], channel_mult[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
                dec_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, resample="up", **block_kwargs)
                dec_skip.append(False)
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                block = UNetBlock(
                    cout + skip_channels.pop(), model_channels * mult, attention=attn, **block_kwargs
                )
                self.dec[f"{res}x{res}_block{idx}"] = block
                cout = block.out_channels
                dec_skip.append(True)
        self._dec_skip = tuple(dec_skip)
        self.out_norm = group_norm(cout)
        self.out_conv = conv2d(cout, in_channels, kernel=3, gain=GAIN_ZERO)

    def embed(
        self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Tensor:
        """Conditioning vector from noise_labels (B,), class_labels (B,) | None, augment (B, A) | None.

        Returns:
            (B, model_channels * channel_mult_emb)
        """
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            if class_labels is None:
                one_hot = emb.new_zeros(emb.shape[0], self.num_classes)
            else:
                check_class_labels(class_labels, self.num_classes, emb.shape[0])
                one_hot = class_one_hot(class_labels, self.num_classes, emb.dtype)
            emb = emb + self.map_label(one_hot)
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels were given but the net was built with augment_dim=0")
            if augment_labels.shape != (emb.shape[0], self.augment_dim):
                raise ValueError(
                    f"augment_labels must have shape ({emb.shape[0]}, {self.augment_dim}), "
                    f"got {tuple(augment_labels.shape)}"
                )
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W); noise_labels: (B,) or scalar float; class_labels: (B,) int64 in [-1, K) or None;
        augment_labels: (B, augment_dim) or None -> (B, C, H, W)."""
        batch = check_batch(x, self.data_shape)
        emb = self.embed(noise_vector(noise_labels, batch, x.device), class_labels, augment_labels)

        skips = []
        aux = x
        for name, layer in self.enc.items():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            if name in self.enc_aux:
                x = aux = (x + self.enc_aux[name](aux)) * math.sqrt(0.5)
            skips.append(x)

        for takes_skip, block in zip(self._dec_skip, self.dec.values(), strict=True):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class _FusedDownConv(nn.Module):
    """NCSN++ residual-encoder path: 3x3 conv (padding 1 + filter padding), then FIR downsampling (no pad)."""

    def __init__(self, in_channels: int, out_channels: int, resample_filter: Sequence[int]) -> None:
        super().__init__()
        filter_pad = (len(resample_filter) - 1) // 2
        self.conv = conv2d(in_channels, out_channels, kernel=3, padding=1 + filter_pad)
        self.down = Resample2d("down", resample_filter, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H/2, W/2)."""
        return self.down(self.conv(x))
