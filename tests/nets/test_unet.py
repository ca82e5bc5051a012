"""DDPM++ U-Net and its layers: shapes, EDM parameter counts, init, conditioning, resampling, bad input."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_dpmot.nets import DDPMppUNet, FourierEmbedding, PositionalEmbedding, Resample2d, class_one_hot
from lightning_dpmot.nets.layers import SelfAttention2d, UNetBlock, num_groups


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny nets gain nothing from intra-op threads; on the shared 2-core box they only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
NCSNPP = dict(
    embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1]
)


def reinit_(net: nn.Module) -> nn.Module:
    """Unit-gain xavier weights and random biases for every conv/linear (undoing the near-zero init)."""
    gen = torch.Generator().manual_seed(1)
    for module in net.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight, generator=gen)
            if module.bias is not None:
                module.bias.data = 0.1 * torch.randn(module.bias.shape, generator=gen)
    return net


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    ("data_shape", "kwargs"),
    [
        ((1, 8, 8), dict(TINY)),
        ((3, 16, 16), dict(TINY, channel_mult=[1, 2, 2], attn_resolutions=[8, 4])),
        ((3, 32, 32), dict(TINY, channel_mult=[1, 1, 2, 2], attn_resolutions=[8])),
        ((1, 16, 16), dict(TINY, channel_mult=[1, 2, 2], attn_resolutions=[4], **NCSNPP)),
        ((3, 8, 8), dict(TINY, channel_mult=[2], attn_resolutions=[8])),
    ],
)
def test_output_shape_and_near_zero_init(data_shape: tuple[int, ...], kwargs: dict) -> None:
    torch.manual_seed(0)
    net = DDPMppUNet(data_shape, 0, **kwargs)
    x = torch.randn(3, *data_shape)
    out = net(x, torch.randn(3))
    assert out.shape == x.shape
    # output conv has gain 1e-5: a fresh net is almost exactly zero
    assert out.abs().max() < 1e-3
    out = reinit_(net)(x, torch.randn(3))
    assert out.shape == x.shape and out.std() > 1e-2


@pytest.mark.parametrize(
    ("kwargs", "num_classes", "expected"),
    [
        ({}, 0, 55_732_739),  # EDM CIFAR-10 DDPM++ uncond, "55.73 M"
        ({}, 10, 55_734_147),  # class-conditional: + Linear(10 -> 128)
        (NCSNPP, 0, 56_395_523),  # EDM CIFAR-10 NCSN++ uncond, "56.40 M"
    ],
)
def test_parameter_count_matches_edm(kwargs: dict, num_classes: int, expected: int) -> None:
    with torch.device("meta"):
        net = DDPMppUNet((3, 32, 32), num_classes, **kwargs)
    n = count(net)
    assert n == expected, f"{n:,} parameters ({n / 1e6:.2f} M), EDM's SongUNet has {expected:,}"
    assert abs(n / (55.73e6 if not kwargs else 56.40e6) - 1) < 0.01


def test_cifar_layout_names_and_attention_placement() -> None:
    with torch.device("meta"):
        net = DDPMppUNet((3, 32, 32))

    def with_attention(blocks: nn.ModuleDict) -> set[str]:
        return {name for name, block in blocks.items() if getattr(block, "attn", None) is not None}

    assert with_attention(net.enc) == {f"16x16_block{i}" for i in range(4)}
    assert with_attention(net.dec) == {
        "8x8_in0",
        "16x16_block4",
    }  # bottleneck + last block of the 16x16 level
    assert list(net.enc)[:2] == ["32x32_conv", "32x32_block0"] and list(net.dec)[-1] == "32x32_block4"
    assert net.map_noise.num_channels == 128 and net.map_layer1.out_features == 512
    assert {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)} == {32}
    assert {m.eps for m in net.modules() if isinstance(m, nn.GroupNorm)} == {1e-6}


def test_class_conditioning() -> None:
    torch.manual_seed(0)
    net = reinit_(DDPMppUNet((1, 8, 8), 3, **TINY)).eval()
    x, sigma = torch.randn(4, 1, 8, 8), torch.randn(4)
    labels = torch.tensor([0, 1, 2, -1])
    out = net(x, sigma, labels)
    out_other = net(x, sigma, torch.tensor([1, 1, 0, -1]))
    # a different class changes that sample only (no interaction across the batch)
    assert (out[0] - out_other[0]).abs().max() > 1e-3 and (out[2] - out_other[2]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], out_other[1])
    torch.testing.assert_close(out[3], out_other[3])
    # -1 is the null label and equals class_labels=None
    assert torch.equal(net(x, sigma, torch.full((4,), -1)), net(x, sigma, None))
    torch.testing.assert_close(net(x, sigma, None)[3], out[3])


def test_unconditional_net_ignores_class_labels() -> None:
    torch.manual_seed(0)
    net = reinit_(DDPMppUNet((1, 8, 8), 0, **TINY))
    x, sigma = torch.randn(2, 1, 8, 8), torch.randn(2)
    assert net.map_label is None
    assert torch.equal(net(x, sigma, torch.tensor([3, 7])), net(x, sigma))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([0, 3]), r"class_labels must lie in \[-1, 2\].*got values in \[0, 3\]"),
        (torch.tensor([-2, 0]), r"class_labels must lie in \[-1, 2\]"),
        (torch.tensor([0.0, 1.0]), "class_labels must be an integer tensor"),
        (torch.tensor([0, 1, 2]), r"class_labels must have shape \(2,\)"),
    ],
)
def test_bad_class_labels(labels: torch.Tensor, message: str) -> None:
    net = DDPMppUNet((1, 8, 8), 3, **TINY)
    with pytest.raises(ValueError, match=message):
        net(torch.randn(2, 1, 8, 8), torch.randn(2), labels)


@pytest.mark.parametrize(
    ("data_shape", "kwargs", "message"),
    [
        ((3, 20, 20), dict(channel_mult=[1, 2, 2, 2], attn_resolutions=[]), r"not divisible by .* = 8"),
        ((2,), {}, r"needs image data_shape \(C, H, W\)"),
        ((3, 16, 8), {}, "needs square images"),
        ((1, 16, 16), dict(attn_resolutions=[32]), r"attn_resolutions \[32\] are not among .* \[16, 8\]"),
        ((1, 8, 8), dict(encoder_type="skip"), "encoder_type must be"),
        ((1, 8, 8), dict(embedding_type="sinusoid"), "embedding_type must be"),
    ],
)
def test_bad_construction(data_shape: tuple[int, ...], kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DDPMppUNet(data_shape, 0, **{**TINY, **kwargs})


def test_bad_forward_inputs() -> None:
    net = DDPMppUNet((1, 8, 8), 0, **TINY)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.randn(2))
    with pytest.raises(ValueError, match=r"noise_labels must have shape \(2,\)"):
        net(torch.randn(2, 1, 8, 8), torch.randn(3))
    with pytest.raises(ValueError, match="augment_dim=0"):
        net(torch.randn(2, 1, 8, 8), torch.randn(2), None, torch.randn(2, 9))
    # a scalar noise label is broadcast to the batch
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(reinit_(net)(x, torch.tensor(0.3)), net(x, torch.full((2,), 0.3)))


def test_augment_labels_condition_the_net() -> None:
    torch.manual_seed(0)
    net = reinit_(DDPMppUNet((1, 8, 8), 0, augment_dim=9, **TINY)).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.randn(2)
    assert torch.equal(net(x, sigma, None, torch.zeros(2, 9)), net(x, sigma))  # no bias: zeros = none
    assert (net(x, sigma, None, torch.randn(2, 9)) - net(x, sigma)).abs().max() > 1e-3


def test_fourier_freqs_independent_of_global_seed() -> None:
    torch.manual_seed(0)
    a = DDPMppUNet((1, 8, 8), 0, **TINY, **{**NCSNPP, "channel_mult_noise": 1})
    torch.manual_seed(12345)
    b = DDPMppUNet((1, 8, 8), 0, **TINY, **{**NCSNPP, "channel_mult_noise": 1})
    assert torch.equal(a.map_noise.freqs, b.map_noise.freqs)
    assert "map_noise.freqs" in a.state_dict()  # persistent: checkpoints carry it
    assert abs(a.map_noise.freqs.std().item() / 16 - 1) < 0.5  # N(0, 16^2) frequencies
    assert not torch.equal(FourierEmbedding(16, seed=1).freqs, FourierEmbedding(16, seed=2).freqs)


def test_positional_embedding_formula() -> None:
    sigma = torch.tensor([0.0, 0.5, -2.0])
    emb = PositionalEmbedding(8, endpoint=True, order="sin_cos")(sigma)
    freqs = torch.tensor([1.0, 10 ** (-4 / 3), 10 ** (-8 / 3), 1e-4])  # lowest frequency is 1/10000 exactly
    phase = sigma[:, None] * freqs
    torch.testing.assert_close(emb, torch.cat([phase.sin(), phase.cos()], dim=1))
    no_end = PositionalEmbedding(8, endpoint=False)(sigma)  # ADM convention: 10000^(-i/4), cos first
    phase = sigma[:, None] * 10_000.0 ** (-torch.arange(4) / 4)
    torch.testing.assert_close(no_end, torch.cat([phase.cos(), phase.sin()], dim=1))


def test_class_one_hot_scaled_and_null() -> None:
    hot = class_one_hot(torch.tensor([2, -1, 0]), 4)
    expected = torch.zeros(3, 4)
    expected[0, 2] = expected[2, 0] = 2.0  # sqrt(4)
    assert torch.equal(hot, expected)


@pytest.mark.parametrize("mode", ["up", "down"])
def test_box_resampling_fast_path_equals_fir_conv(mode: str) -> None:
    x = torch.randn(2, 3, 8, 8)
    fast = Resample2d(mode, [1, 1])
    assert fast.is_box
    weight = torch.full((3, 1, 2, 2), 0.25)
    ref = (
        F.conv2d(x, weight, stride=2, groups=3)
        if mode == "down"
        else F.conv_transpose2d(x, 4 * weight, stride=2, groups=3)
    )
    torch.testing.assert_close(fast(x), ref)


def test_fir_resampling_shapes_and_constant_preservation() -> None:
    ones = torch.ones(1, 2, 8, 8)
    down, up = Resample2d("down", [1, 3, 3, 1]), Resample2d("up", [1, 3, 3, 1])
    assert down(ones).shape == (1, 2, 4, 4) and up(ones).shape == (1, 2, 16, 16)
    # filters are normalised: a constant image stays constant away from the zero-padded border
    torch.testing.assert_close(down(ones)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))
    torch.testing.assert_close(up(ones)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))


def test_self_attention_formula() -> None:
    torch.manual_seed(0)
    attn = reinit_(SelfAttention2d(8))
    x = torch.randn(2, 8, 4, 4)
    qkv = rearrange(attn.qkv(attn.norm(x)), "b (c three) h w -> three b c (h w)", three=3)
    q, k, v = qkv
    weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(8), dim=-1)
    expected = attn.proj(rearrange(torch.einsum("bqk,bck->bcq", weights, v), "b c (h w) -> b c h w", h=4))
    torch.testing.assert_close(attn(x), expected)


def test_fresh_block_is_scaled_identity() -> None:
    torch.manual_seed(0)
    block = UNetBlock(16, 16, emb_channels=32, attention=True)
    x = torch.randn(2, 16, 8, 8)
    # conv1 and the attention projection start at gain 1e-5: out ~= x / sqrt(2) / sqrt(2)
    torch.testing.assert_close(block(x, torch.randn(2, 32)), x / 2, atol=1e-3, rtol=0)
    assert block.skip is None
    down = UNetBlock(16, 32, emb_channels=32, resample="down")
    assert down(x, torch.randn(2, 32)).shape == (2, 32, 4, 4) and down.skip.kernel_size == (1, 1)


def test_num_groups_follows_edm() -> None:
    assert [num_groups(c) for c in (128, 256, 512, 64, 32, 16, 96, 200)] == [32, 32, 32, 16, 8, 4, 24, 25]


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    net = reinit_(DDPMppUNet((1, 8, 8), 0, **{**TINY, "dropout": 0.5}))
    x, sigma = torch.randn(2, 1, 8, 8), torch.randn(2)
    assert not torch.equal(net.train()(x, sigma), net(x, sigma))
    assert torch.equal(net.eval()(x, sigma), net(x, sigma))


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = reinit_(DDPMppUNet((1, 8, 8), 3, **TINY, augment_dim=2))
    net(
        torch.randn(2, 1, 8, 8), torch.randn(2), torch.tensor([0, 2]), torch.randn(2, 2)
    ).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
