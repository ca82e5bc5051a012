"""Building blocks of the DDPM++ / NCSN++ U-Net (EDM's ``SongUNet``): init, FIR resampling, conv, U-Net block.

Conventions follow EDM (Karras et al. 2022, ``training/networks.py``):

* weights xavier-uniform times a gain (1 for the trunk, sqrt(0.2) for the attention qkv, 1e-5 for the last
  conv of each residual branch, the attention output projection and the network's output conv), biases zero;
* GroupNorm with ``min(32, C // 4)`` groups and eps 1e-6;
* resampling by 2 with a separable FIR filter ``f f^T / (sum f)^2``: ``[1, 1]`` is the 2x2 box (average
  pooling down, nearest-neighbour up), ``[1, 3, 3, 1]`` the NCSN++ filter;
* residual sums and attention outputs are scaled by ``skip_scale`` = 1/sqrt(2).

Parameter and buffer names match EDM's modules (``conv0``, ``affine``, ``qkv``, ``resample_filter``, ...), so
a ``SongUNet`` state dict loads into :class:`~lightning_dpmot.nets.unet.DDPMppUNet` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

#: Gain of the attention qkv projection (EDM's ``init_attn``).
GAIN_QKV = math.sqrt(0.2)
#: Gain of the layers that close a residual branch (EDM's ``init_zero``): a fresh branch outputs ~0.
GAIN_ZERO = 1e-5


def xavier_init_(module: nn.Linear | nn.Conv2d | Conv2d, gain: float = 1.0) -> None:
    """Xavier-uniform weight (fans = channels x kernel area) times gain, zero bias, in place."""
    nn.init.xavier_uniform_(module.weight, gain=gain)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def linear(in_features: int, out_features: int, bias: bool = True, gain: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with EDM's xavier-uniform init."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    xavier_init_(layer, gain)
    return layer


def num_groups(num_channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """EDM's GroupNorm group count ``min(32, C // 4)``, lowered to the nearest divisor of C (at least 1).

    For EDM's widths (multiples of 32, or of 4 below 128) this is exactly EDM's count; the divisor rule keeps
    other widths (e.g. 144 = 48 + 96 in a decoder) valid instead of failing.
    """
    groups = max(1, min(max_groups, num_channels // min_channels_per_group))
    while num_channels % groups:
        groups -= 1
    return groups


def group_norm(num_channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """``nn.GroupNorm`` with :func:`num_groups` groups and EDM's eps."""
    return nn.GroupNorm(num_groups(num_channels), num_channels, eps=eps)


def fir_filter(resample_filter: Sequence[int]) -> Tensor:
    """Separable FIR kernel ``f f^T / (sum f)^2``: (len f,) -> (1, 1, len f, len f) float32.

    Raises:
        ValueError: not an even number of taps (odd filters cannot upsample by exactly 2) or a zero sum.
    """
    taps = torch.as_tensor([float(t) for t in resample_filter], dtype=torch.float32, device="cpu")
    if taps.ndim != 1 or len(taps) == 0 or len(taps) % 2 or float(taps.sum()) == 0.0:
        raise ValueError(
            "resample_filter must be a 1-D list of an even number of taps with a non-zero sum, "
            f"e.g. [1, 1] or [1, 3, 3, 1]; got {list(resample_filter)}"
        )
    return rearrange(torch.outer(taps, taps) / taps.sum().square(), "h w -> 1 1 h w")


def _is_box(resample_filter: Sequence[int]) -> bool:
    return len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]


def fir_downsample(x: Tensor, kernel: Tensor, padding: int, box: bool = False) -> Tensor:
    """Depthwise FIR filter with stride 2: x (B, C, H, W) -> (B, C, (H + 2p - k) / 2 + 1, ...).

    ``box`` (kernel = 2x2 box, padding 0) runs the identical operation as ``avg_pool2d``, which is faster.
    """
    if box and padding == 0:
        return F.avg_pool2d(x, 2)
    channels = x.shape[1]
    weight = kernel.to(x.dtype).expand(channels, 1, -1, -1)
    return F.conv2d(x, weight, stride=2, padding=padding, groups=channels)


def fir_upsample(x: Tensor, kernel: Tensor, padding: int, box: bool = False) -> Tensor:
    """Depthwise transposed FIR filter (4 * kernel) with stride 2: x (B, C, H, W) -> (B, C, 2H, 2W) for
    ``padding = (k - 1) // 2``. ``box`` (2x2 box, padding 0) runs the same as nearest-neighbour upsampling."""
    if box and padding == 0:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    channels = x.shape[1]
    weight = (kernel.to(x.dtype) * 4).expand(channels, 1, -1, -1)
    return F.conv_transpose2d(x, weight, stride=2, padding=padding, groups=channels)


