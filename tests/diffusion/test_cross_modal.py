"""Cross-modal (CLIP) guidance: the exact update against an independent autograd computation, its sign, the
conditional prompt embeddings, the RMS clamp, the NaN guard, schedules, and per-sample determinism."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpmot.diffusion.cross_modal import (
    CrossModalSpec,
    GuideModel,
    clamp_rms,
    finite_or_zero,
    spherical_distance,
)
from lightning_dpmot.diffusion.cutouts import CutoutSpec
from lightning_dpmot.diffusion.guidance import CFGDenoiser, GuidanceSpec
from lightning_dpmot.diffusion.guidance_schedules import Window
from lightning_dpmot.sampling.schedules import karras_sigmas

PLAIN = CutoutSpec(overview=1, inner=0, flip_p=0.0, rotate_deg=0.0, translate=0.0, gray_p=0.0, noise_std=0.0)


class ToyMatcher(nn.Module):
    """A tiny matching model for unit tests: linear image embedding at 8 px, hashed random text embeddings."""

    image_size = 8

    def __init__(self, seed: int = 0, dim: int = 6, nan_rows: Sequence[int] = ()) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(dim, 3 * 8 * 8, generator=g) / 8, requires_grad=False)
        self.dim, self.nan_rows = dim, list(nan_rows)

    def encode_image(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.image_size:
            images = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False)
        out = images.float().flatten(1) @ self.weight.T
        if self.nan_rows:
            out = out.clone()
            out[self.nan_rows] = float("nan")
        return F.normalize(out, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def gaussian_denoiser(x: Tensor, sigma: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
    """The exact denoiser of N(0, I) data (sigma_data = 1), with an additive text-dependent shift."""
    shift = 0.0 if not cond else cond["pooled"].mean(1).view(-1, 1, 1, 1)
    return x / (1 + sigma.view(-1, 1, 1, 1) ** 2) + shift


def spec_for(matcher: nn.Module, **kwargs: object) -> CrossModalSpec:
    kwargs.setdefault("cutouts", PLAIN)
    kwargs.setdefault("clamp_rms", None)
    kwargs.setdefault("range_weight", 0.0)
    return CrossModalSpec(guides=[GuideModel("toy", model=matcher)], **kwargs)  # type: ignore[arg-type]


SIGMAS = karras_sigmas(8, 0.002, 80.0, 7.0).double()
PROMPTS = {"caption_en": ["a red circle", "a blue square"]}


@pytest.mark.parametrize("blend", [True, False])
@pytest.mark.parametrize("through", [True, False])
def test_update_is_minus_s_sigma_squared_grad_of_the_loss(blend: bool, through: bool) -> None:
    torch.manual_seed(0)
    matcher, s = ToyMatcher(), 0.7
    spec = spec_for(matcher, scale=s, blend=blend, grad_through_unet=through)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64) * 2
    sigma = torch.full((2,), float(SIGMAS[3]), dtype=torch.float64)
    cond = spec.prepare(PROMPTS, torch.tensor([0, 1]), "cpu")
    guided = spec.wrap(gaussian_denoiser, SIGMAS)(x, sigma, cond)

    # independent computation of D - s sigma^2 grad_x L, straight from the equations
    xr = x.clone().requires_grad_(True)
    d = xr / (1 + sigma.view(-1, 1, 1, 1) ** 2)
    if not through:
        d = d.detach() + (xr - xr.detach())
    sv = (sigma / torch.sqrt(1 + sigma**2)).view(-1, 1, 1, 1)
    scored = sv * d + (1 - sv) * xr / torch.sqrt(1 + sigma.view(-1, 1, 1, 1) ** 2) if blend else d
    image = F.interpolate(scored.float(), size=(8, 8), mode="bilinear", align_corners=False)
    text = F.normalize(matcher.encode_text(PROMPTS["caption_en"]), dim=-1)
    loss = spherical_distance(matcher.encode_image(image), text).sum()
    (grad,) = torch.autograd.grad(loss, xr)
    expected = x / (1 + sigma.view(-1, 1, 1, 1) ** 2) - s * sigma.view(-1, 1, 1, 1) ** 2 * grad
    assert torch.allclose(guided, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert not torch.allclose(guided, gaussian_denoiser(x, sigma))


def test_one_guided_step_raises_the_guides_similarity_to_the_prompt() -> None:
    torch.manual_seed(1)
    matcher = ToyMatcher(seed=3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64) * float(SIGMAS[4])
    sigma, sigma_next = float(SIGMAS[4]), float(SIGMAS[5])
    sig = torch.full((2,), sigma, dtype=torch.float64)
    text = matcher.encode_text(PROMPTS["caption_en"])

    def similarity_after_euler_step(scale: float) -> Tensor:
        spec = spec_for(matcher, scale=scale, blend=False)
        d = spec.wrap(gaussian_denoiser, SIGMAS)(x, sig, spec.prepare(PROMPTS, torch.tensor([0, 1]), "cpu"))
        x_next = x + (sigma_next - sigma) * (x - d) / sigma
        x0 = gaussian_denoiser(x_next, torch.full((2,), sigma_next, dtype=torch.float64))
        return (matcher.encode_image(x0.float()) * text).sum(1)

    base = similarity_after_euler_step(0.0)
    small, larger = similarity_after_euler_step(0.02), similarity_after_euler_step(0.05)
    assert (small > base).all() and (larger > small).all()


def test_guidance_differentiates_the_cfg_combined_prediction_with_the_prompt_embeddings() -> None:
    torch.manual_seed(2)
    matcher, w, s = ToyMatcher(seed=5), 3.0, 0.4
    cond_text = {
        "tokens": torch.randn(2, 4, 5),
        "mask": torch.ones(2, 4, dtype=torch.bool),
        "pooled": torch.randn(2, 5),
    }

    def null(c: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.zeros_like(v) for k, v in c.items()}

    seen: list[set[str]] = []

    def recording(x: Tensor, sigma: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        seen.append(set(cond or {}))
        return gaussian_denoiser(x, sigma, cond)

    spec = GuidanceSpec(scale=w, cross_modal=spec_for(matcher, scale=s, blend=False))
    extra = spec.prepare(PROMPTS, torch.tensor([0, 1]), "cpu")
    # the guide's embeddings are the prompts' (not the empty / null prompt's: diffusers #596)
    assert torch.allclose(extra["guide0"], matcher.encode_text(PROMPTS["caption_en"]))
    assert not torch.allclose(extra["guide0"][0], matcher.encode_text([""])[0])
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.full((2,), 1.5, dtype=torch.float64)
    guided = spec.wrap(recording, null, SIGMAS)(x, sigma, {**cond_text, **extra})
    assert seen and all(keys == {"tokens", "mask", "pooled"} for keys in seen)  # guidance entries removed

    xr = x.clone().requires_grad_(True)
    cfg = CFGDenoiser(gaussian_denoiser, w, null)(xr, sigma, cond_text)
    text = matcher.encode_text(PROMPTS["caption_en"])
    image = F.interpolate(cfg.float(), size=(8, 8), mode="bilinear", align_corners=False)
    (grad,) = torch.autograd.grad(spherical_distance(matcher.encode_image(image), text).sum(), xr)
    expected = cfg.detach() - s * 1.5**2 * grad
    assert torch.allclose(guided, expected, rtol=1e-4, atol=1e-6)
    other = spec.prepare({"caption_en": ["a green cross", "a blue square"]}, torch.tensor([0, 1]), "cpu")
    changed = spec.wrap(gaussian_denoiser, null, SIGMAS)(x, sigma, {**cond_text, **other})
    assert not torch.allclose(changed[0], guided[0]) and torch.allclose(changed[1], guided[1])


def test_rms_clamp_caps_the_step_and_nan_guard_returns_zero() -> None:
    g = torch.randn(3, 3, 4, 4) * 5
    g[1] *= 1e-4
    clamped = clamp_rms(g, 0.05)
    rms = clamped.pow(2).flatten(1).mean(1).sqrt()
    assert torch.allclose(rms[[0, 2]], torch.tensor(0.05)) and torch.equal(clamped[1], g[1])
    bad = g.clone()
    bad[2, 0, 0, 0] = float("nan")
    guarded = finite_or_zero(bad)
    assert torch.equal(guarded[2], torch.zeros_like(g[2])) and torch.equal(guarded[0], g[0])

    matcher = ToyMatcher(nan_rows=[0])
    spec = spec_for(matcher, scale=1000.0, clamp_rms=1e-3)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.full((2,), float(SIGMAS[2]), dtype=torch.float64)
    wrapped = spec.wrap(gaussian_denoiser, SIGMAS)
    out = wrapped(x, sigma, spec.prepare(PROMPTS, torch.tensor([0, 1]), "cpu"))
    plain = gaussian_denoiser(x, sigma)
    assert torch.equal(out[0], plain[0])  # NaN gradient -> no guidance for that sample
    sv = float(sigma[1] / torch.sqrt(1 + sigma[1] ** 2))
    shift_rms = float((out[1] - plain[1]).pow(2).mean().sqrt())
    assert shift_rms == pytest.approx(float(sigma[1]) * sv * 1e-3, rel=1e-5)  # clamp active: |D~ - D| = sigma sv c


def test_schedule_window_guides_only_inside_it() -> None:
    matcher = ToyMatcher()
    spec = spec_for(matcher, scale=Window(0.5, tau_min=0.0, tau_max=0.5))
    wrapped = spec.wrap(gaussian_denoiser, SIGMAS)
    cond = spec.prepare(PROMPTS, torch.tensor([0, 1]), "cpu")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for i, level in enumerate(SIGMAS[:-1]):
        sigma = torch.full((2,), float(level), dtype=torch.float64)
        out = wrapped(x, sigma, cond)
        inside = 1 - i / 8 <= 0.5
        assert torch.equal(out, gaussian_denoiser(x, sigma)) != inside
    assert wrapped.calls == 4  # levels 4..7 of 8 (tau = 0.5, 0.375, 0.25, 0.125)


def test_guidance_spec_parses_from_yaml_with_schedules() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--guidance", type=GuidanceSpec)
    cfg = parser.parse_object(
        {
            "guidance": {
                "scale": {"class_path": "lightning_dpmot.diffusion.Linear", "init_args": {"start": 5.0, "end": 1.0}},
                "cross_modal": {
                    "guides": [{"source": "/models/guide.ckpt", "text_key": "caption_zh", "weight": 2.0}],
                    "scale": {"class_path": "lightning_dpmot.diffusion.Window", "init_args": {"value": 20.0}},
                    "cutouts": {"inner": 4, "overview": 2},
                    "clamp_rms": 0.05,
                },
            }
        }
    )
    spec = parser.instantiate_classes(cfg).guidance
    assert spec.scale.at(1.0) == 5.0 and spec.needs_grad
    assert spec.cross_modal.guides[0].text_key == "caption_zh" and spec.cross_modal.scale.at(0.3) == 20.0
    assert spec.with_guide_text_key("caption_en").cross_modal.guides[0].text_key == "caption_en"
    assert not GuidanceSpec(scale=2.0).needs_grad
