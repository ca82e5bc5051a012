"""DDPMppUNet (EDM's DDPM++ / NCSN++ SongUNet), its layers and the shared embeddings."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from lightning_dpmot.nets import DDPMppUNet, FourierEmbedding, PositionalEmbedding, class_one_hot
from lightning_dpmot.nets.layers import (
    GAIN_QKV,
    GAIN_ZERO,
    Conv2d,
    UNetBlock,
    fir_downsample,
    fir_filter,
    fir_upsample,
    num_groups,
)

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add Gaussian noise to every parameter, so that the near-zero output layers no longer hide the trunk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return net


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("data_shape", "kwargs"),
    [
        ((1, 8, 8), dict(channel_mult=[1, 2], attn_resolutions=[4])),
        ((3, 8, 8), dict(channel_mult=[1, 2, 2], attn_resolutions=[2, 8])),
        ((1, 16, 16), dict(channel_mult=[1, 2], attn_resolutions=[8])),
        ((3, 32, 32), dict(channel_mult=[1, 1, 2], attn_resolutions=[8], num_blocks=2)),
        (
            (3, 16, 16),
            dict(
                channel_mult=[2, 2],
                attn_resolutions=[8],
                embedding_type="fourier",
                channel_mult_noise=2,
                encoder_type="residual",
                resample_filter=[1, 3, 3, 1],
            ),
        ),
    ],
)
def test_output_shape_and_near_zero_init(data_shape: tuple[int, ...], kwargs: dict) -> None:
    torch.manual_seed(0)
    net = DDPMppUNet(data_shape, 0, **{**TINY, **kwargs})
    x = torch.randn(2, *data_shape)
    out = net(x, torch.randn(2))
    assert out.shape == x.shape and out.dtype == x.dtype
    # EDM init: output conv and the last conv of each branch have gain 1e-5, so a fresh net outputs ~0
    assert 0 < out.abs().max().item() < 1e-3
    assert perturb_(net)(x, torch.randn(2)).abs().mean().item() > 1e-2


def test_parameter_count_matches_edm_cifar10_ddpmpp() -> None:
    with torch.device("meta"):
        uncond = DDPMppUNet((3, 32, 32), 0)
        cond = DDPMppUNet((3, 32, 32), 10)
        ncsnpp = DDPMppUNet(
            (3, 32, 32),
            0,
            embedding_type="fourier",
            channel_mult_noise=2,
            encoder_type="residual",
            resample_filter=[1, 3, 3, 1],
        )
    n = count(uncond)
    assert abs(n - 55.73e6) / 55.73e6 < 0.01, f"DDPM++ CIFAR-10 has {n:,} parameters, EDM reports 55.73 M"
    assert n == 55_732_739, f"DDPM++ CIFAR-10 parameter count changed: {n:,}"
    # class map Linear(10 -> 128) with bias
    assert count(cond) - n == 10 * 128 + 128, f"conditional net has {count(cond):,} parameters"
    m = count(ncsnpp)
    assert abs(m - 56.40e6) / 56.40e6 < 0.01 and m == 56_395_523, f"NCSN++ CIFAR-10 has {m:,} parameters"


def test_module_names_follow_edm_state_dict() -> None:
    net = DDPMppUNet((3, 16, 16), 10, **{**TINY, "attn_resolutions": [8]}, encoder_type="residual")
    keys = set(net.state_dict())
    expected = {
        "map_label.weight",
        "map_layer0.weight",
        "map_layer1.bias",
        "enc.16x16_conv.weight",
        "enc.16x16_block0.conv0.weight",
        "enc.8x8_down.conv0.resample_filter",
        "enc.8x8_down.skip.weight",
        "enc.8x8_aux_residual.weight",
        "enc.8x8_block0.qkv.weight",
        "enc.8x8_block0.proj.bias",
        "dec.8x8_in0.norm2.weight",
        "dec.8x8_in1.affine.weight",
        "dec.16x16_up.skip.resample_filter",
        "dec.16x16_block1.skip.weight",
        "dec.16x16_aux_norm.weight",
        "dec.16x16_aux_conv.weight",
    }
    assert expected <= keys, sorted(expected - keys)
    assert "dec.8x8_in1.qkv.weight" not in keys  # only in0 has bottleneck attention
    assert net.state_dict()["map_label.weight"].shape == (16, 10)


def test_edm_init_scales() -> None:
    torch.manual_seed(0)
    block = UNetBlock(32, 64, emb_channels=128, attention=True)

    def bound(w: torch.Tensor) -> float:  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
        area = w[0, 0].numel() if w.ndim == 4 else 1
        return math.sqrt(6.0 / ((w.shape[0] + w.shape[1]) * area))

    for layer, gain in [
        (block.conv0, 1.0),
        (block.affine, 1.0),
        (block.skip, 1.0),
        (block.qkv, GAIN_QKV),
        (block.conv1, GAIN_ZERO),
        (block.proj, GAIN_ZERO),
    ]:
        w = layer.weight
        assert w.abs().max().item() <= gain * bound(w) * (1 + 1e-6)
        assert w.abs().max().item() >= 0.9 * gain * bound(w)  # uniform: the extreme sample is near the bound
        assert torch.count_nonzero(layer.bias) == 0
    assert block.norm0.num_groups == 8 and block.norm1.num_groups == 16 and block.norm1.eps == 1e-6


def test_num_groups_is_edm_rule_with_divisor_fallback() -> None:
    assert [num_groups(c) for c in (16, 32, 64, 128, 256, 384, 768)] == [4, 8, 16, 32, 32, 32, 32]
    assert num_groups(144) == 24 and 144 % num_groups(144) == 0  # min(32, 36) = 32 does not divide 144
    assert num_groups(3) == 1


def test_class_conditioning() -> None:
    torch.manual_seed(0)
    net = perturb_(DDPMppUNet((1, 8, 8), 3, **TINY)).eval()
    x, sigma = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1), torch.full((4,), 0.3)
    out = net(x, sigma, {"label": torch.tensor([0, 1, 2, -1])})
    for i in range(4):
        for j in range(i):
            assert (out[i] - out[j]).abs().max().item() > 1e-3, f"labels {i} and {j} give the same output"
    # -1 is the null label: identical to class_labels=None (only the label map's bias enters)
    null = net(x, sigma, None)
    torch.testing.assert_close(net(x, sigma, {"label": torch.full((4,), -1)}), null, rtol=0, atol=0)
    torch.testing.assert_close(out[3], null[0])


def test_unconditional_net_ignores_class_labels() -> None:
    net = perturb_(DDPMppUNet((1, 8, 8), 0, **TINY)).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.randn(3)
    torch.testing.assert_close(net(x, sigma, {"label": torch.tensor([0, 5, -1])}), net(x, sigma), rtol=0, atol=0)


def test_class_label_errors() -> None:
    net = DDPMppUNet((1, 8, 8), 10, **TINY)
    x, sigma = torch.randn(2, 1, 8, 8), torch.randn(2)
    with pytest.raises(
        ValueError, match=r"class_labels must lie in \[-1, 9\] \(-1 = no class\), got values in \[0, 10\]"
    ):
        net(x, sigma, {"label": torch.tensor([0, 10])})
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        net(x, sigma, {"label": torch.tensor([0.0, 1.0])})
    with pytest.raises(ValueError, match=r"class_labels must have shape \(2,\), got \(2, 10\)"):
        net(x, sigma, {"label": torch.zeros(2, 10, dtype=torch.long)})


def test_class_one_hot() -> None:
    hot = class_one_hot(torch.tensor([2, -1, 0]), 4)
    expected = torch.tensor([[0, 0, 2, 0], [0, 0, 0, 0], [2, 0, 0, 0]], dtype=torch.float32)  # sqrt(4) = 2
    torch.testing.assert_close(hot, expected)


def test_bad_data_shapes() -> None:
    with pytest.raises(ValueError, match=r"not divisible by 2\*\*\(len\(channel_mult\) - 1\) = 4"):
        DDPMppUNet((3, 30, 30), 0, **{**TINY, "channel_mult": [1, 2, 2]})
    with pytest.raises(ValueError, match=r"needs an image data_shape \(C, H, W\).*got \(2,\)"):
        DDPMppUNet((2,), 0, **TINY)
    with pytest.raises(ValueError, match="needs square images"):
        DDPMppUNet((3, 16, 8), 0, **TINY)
    with pytest.raises(ValueError, match=r"attn_resolutions \[16\] are not among the U-Net's resolutions \[8, 4\]"):
        DDPMppUNet((1, 8, 8), 0, **{**TINY, "attn_resolutions": [16]})
    with pytest.raises(ValueError, match="resample_filter must be a 1-D list of an even number of taps"):
        DDPMppUNet((1, 8, 8), 0, **TINY, resample_filter=[1, 2, 1])
    net = DDPMppUNet((1, 8, 8), 0, **TINY)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.randn(2))
    with pytest.raises(ValueError, match=r"noise_labels must have shape \(2,\)"):
        net(torch.randn(2, 1, 8, 8), torch.randn(3))


def test_single_noise_label_is_broadcast() -> None:
    net = perturb_(DDPMppUNet((1, 8, 8), 0, **TINY)).eval()
    x = torch.randn(3, 1, 8, 8)
    expected = net(x, torch.full((3,), 0.25))
    torch.testing.assert_close(net(x, torch.tensor(0.25)), expected)
    torch.testing.assert_close(net(x, torch.tensor([0.25], dtype=torch.float64)), expected)


def test_dropout_only_in_training() -> None:
    net = perturb_(DDPMppUNet((1, 8, 8), 0, **{**TINY, "dropout": 0.5}))
    x, sigma = torch.randn(2, 1, 8, 8), torch.randn(2)
    assert not torch.equal(net(x, sigma), net(x, sigma))
    net.eval()
    torch.testing.assert_close(net(x, sigma), net(x, sigma), rtol=0, atol=0)


def test_positional_embedding_values() -> None:
    emb = PositionalEmbedding(8, endpoint=True)
    x = torch.tensor([0.5, -2.0])
    freqs = torch.tensor([1.0, 1e-4 ** (1 / 3), 1e-4 ** (2 / 3), 1e-4])  # lowest frequency exactly 1/10000
    phase = x[:, None] * freqs
    torch.testing.assert_close(emb(x), torch.cat([phase.sin(), phase.cos()], dim=1))
    no_endpoint = PositionalEmbedding(8, endpoint=False, order="cos_sin")(x)
    phase = x[:, None] * 1e-4 ** (torch.arange(4) / 4)
    torch.testing.assert_close(no_endpoint, torch.cat([phase.cos(), phase.sin()], dim=1))


def test_fourier_freqs_identical_under_different_global_seeds() -> None:
    torch.manual_seed(1)
    a = DDPMppUNet((1, 8, 8), 0, **TINY, embedding_type="fourier")
    torch.manual_seed(2)
    b = DDPMppUNet((1, 8, 8), 0, **TINY, embedding_type="fourier")
    assert not torch.equal(a.map_layer0.weight, b.map_layer0.weight)  # the trunk does follow the global seed
    torch.testing.assert_close(a.map_noise.freqs, b.map_noise.freqs, rtol=0, atol=0)
    assert "map_noise.freqs" in a.state_dict()
    freqs = FourierEmbedding(64).freqs
    assert 10 < freqs.std().item() < 22  # N(0, 16^2)
    x = torch.tensor([0.3])
    phase = 2 * math.pi * freqs * 0.3
    torch.testing.assert_close(FourierEmbedding(64)(x)[0], torch.cat([phase.sin(), phase.cos()]))


@pytest.mark.parametrize("taps", [[1, 1], [1, 3, 3, 1]])
def test_fir_resampling(taps: list[int]) -> None:
    kernel, pad = fir_filter(taps), (len(taps) - 1) // 2
    x = torch.randn(2, 3, 8, 8)
    down, up = fir_downsample(x, kernel, pad), fir_upsample(x, kernel, pad)
    assert down.shape == (2, 3, 4, 4) and up.shape == (2, 3, 16, 16)
    if taps == [1, 1]:  # the fast path equals the depthwise FIR conv
        torch.testing.assert_close(fir_downsample(x, kernel, 0, box=True), down)
        torch.testing.assert_close(fir_upsample(x, kernel, 0, box=True), up)
        torch.testing.assert_close(down, F.avg_pool2d(x, 2))
        torch.testing.assert_close(up, x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    # the filters preserve a constant image away from the borders
    ones = torch.ones(1, 1, 8, 8)
    torch.testing.assert_close(fir_downsample(ones, kernel, pad)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))
    torch.testing.assert_close(fir_upsample(ones, kernel, pad)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


def test_conv_up_1x1_commutes_with_filter() -> None:
    torch.manual_seed(0)
    conv = perturb_(Conv2d(4, 6, kernel=1, up=True, resample_filter=[1, 3, 3, 1]), scale=0.5)
    x = torch.randn(2, 4, 5, 5)
    reference = F.conv2d(fir_upsample(x, fir_filter([1, 3, 3, 1]), 1), conv.weight, conv.bias)  # EDM's order
    torch.testing.assert_close(conv(x), reference)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_self_attention_matches_softmax_formula(num_heads: int) -> None:
    torch.manual_seed(0)
    block = perturb_(UNetBlock(8, 8, emb_channels=4, attention=True, num_heads=num_heads), scale=0.2)
    x = torch.randn(2, 8, 4, 4)
    qkv = rearrange(block.qkv(block.norm2(x)), "b (n c three) h w -> three b n c (h w)", n=num_heads, three=3)
    q, k, v = qkv
    w = torch.softmax(torch.einsum("bncq,bnck->bnqk", q, k) / math.sqrt(q.shape[2]), dim=-1)
    a = rearrange(torch.einsum("bnqk,bnck->bncq", w, v), "b n c (h w) -> b (n c) h w", h=4)
    expected = (x + block.proj(a)) * math.sqrt(0.5)
    torch.testing.assert_close(block.self_attention(x), expected, rtol=1e-5, atol=1e-5)


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    net = DDPMppUNet((1, 8, 8), 2, **TINY)
    x, sigma, labels = torch.randn(8, 1, 8, 8), torch.randn(8), torch.tensor([0, 1] * 4)
    target = torch.randn(8, 1, 8, 8) * 0.5
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = (net(x, sigma, {"label": labels}) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_constructor_follows_net_interface() -> None:
    params = list(inspect.signature(DDPMppUNet.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["data_shape", "num_classes"]
    doc = inspect.getdoc(DDPMppUNet) or ""
    for p in params[1:]:
        assert p.default is not inspect.Parameter.empty and p.annotation is not inspect.Parameter.empty, p.name
        assert f"    {p.name}:" in doc, f"{p.name} missing from the Args section"