def heads_to_image(a: Tensor, height: int) -> Tensor:
    """Attention output (B, n, H*W, c) -> contiguous (B, n*c, H, W) feature map.

    With one head the rearrange alone is a permuted view with channels-last strides; convolutions keep that layout,
    so every later activation would be channels-last and the 1x1 convs' weight gradients (O, I, 1, 1) would come
    out with channels-last strides (oneDNN), which DDP reports as "Grad strides do not match bucket view strides".
    The copy restores EDM's NCHW layout (EDM's einsum output is contiguous too).
    """
    return rearrange(a, "b n (h w) c -> b (n c) h w", h=height).contiguous()


class Conv2d(nn.Module):
    """Convolution with optional FIR up/downsampling by 2 (EDM's ``Conv2d``; same parameters and buffer).

    * plain: ``conv(x)`` with "same" padding;
    * ``down``: ``conv(fir_down(x))``; ``up``: ``conv(fir_up(x))``. A 1x1 conv commutes with the depthwise
      filter, so ``up`` with ``kernel == 1`` runs as ``fir_up(conv(x))`` (4x fewer FLOPs, same result);
    * ``fused_resample`` (``down`` only; NCSN++'s residual encoder): ``fir_down(conv(x))`` with the conv
      padded by the kernel's and the filter's half-widths and the filter unpadded.
    The bias is added last in every case.

    Args:
        in_channels: input width.
        out_channels: output width.
        kernel: square kernel size (odd, >= 1).
        bias: learn a bias.
        up: upsample by 2.
        down: downsample by 2.
        resample_filter: FIR taps (even count), e.g. [1, 1] or [1, 3, 3, 1].
        fused_resample: convolve before downsampling (see above).
        gain: xavier-uniform gain of the weight.
    """

    resample_filter: Tensor | None

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[int] = (1, 1),
        fused_resample: bool = False,
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        if fused_resample and not down:
            raise ValueError("fused_resample is only defined for down=True")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd size >= 1, got {kernel}")
        self.in_channels, self.out_channels, self.kernel = in_channels, out_channels, kernel
        self.up, self.down, self.fused_resample = up, down, fused_resample
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        xavier_init_(self, gain)
        self.register_buffer("resample_filter", fir_filter(resample_filter) if up or down else None)
        self.box = _is_box(resample_filter)
        self.filter_pad = (len(resample_filter) - 1) // 2

    def _add_bias(self, x: Tensor) -> Tensor:
        return x if self.bias is None else x + rearrange(self.bias.to(x.dtype), "c -> c 1 1")

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels, H', W') with H' = 2H (up), H/2 (down) or H."""
        weight = self.weight.to(x.dtype)
        pad = self.kernel // 2
        f = self.resample_filter
        if f is None:
            return F.conv2d(x, weight, None if self.bias is None else self.bias.to(x.dtype), padding=pad)
        if self.fused_resample:
            x = F.conv2d(x, weight, padding=pad + self.filter_pad)
            return self._add_bias(fir_downsample(x, f, 0, self.box))
        if self.up and self.kernel == 1:
            return self._add_bias(fir_upsample(F.conv2d(x, weight), f, self.filter_pad, self.box))
        if self.up:
            x = fir_upsample(x, f, self.filter_pad, self.box)
        else:
            x = fir_downsample(x, f, self.filter_pad, self.box)
        return F.conv2d(x, weight, None if self.bias is None else self.bias.to(x.dtype), padding=pad)

    def extra_repr(self) -> str:
        mode = "up" if self.up else "down" if self.down else "none"
        return f"{self.in_channels}, {self.out_channels}, kernel={self.kernel}, resample={mode}"


