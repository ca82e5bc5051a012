"""Building blocks of the DDPM++ / NCSN++ U-Net (EDM's ``SongUNet``): init, FIR resampling, attention, block.

Conventions follow EDM (Karras et al. 2022, ``training/networks.py``):

* weights are xavier-uniform with a gain (1 for the trunk, sqrt(0.2) for the attention qkv, 1e-5 for the last
  conv of each residual branch, the attention output projection and the network's output conv), biases zero;
* GroupNorm with ``min(32, C // 4)`` groups and eps 1e-6;
* resampling with a separable FIR filter: ``[1, 1]`` is a 2x2 box (average pooling down, nearest-neighbour
  up), ``[1, 3, 3, 1]`` the NCSN++ filter;
* residual branches and attention are summed with the identity and scaled by ``skip_scale`` (1/sqrt(2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Resampling = Literal["none", "up", "down"]

GAIN_ATTN_QKV = math.sqrt(0.2)
GAIN_ZERO = 1e-5


def xavier_init_(module: nn.Linear | nn.Conv2d, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times gain (fan = channels x kernel area), zero bias; returns the module."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


def linear(in_features: int, out_features: int, bias: bool = True, gain: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with EDM's xavier-uniform init."""
    return xavier_init_(nn.Linear(in_features, out_features, bias=bias), gain)  # type: ignore[return-value]


def conv2d(
    in_channels: int, out_channels: int, kernel: int, gain: float = 1.0, padding: int | None = None
) -> nn.Conv2d:
    """Stride-1 ``nn.Conv2d`` with EDM's xavier-uniform init; "same" padding unless given."""
    padding = kernel // 2 if padding is None else padding
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding)
    return xavier_init_(conv, gain)  # type: ignore[return-value]


def check_batch(x: Tensor, data_shape: tuple[int, ...]) -> int:
    """Return the batch size B of x, raising ValueError unless x has shape (B, *data_shape)."""
    if x.ndim != len(data_shape) + 1 or tuple(x.shape[1:]) != data_shape:
        raise ValueError(f"x must have shape (B, {', '.join(map(str, data_shape))}), got {tuple(x.shape)}")
    return x.shape[0]


