"""EDM's DDPM++ U-Net (``SongUNet`` with the "standard" decoder), optionally with NCSN++'s input path.

Layout (``channel_mult = [2, 2, 2]`` on 32x32 is EDM's CIFAR-10 DDPM++: 55.73 M parameters unconditional):

* mapping: noise embedding of ``noise_labels`` (positional, ``model_channels`` wide, sin before cos)
  [+ Linear(one-hot * sqrt(K))] [+ Linear(augment labels)] -> Linear, SiLU -> Linear, SiLU, 4x wider;
* encoder: 3x3 conv to ``model_channels``; per level a down block (levels > 0) then ``num_blocks`` blocks;
  every output is kept as a skip. Blocks at resolutions in ``attn_resolutions`` have self-attention;
* decoder: at the coarsest level two blocks, "in0" (with self-attention) and "in1"; elsewhere an up block;
  then ``num_blocks + 1`` blocks per level, each concatenating one skip; only the last of them has attention;
* output: GroupNorm, SiLU, 3x3 conv with gain 1e-5 (a fresh net outputs nearly zero).

``encoder_type="residual"`` is NCSN++'s progressive input (an extra conv + FIR downsampling of the input path
at each level, averaged into the features); with ``embedding_type="fourier"``, ``channel_mult_noise=2`` and
``resample_filter=[1, 3, 3, 1]`` this is EDM's NCSN++ (56.40 M). Module names equal EDM's, so ``SongUNet``
state dicts load unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Integral
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpmot.nets.embeddings import (
    ClassEmbedding,
    check_batch,
    class_labels_of,
    noise_embedding,
    noise_vector,
)
from lightning_dpmot.nets.layers import GAIN_ZERO, Conv2d, UNetBlock, group_norm, linear


def check_image_shape(data_shape: Sequence[int], num_levels: int) -> tuple[int, int]:
    """Validate an image ``data_shape`` (C, H, W) for a U-Net with ``num_levels`` resolutions; return (C, H).

    Raises:
        ValueError: not three positive ints, not square, or H not divisible by ``2 ** (num_levels - 1)``.
    """
    shape = tuple(int(s) if isinstance(s, Integral) else s for s in data_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"DDPMppUNet needs an image data_shape (C, H, W) of positive ints, got {shape}")
    channels, height, width = shape
    if height != width:
        raise ValueError(f"DDPMppUNet needs square images (H == W), got data_shape {shape}")
    factor = 2 ** (num_levels - 1)
    if height % factor:
        raise ValueError(
            f"resolution {height} of data_shape {shape} is not divisible by 2**(len(channel_mult) - 1) = {factor}"
        )
    return channels, height


class DDPMppUNet(nn.Module):
    """EDM's DDPM++ U-Net F_theta(x; c_noise, class), optionally NCSN++ (Fourier embedding, residual encoder).

    ``forward(x, noise_labels, cond)`` returns a tensor shaped like x. An unconditional net
    (``num_classes == 0``) ignores ``class_labels`` (data modules pass labels whether or not the model uses
    them).
    With classes, label -1 or ``class_labels=None`` is the null class: an all-zero one-hot, so only the label
    map's bias enters (EDM's label dropout gives the same input).

    Args:
        data_shape: (C, H, W) of one sample; square, H divisible by 2**(len(channel_mult) - 1).
        num_classes: number of classes K; 0 = unconditional.
        model_channels: base width; the input conv outputs this many channels.
        channel_mult: width multiplier per resolution level; level i has resolution H / 2**i.
        num_blocks: residual blocks per level in the encoder (the decoder has one more per level).
        attn_resolutions: resolutions (pixels) whose blocks get self-attention; each must be a level's.
        dropout: dropout probability inside the residual blocks (EDM CIFAR-10: 0.13).
        channel_mult_noise: noise-embedding width = model_channels * this (1 DDPM++, 2 NCSN++).
        channel_mult_emb: conditioning-vector width = model_channels * this.
        embedding_type: "positional" (DDPM++) or "fourier" (NCSN++; random frequencies from a fixed seed).
        encoder_type: "standard" (DDPM++) or "residual" (NCSN++ progressive input).
        resample_filter: FIR taps for up/downsampling: [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
        augment_dim: width of EDM's augmentation labels (9 for its AugmentPipe); 0 = none.
        num_heads: attention heads (EDM's DDPM++: 1).
        context_dim: width C of text token states (``cond["tokens"]`` (B, L, C), ``cond["mask"]`` (B, L),
            ``cond["pooled"]`` (B, C)); 0 = no text conditioning. With text, blocks at ``cross_attn_resolutions``
            and the two middle blocks cross-attend to the tokens, the pooled vector is added to the noise
            embedding, and a learned null token (always attended) and learned null pooled vector (for samples whose
            mask is empty: the CFG null condition) make the null condition a learned one.
        cross_attn_resolutions: resolutions (pixels) whose blocks cross-attend (UPainting/Imagen: 16 and 8).
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
        num_heads: int = 1,
        context_dim: int = 0,
        cross_attn_resolutions: Sequence[int] = (),
    ) -> None:
        super().__init__()
        channel_mult = [int(m) for m in channel_mult]
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
        in_channels, resolution = check_image_shape(data_shape, len(channel_mult))
        resolutions = [resolution >> level for level in range(len(channel_mult))]
        chosen_levels = {"attn_resolutions": attn_resolutions, "cross_attn_resolutions": cross_attn_resolutions}
        for name, chosen in chosen_levels.items():
            unknown = sorted(set(chosen) - set(resolutions))
            if unknown:
                raise ValueError(f"{name} {unknown} are not among the U-Net's resolutions {resolutions}")
        if context_dim < 0 or (cross_attn_resolutions and not context_dim):
            raise ValueError(f"cross_attn_resolutions need context_dim >= 1, got context_dim={context_dim}")
        if num_classes < 0 or augment_dim < 0:
            raise ValueError(f"num_classes and augment_dim must be >= 0, got {num_classes} and {augment_dim}")
        if min(model_channels, num_blocks, channel_mult_noise, channel_mult_emb) < 1:
            raise ValueError("model_channels, num_blocks, channel_mult_noise and channel_mult_emb must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        if encoder_type not in ("standard", "residual"):
            raise ValueError(f"encoder_type must be 'standard' or 'residual', got {encoder_type!r}")

        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes, self.augment_dim, self.context_dim = num_classes, augment_dim, context_dim
        noise_channels = model_channels * channel_mult_noise
        emb_channels = model_channels * channel_mult_emb
        filt = tuple(resample_filter)
        block_kwargs = dict(emb_channels=emb_channels, num_heads=num_heads, dropout=dropout, resample_filter=filt)

        # Mapping network.
        self.map_noise = noise_embedding(embedding_type, noise_channels)
        self.map_label = ClassEmbedding(num_classes, noise_channels) if num_classes else None
        self.map_augment = linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)
        if context_dim:  # text: pooled vector into the embedding, learned null token / pooled vector
            self.map_text = linear(context_dim, noise_channels)
            self.null_token = nn.Parameter(torch.zeros(1, context_dim))
            self.null_pooled = nn.Parameter(torch.zeros(context_dim))
        cross = dict(block_kwargs, context_dim=context_dim)

        # Encoder. Entries named "*_aux_residual" transform the input path and replace the last skip.
        self.enc = nn.ModuleDict()
        cout, caux = model_channels, in_channels
        self.enc[f"{resolution}x{resolution}_conv"] = Conv2d(in_channels, cout, kernel=3)
        for level, (res, mult) in enumerate(zip(resolutions, channel_mult, strict=True)):
            if level > 0:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=filt, fused_resample=True
                    )
                    caux = cout
            for idx in range(num_blocks):
                attn = res in attn_resolutions
                kwargs = cross if res in cross_attn_resolutions else block_kwargs
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cout, model_channels * mult, attention=attn, **kwargs)
                cout = model_channels * mult
        skips = [m.out_channels for name, m in self.enc.items() if not name.endswith("aux_residual")]

        # Decoder; the output layers keep EDM's names "<res>x<res>_aux_norm" / "_aux_conv".
        self.dec = nn.ModuleDict()
        takes_skip: list[bool] = []
        for level in reversed(range(len(channel_mult))):
            res, mult = resolutions[level], channel_mult[level]
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **cross)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **cross)
                takes_skip += [False, False]
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
                takes_skip.append(False)
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                kwargs = cross if res in cross_attn_resolutions else block_kwargs
                block = UNetBlock(cout + skips.pop(), model_channels * mult, attention=attn, **kwargs)
                self.dec[f"{res}x{res}_block{idx}"] = block
                cout = model_channels * mult
                takes_skip.append(True)
        self.dec[f"{resolution}x{resolution}_aux_norm"] = group_norm(cout)
        self.dec[f"{resolution}x{resolution}_aux_conv"] = Conv2d(cout, in_channels, kernel=3, gain=GAIN_ZERO)
        self._takes_skip = tuple(takes_skip)
        self._enc_residual = tuple(name.endswith("aux_residual") for name in self.enc)

    def text_context(
        self, cond: Mapping[str, Tensor] | None, batch_size: int, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Text tokens with the learned null token prepended, their key mask and the pooled vector.

        Returns context (B, 1 + L, C), mask (B, 1 + L) bool and pooled (B, C); samples without text (no ``cond``,
        or an empty mask: the CFG null condition) get the learned null pooled vector.
        """
        c = self.context_dim
        if cond is None or not isinstance(cond, Mapping) or "tokens" not in cond:
            tokens = torch.zeros(batch_size, 0, c, device=device)
            mask = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
            pooled = torch.zeros(batch_size, c, device=device)
        else:
            tokens, mask, pooled = cond["tokens"], cond["mask"].bool(), cond["pooled"]
            if tokens.ndim != 3 or tokens.shape[0] != batch_size or tokens.shape[2] != c:
                raise ValueError(f"cond['tokens'] must have shape ({batch_size}, L, {c}), got {tuple(tokens.shape)}")
            if mask.shape != tokens.shape[:2] or pooled.shape != (batch_size, c):
                raise ValueError(
                    f"cond['mask'] must have shape {tuple(tokens.shape[:2])} and cond['pooled'] ({batch_size}, {c}), "
                    f"got {tuple(mask.shape)} and {tuple(pooled.shape)}"
                )
        null = self.null_token.to(tokens.dtype).expand(batch_size, 1, c)
        context = torch.cat([null, tokens], dim=1)
        mask = torch.cat([torch.ones(batch_size, 1, dtype=torch.bool, device=mask.device), mask], dim=1)
        has_text = mask[:, 1:].any(dim=1, keepdim=True)
        pooled = torch.where(has_text, pooled.to(self.null_pooled.dtype), self.null_pooled.expand(batch_size, c))
        return context, mask, pooled

    def embed(
        self,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """Conditioning vector: noise_labels (B,) float, class_labels (B,) int64 | None, augment_labels
        (B, augment_dim) | None, pooled text (B, context_dim) | None -> emb (B, model_channels * channel_mult_emb)."""
        batch_size = noise_labels.shape[0]
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels, batch_size)
        if pooled is not None:
            emb = emb + self.map_text(pooled.to(emb.dtype))
        if augment_labels is not None:
            if self.map_augment is None:
                raise ValueError("augment_labels were given but the net was built with augment_dim=0")
            if augment_labels.shape != (batch_size, self.augment_dim):
                raise ValueError(
                    f"augment_labels must have shape ({batch_size}, {self.augment_dim}), "
                    f"got {tuple(augment_labels.shape)}"
                )
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = emb.to(self.map_layer0.weight.dtype)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        cond: Mapping[str, Tensor] | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C, H, W); noise_labels: (B,) float (or one value for all); cond: ``{"label": (B,) int64 in
        [-1, K)}`` or None (other keys are not read); augment_labels: (B, augment_dim) or None -> F_theta:
        (B, C, H, W)."""
        batch_size = check_batch(x, self.data_shape)
        noise_labels = noise_vector(noise_labels, batch_size, x.device)
        context = mask = pooled = None
        if self.context_dim:
            context, mask, pooled = self.text_context(cond, batch_size, x.device)
        emb = self.embed(noise_labels, class_labels_of(cond), augment_labels, pooled)

        skips: list[Tensor] = []
        aux = x
        for is_residual, layer in zip(self._enc_residual, self.enc.values(), strict=True):
            if is_residual:  # NCSN++ input path, averaged into the features of the down block
                x = skips[-1] = aux = (x + layer(aux)) * math.sqrt(0.5)
            elif isinstance(layer, UNetBlock):
                x = layer(x, emb, context, mask)
                skips.append(x)
            else:
                x = layer(x)
                skips.append(x)

        blocks = list(self.dec.values())
        for takes_skip, block in zip(self._takes_skip, blocks[:-2], strict=True):
            if takes_skip:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, context, mask)
        out_norm, out_conv = blocks[-2:]
        return out_conv(F.silu(out_norm(x)))