class UNetBlock(nn.Module):
    """DDPM++ residual block: additive noise conditioning, optional resampling, optional self-attention.

    Residual part (EDM's ``adaptive_scale=False``, ``resample_proj=True``)::

        h = conv0(silu(norm0(x)))                 # conv0 resamples first when up/down
        h = conv1(dropout(silu(norm1(h + affine(emb)))))
        x = skip_scale * (h + skip(x))            # skip: 1x1 conv (with resampling) or identity

    Attention part (if ``attention``): ``x = skip_scale * (x + proj(attn(qkv(norm2(x)))))``, softmax attention
    over the H*W positions with ``num_heads`` heads (scaled_dot_product_attention).

    Cross-attention part (if ``context_dim > 0``, Imagen/LDM style):
    ``x = skip_scale * (x + proj_ctx(attn(q(norm3(x)), kv(context))))``, the H*W positions attending to the L
    context tokens (B, L, context_dim) under a key mask (B, L); ``proj_ctx`` starts near zero, so a new block
    starts as the identity.

    Args:
        in_channels: input width.
        out_channels: output width.
        emb_channels: width of the conditioning vector ``emb``.
        up: upsample by 2.
        down: downsample by 2.
        attention: append self-attention.
        num_heads: attention heads (must divide out_channels).
        dropout: dropout probability before ``conv1``.
        skip_scale: factor after each residual sum (EDM: 1/sqrt(2)).
        eps: GroupNorm eps.
        resample_filter: FIR taps for the resampling.
        context_dim: width of the context tokens for cross-attention; 0 = no cross-attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        skip_scale: float = math.sqrt(0.5),
        eps: float = 1e-6,
        resample_filter: Sequence[int] = (1, 1),
        context_dim: int = 0,
    ) -> None:
        super().__init__()
        if (attention or context_dim) and (num_heads < 1 or out_channels % num_heads):
            raise ValueError(f"num_heads={num_heads} must be >= 1 and divide out_channels={out_channels}")
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = num_heads if attention else 0
        self.cross_heads, self.context_dim = (num_heads, context_dim) if context_dim else (0, 0)
        self.dropout, self.skip_scale = dropout, skip_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = group_norm(in_channels, eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample)
        self.affine = linear(emb_channels, out_channels)
        self.norm1 = group_norm(out_channels, eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, gain=GAIN_ZERO)
        self.skip = None
        if in_channels != out_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, **resample)
        if attention:
            self.norm2 = group_norm(out_channels, eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, kernel=1, gain=GAIN_QKV)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, gain=GAIN_ZERO)
        if context_dim:
            self.norm3 = group_norm(out_channels, eps)
            self.q_ctx = Conv2d(out_channels, out_channels, kernel=1, gain=GAIN_QKV)
            self.kv_ctx = linear(context_dim, 2 * out_channels, gain=GAIN_QKV)
            self.proj_ctx = Conv2d(out_channels, out_channels, kernel=1, gain=GAIN_ZERO)

    def residual(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, in_channels, H, W), emb: (B, emb_channels) -> (B, out_channels, H', W')."""
        h = self.conv0(F.silu(self.norm0(x)))
        h = h.add_(rearrange(self.affine(emb), "b c -> b c 1 1"))
        h = F.dropout(F.silu(self.norm1(h)), p=self.dropout, training=self.training)
        h = self.conv1(h)
        return h.add_(self.skip(x) if self.skip is not None else x).mul_(self.skip_scale)

    def self_attention(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); channels of qkv are laid out (head, c, q/k/v) as in EDM."""
        height = x.shape[-2]
        qkv = self.qkv(self.norm2(x))
        q, k, v = rearrange(qkv, "b (n c three) h w -> three b n (h w) c", n=self.num_heads, three=3)
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v: (B, n, HW, c)
        a = heads_to_image(a, height)
        return self.proj(a).add_(x).mul_(self.skip_scale)

    def cross_attention(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim), context_mask: (B, L) bool (True = attend) -> (B, C, H, W).

        Every sample needs at least one attended token (the U-Net prepends a learned null token)."""
        height = x.shape[-2]
        q = rearrange(self.q_ctx(self.norm3(x)), "b (n c) h w -> b n (h w) c", n=self.cross_heads)
        k, v = rearrange(self.kv_ctx(context.to(x.dtype)), "b l (two n c) -> two b n l c", two=2, n=self.cross_heads)
        keep = rearrange(context_mask.bool(), "b l -> b 1 1 l")
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        a = heads_to_image(a, height)
        return self.proj_ctx(a).add_(x).mul_(self.skip_scale)

    def forward(
        self, x: Tensor, emb: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """x: (B, in_channels, H, W), emb: (B, emb_channels), context: (B, L, context_dim) and context_mask (B, L)
        for cross-attention blocks -> (B, out_channels, H', W')."""
        x = self.residual(x, emb)
        if self.num_heads:
            x = self.self_attention(x)
        if self.cross_heads:
            if context is None or context_mask is None:
                raise ValueError("this block cross-attends: it needs context (B, L, C) and context_mask (B, L)")
            x = self.cross_attention(x, context, context_mask)
        return x
