"""Conditioning is one mapping: conditioners, and a text-like mapping through net, denoisers, samplers, loss, CFG."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_dpmot.diffusion import ClassConditioner, Conditioner, EDMPrecond, GuidanceSpec, VPEpsDenoiser, VPSchedule
from lightning_dpmot.diffusion.conditioning import cond_cat
from lightning_dpmot.diffusion.edm import edm_loss
from lightning_dpmot.sampling import SAMPLER_NAMES, SamplerSpec, karras_sigmas, run_sampler

B, L, C = 3, 5, 4


class TextConditioner(Conditioner):
    """Test double of a text conditioner: token states, mask and pooled vector; null = zeros and an empty mask."""

    keys = ("tokens", "mask", "pooled")

    def net_kwargs(self) -> dict[str, int]:
        return {"context_dim": C}

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "tokens": torch.zeros_like(cond["tokens"]),
            "mask": torch.zeros_like(cond["mask"]),
            "pooled": torch.zeros_like(cond["pooled"]),
        }


class TextSpyNet(torch.nn.Module):
    """Checks that it receives the whole mapping with matching batch sizes; output shifts by the masked mean token."""

    def __init__(self, data_shape: tuple[int, ...], context_dim: int) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.seen: list[dict[str, Tensor]] = []

    def forward(self, x: Tensor, noise_labels: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        assert cond is not None and set(cond) == {"tokens", "mask", "pooled"}, cond
        b = x.shape[0]
        assert cond["tokens"].shape == (b, L, self.context_dim) and cond["mask"].shape == (b, L)
        assert cond["pooled"].shape == (b, self.context_dim)
        self.seen.append(cond)
        m = cond["mask"].float().unsqueeze(-1)
        summary = (cond["tokens"] * m).sum(1).sum(1) / m.sum(1).clamp(min=1).squeeze(-1) + cond["pooled"].sum(1)
        return 0.1 * x + summary.reshape(b, *[1] * (x.ndim - 1)).to(x.dtype)


def text_cond(b: int = B) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[:, 3:] = False
    return {"tokens": torch.randn(b, L, C, generator=g), "mask": mask, "pooled": torch.randn(b, C, generator=g)}


def test_class_conditioner_null_drop_and_prepare() -> None:
    cc = ClassConditioner(10, dropout=0.5)
    cond = cc.from_batch({"x": torch.zeros(8), "label": torch.arange(8)})
    assert set(cond) == {"label"} and cc.net_kwargs() == {"num_classes": 10}
    assert torch.equal(cc.null(cond)["label"], torch.full((8,), -1))
    dropped = cc.drop(cond, torch.Generator().manual_seed(0))["label"]
    expected = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(dropped == -1, expected) and torch.equal(dropped[~expected], torch.arange(8)[~expected])
    assert cc.prepare({"label": torch.arange(2), "prompt_id": torch.arange(2)}).keys() == {"label"}
    assert cc.prepare({}) is None and Conditioner().prepare({"label": torch.arange(2)}) is None
    with pytest.raises(KeyError, match=r"needs the batch entries \['label'\]"):
        cc.from_batch({"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="different keys"):
        cond_cat({"label": torch.arange(2)}, {"tokens": torch.zeros(2, 1)})
    with pytest.raises(ValueError, match="num_classes >= 1"):
        ClassConditioner(0)


def test_text_dropout_replaces_every_entry_of_a_dropped_sample() -> None:
    tc = TextConditioner(dropout=0.5)
    cond = text_cond(64)
    out = tc.drop(cond, torch.Generator().manual_seed(1))
    dropped = ~out["mask"].any(1)
    assert 0 < int(dropped.sum()) < 64
    assert torch.equal(out["tokens"][dropped], torch.zeros_like(out["tokens"][dropped]))
    assert torch.equal(out["pooled"][~dropped], cond["pooled"][~dropped])


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_text_mapping_passes_through_denoisers_every_sampler_and_cfg(name: str) -> None:
    tc = TextConditioner()
    cond = text_cond()
    x = torch.randn(B, 1, 4, 4, dtype=torch.float64)
    sigmas = karras_sigmas(3, 0.01, 5.0)
    spec = SamplerSpec(name, num_steps=3, eta=0.5, S_churn=5.0)
    for denoiser in (
        EDMPrecond(TextSpyNet((1, 4, 4), **tc.net_kwargs())),
        VPEpsDenoiser(TextSpyNet((1, 4, 4), C), VPSchedule()),
    ):
        plain = run_sampler(spec, denoiser, x, sigmas, cond=cond, generator=torch.Generator().manual_seed(0))
        guided = run_sampler(
            spec,
            GuidanceSpec(scale=3.0).wrap(denoiser, tc.null),
            x,
            sigmas,
            cond=cond,
            generator=torch.Generator().manual_seed(0),
        )
        seen = denoiser.raw_net.seen
        assert plain.nfe == guided.nfe == spec.nfe
        # CFG ran the conditional and the null mapping as one batch of 2B
        assert seen[-1]["tokens"].shape[0] == 2 * B and not seen[-1]["mask"][B:].any()
        assert not torch.allclose(plain.x, guided.x)


def test_text_mapping_reaches_the_net_in_the_loss_and_changes_it() -> None:
    denoiser = EDMPrecond(TextSpyNet((1, 4, 4), C))
    y, n, sigma = torch.zeros(B, 1, 4, 4), torch.randn(B, 1, 4, 4), torch.full((B,), 0.5)
    loss = edm_loss(denoiser, y, n, sigma, text_cond())
    null = edm_loss(denoiser, y, n, sigma, TextConditioner().null(text_cond()))
    assert loss.shape == (B,) and not torch.allclose(loss, null)