def noise_vector(noise_labels: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """noise_labels as a float32 (B,) vector on device; a scalar is broadcast to the batch."""
    noise_labels = torch.as_tensor(noise_labels, device=device)
    if noise_labels.ndim == 0:
        noise_labels = noise_labels.expand(batch)
    if noise_labels.shape != (batch,):
        raise ValueError(
            f"noise_labels must have shape ({batch},) or be a scalar, got {tuple(noise_labels.shape)}"
        )
    return noise_labels.to(torch.float32)


def num_groups(num_channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's group count ``min(32, C // 4)``, lowered to the nearest divisor of C (and at least 1).

    For the usual widths (multiples of 32 or 128) this is exactly EDM's count; the divisor rule only keeps
    unusual widths (e.g. 200) valid.
    """
    groups = max(1, min(max_groups, num_channels // min_channels_per_group))
    while num_channels % groups:
        groups -= 1
    return groups


def group_norm(num_channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with :func:`num_groups` groups and EDM's eps."""
    return nn.GroupNorm(num_groups(num_channels), num_channels, eps=eps)


class Resample2d(nn.Module):
    """Depthwise FIR up/downsampling by a factor 2 with a separable filter ``f f^T / (sum f)^2``.

    ``down``: ``conv2d(x, filter, stride=2, padding=padding)`` per channel. ``up``: the transposed conv with
    ``4 * filter`` (so a constant image stays constant). The default padding ``(len(f) - 1) // 2`` maps H to
    exactly 2H / H/2. For the box filter ``[1, 1]`` (padding 0) the same operators run as
    ``avg_pool2d`` / nearest-neighbour interpolation, which give identical results and are much faster.

    Args:
        mode: ``"up"`` or ``"down"``.
        resample_filter: 1-D FIR taps, e.g. ``[1, 1]`` (DDPM++) or ``[1, 3, 3, 1]`` (NCSN++).
        padding: spatial padding of the filter; default ``(len(resample_filter) - 1) // 2``.
    """

    filter: Tensor

    def __init__(
        self, mode: Literal["up", "down"], resample_filter: Sequence[int] = (1, 1), padding: int | None = None
    ) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        taps = [float(t) for t in resample_filter]
        if not taps or sum(taps) == 0:
            raise ValueError(
                f"resample_filter must be a non-empty list with a non-zero sum, got {resample_filter}"
            )
        self.mode = mode
        self.taps = tuple(taps)
        self.padding = (len(taps) - 1) // 2 if padding is None else padding
        kernel = torch.tensor([[a * b / sum(taps) ** 2 for b in taps] for a in taps], dtype=torch.float32)
        self.register_buffer("filter", rearrange(kernel, "h w -> 1 1 h w"), persistent=False)
        self.is_box = len(taps) == 2 and taps[0] == taps[1] and self.padding == 0

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W) (up) or (B, C, H/2, W/2) (down)."""
        if self.is_box:
            if self.mode == "down":
                return F.avg_pool2d(x, 2)
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        channels = x.shape[1]
        weight = self.filter.to(x.dtype).expand(channels, 1, -1, -1)
        if self.mode == "down":
            return F.conv2d(x, weight, stride=2, padding=self.padding, groups=channels)
        return F.conv_transpose2d(x, weight * 4, stride=2, padding=self.padding, groups=channels)

    def extra_repr(self) -> str:
        return f"{self.mode}, resample_filter={list(self.taps)}, padding={self.padding}"


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (the attention of EDM's UNetBlock).

    ``proj(attention(qkv(norm(x))))`` with softmax(q k^T / sqrt(C)) v, computed by
    ``scaled_dot_product_attention``. Returns only the update; the caller adds the identity.

    Args:
        channels: C.
        eps: GroupNorm eps.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps)
        self.qkv = conv2d(channels, 3 * channels, kernel=1, gain=GAIN_ATTN_QKV)
        self.proj = conv2d(channels, channels, kernel=1, gain=GAIN_ZERO)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> update (B, C, H, W)."""
        height = x.shape[-2]
        qkv = self.qkv(self.norm(x))
        # channel layout (c, three) as in EDM, so its qkv weights map over without permutation
        q, k, v = rearrange(qkv, "b (c three) h w -> three b 1 (h w) c", three=3).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return self.proj(rearrange(a, "b 1 (h w) c -> b c h w", h=height))


class UNetBlock(nn.Module):
    """DDPM++ residual block with additive noise conditioning, optional resampling and self-attention.

    ``x' = skip_scale * (skip(x) + conv1(dropout(silu(norm1(conv0(silu(norm0(x))) + affine(emb))))))``,
    followed (if ``attention``) by ``x'' = skip_scale * (x' + attn(x'))``. With ``resample`` the block changes
    the resolution: the residual branch resamples before ``conv0``, the skip path resamples before a 1x1 conv.
    The skip path is the identity when neither the resolution nor the width changes.

    The forward takes ``emb`` explicitly so that further per-block inputs (e.g. a text ``context`` for
    cross-attention) can be added as extra optional arguments and extra attention layers after ``attn``.

    Args:
        in_channels: input width.
        out_channels: output width.
        emb_channels: width of the conditioning vector ``emb``.
        resample: ``"none"``, ``"up"`` or ``"down"``.
        attention: append single-head self-attention.
        dropout: dropout probability before ``conv1``.
        skip_scale: factor applied after each residual sum (EDM: 1/sqrt(2)).
        eps: GroupNorm eps.
        resample_filter: FIR taps for the resampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        resample: Resampling = "none",
        attention: bool = False,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[int] = (1, 1),
    ) -> None:
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"resample must be 'none', 'up' or 'down', got {resample!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dropout, self.skip_scale = dropout, skip_scale
        self.resample = Resample2d(resample, resample_filter) if resample != "none" else None
        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = conv2d(in_channels, out_channels, kernel=3)
        self.affine = linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = conv2d(out_channels, out_channels, kernel=3, gain=GAIN_ZERO)
        needs_skip = in_channels != out_channels or self.resample is not None
        self.skip = conv2d(in_channels, out_channels, kernel=1) if needs_skip else None
        self.attn = SelfAttention2d(out_channels, eps) if attention else None

    def _resample(self, x: Tensor) -> Tensor:
        return self.resample(x) if self.resample is not None else x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, in_channels, H, W), emb: (B, emb_channels) -> (B, out_channels, H', W')."""
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        h = h + rearrange(self.affine(emb), "b c -> b c 1 1")
        h = F.silu(self.norm1(h))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = self._resample(x)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * self.skip_scale
        if self.attn is not None:
            x = (x + self.attn(x)) * self.skip_scale
        return x
