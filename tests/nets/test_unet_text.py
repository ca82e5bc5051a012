"""Text cross-attention in the DDPM++ U-Net: prompts condition it, masked padding does not, the null is learned."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.nets import DDPMppUNet

C, L = 12, 6
TEXT = dict(
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[4],
    dropout=0.0,
    num_heads=2,
    context_dim=C,
    cross_attn_resolutions=[8, 4],
)


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so that the near-zero output and projection layers stop hiding the trunk."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net.eval()


def prompt(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, L, dtype=torch.bool)
    mask[:, :length] = True
    return {
        "tokens": torch.randn(batch, L, C, generator=gen),
        "mask": mask,
        "pooled": torch.randn(batch, C, generator=gen),
    }


def test_cross_attention_blocks_and_untouched_nets_without_text() -> None:
    net = DDPMppUNet((3, 8, 8), **TEXT)
    crossing = sorted(name for name, m in net.named_modules() if getattr(m, "cross_heads", 0))
    assert crossing == sorted(
        [
            "enc.8x8_block0",
            "enc.4x4_block0",
            "dec.4x4_in0",
            "dec.4x4_in1",
            "dec.4x4_block0",
            "dec.4x4_block1",
            "dec.8x8_block0",
            "dec.8x8_block1",
        ]
    )
    plain = DDPMppUNet((3, 8, 8), **{**TEXT, "context_dim": 0, "cross_attn_resolutions": []})
    assert not any("ctx" in n or "null" in n or "map_text" in n for n, _ in plain.named_parameters())
    with pytest.raises(ValueError, match="cross_attn_resolutions need context_dim >= 1"):
        DDPMppUNet((3, 8, 8), **{**TEXT, "context_dim": 0})
    with pytest.raises(ValueError, match=r"cross_attn_resolutions \[16\] are not among"):
        DDPMppUNet((3, 8, 8), **{**TEXT, "cross_attn_resolutions": [16]})


def test_prompts_change_the_output_and_masked_padding_does_not() -> None:
    net = perturbed(DDPMppUNet((3, 8, 8), **TEXT))
    x, sigma = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.3)
    a, b = prompt(2, 4, seed=1), prompt(2, 4, seed=2)
    out_a, out_b = net(x, sigma, a), net(x, sigma, b)
    assert (out_a - out_b).abs().max() > 1e-3
    padded = {**a, "tokens": a["tokens"].clone()}
    padded["tokens"][:, 4:] = 100.0 * torch.randn(2, L - 4, C)  # only masked positions change
    assert torch.equal(net(x, sigma, padded), out_a)
    # the tokens themselves matter, not only the pooled vector
    tokens_only = {**a, "tokens": a["tokens"] + 1.0}
    assert (net(x, sigma, tokens_only) - out_a).abs().max() > 1e-4


def test_empty_mask_is_the_learned_null_condition() -> None:
    net = perturbed(DDPMppUNet((3, 8, 8), **TEXT))
    x, sigma = torch.randn(3, 3, 8, 8), torch.full((3,), 1.0)
    null = {**prompt(3, 0, seed=3)}  # empty mask: tokens and pooled are ignored
    other = {**prompt(3, 0, seed=4)}
    out = net(x, sigma, null)
    assert torch.isfinite(out).all()
    assert torch.equal(out, net(x, sigma, other))
    torch.testing.assert_close(net(x, sigma, None), out, rtol=1e-4, atol=1e-5)  # no text at all = the null
    net.train()
    net(x, sigma, null).square().mean().backward()
    assert net.null_token.grad.abs().sum() > 0 and net.null_pooled.grad.abs().sum() > 0


def test_bad_text_shapes() -> None:
    net = DDPMppUNet((3, 8, 8), **TEXT)
    x, sigma = torch.randn(2, 3, 8, 8), torch.ones(2)
    bad = prompt(2, 3, seed=0)
    with pytest.raises(ValueError, match=r"cond\['tokens'\] must have shape \(2, L, 12\)"):
        net(x, sigma, {**bad, "tokens": torch.zeros(2, L, 5)})
    with pytest.raises(ValueError, match=r"cond\['mask'\] must have shape \(2, 6\)"):
        net(x, sigma, {**bad, "mask": torch.ones(2, 5, dtype=torch.bool)})
