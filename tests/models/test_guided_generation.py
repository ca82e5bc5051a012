"""Cross-modal guidance through the generation protocol: Lightning's inference-mode predict loop, per-sample seeds,
gradient checkpointing, and the module's weights left as they were."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_dpmot.diffusion.cross_modal import CrossModalSpec, GuideModel
from lightning_dpmot.diffusion.cutouts import CutoutSpec
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.sampling.spec import SamplerSpec
from tests.conftest import tiny_text2img

pytest.importorskip("transformers")

PROMPTS = ["a large red circle", "a small blue square to the left of a large green cross", "a small cyan square"]
CUTS = CutoutSpec(overview=1, inner=2)


@pytest.fixture(scope="module")
def guide():
    from lightning_dpmot.nets.matching import MatchingModel

    return MatchingModel.small(
        image_size=16, patch_size=4, width=32, layers=1, heads=2, embed_dim=16, text_width=32, text_layers=1, seed=0
    ).eval()


def guided_spec(guide, **kwargs: object) -> GuidanceSpec:
    kwargs.setdefault("cutouts", CUTS)
    cross = CrossModalSpec(guides=[GuideModel("tiny-guide", model=guide)], **kwargs)  # type: ignore[arg-type]
    return GuidanceSpec(scale=2.0, cross_modal=cross)


@pytest.fixture()
def module():
    torch.manual_seed(0)
    m = tiny_text2img(sampler=SamplerSpec(name="euler", num_steps=3))
    return m


def test_guided_predict_runs_under_inference_mode_and_equals_generate(module, guide) -> None:
    module.guidance = guided_spec(guide, scale=50.0, clamp_rms=None)
    rows = [{"seed": i, "caption_en": p} for i, p in enumerate(PROMPTS)]
    trainer = L.Trainer(accelerator="cpu", inference_mode=True, logger=False, enable_progress_bar=False)
    (out,) = trainer.predict(module, DataLoader(rows, batch_size=3))
    direct = module.generate([0, 1, 2], {"caption_en": PROMPTS}).x
    unguided = module.generate([0, 1, 2], {"caption_en": PROMPTS}, guidance=GuidanceSpec(scale=2.0)).x
    assert torch.allclose(out["x"], direct, atol=1e-5)
    assert not torch.allclose(direct, unguided, atol=1e-4)
    assert all(p.requires_grad for p in module.parameters())  # restored after sampling


def test_guided_sample_depends_only_on_its_seed_and_prompt(module, guide) -> None:
    spec = guided_spec(guide, scale=50.0)
    batch = module.generate([4, 5, 6], {"caption_en": PROMPTS}, guidance=spec).x
    alone = module.generate([5], {"caption_en": PROMPTS[1:2]}, guidance=spec).x
    assert torch.allclose(batch[1:2], alone, atol=1e-5)


def test_gradient_checkpointing_and_cut_batches_change_memory_not_results(module, guide) -> None:
    plain = module.generate([1, 2], {"caption_en": PROMPTS[:2]}, guidance=guided_spec(guide, scale=30.0)).x
    ckpt = module.generate(
        [1, 2], {"caption_en": PROMPTS[:2]}, guidance=guided_spec(guide, scale=30.0, grad_checkpoint=True)
    ).x
    assert torch.allclose(plain, ckpt, atol=1e-6)


def test_a_zero_scale_is_plain_cfg_and_a_missing_prompt_entry_is_one_clear_error(module, guide) -> None:
    cfg = module.generate([0, 1], {"caption_en": PROMPTS[:2]}, guidance=GuidanceSpec(scale=2.0)).x
    zero = module.generate([0, 1], {"caption_en": PROMPTS[:2]}, guidance=guided_spec(guide, scale=0.0)).x
    assert torch.equal(cfg, zero)
    zh = GuidanceSpec(scale=2.0, cross_modal=guided_spec(guide).cross_modal).with_guide_text_key("caption_zh")
    with pytest.raises(KeyError, match="caption_zh"):
        module.generate([0, 1], {"caption_en": PROMPTS[:2]}, guidance=zh)


def test_one_guided_step_raises_the_tiny_clip_similarity_of_the_next_x0_hat(module, guide) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    sigmas = module.sigmas_for(SamplerSpec(name="euler", num_steps=6)).double()
    i = 2
    x = torch.randn(2, *module.data_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * float(sigmas[i])
    raw = {"caption_en": PROMPTS[:2]}
    text_cond = module.conditioner.prepare(raw)
    null = module.conditioner.null
    text = guide.encode_text(PROMPTS[:2])

    def similarity_after_step(scale: float) -> torch.Tensor:
        spec = guided_spec(
            guide,
            scale=scale,
            clamp_rms=None,
            blend=False,
            cutouts=CutoutSpec(
                overview=1, inner=0, flip_p=0.0, rotate_deg=0.0, translate=0.0, gray_p=0.0, noise_std=0.0
            ),
        )
        cond = {**text_cond, **spec.prepare(raw, torch.tensor([0, 1]), "cpu")}
        D = spec.wrap(module.denoiser, null, sigmas)
        sig = torch.full((2,), float(sigmas[i]), dtype=torch.float64)
        x_next = x + (sigmas[i + 1] - sigmas[i]) * (x - D(x, sig, cond)) / sigmas[i]
        cfg = GuidanceSpec(scale=2.0).wrap(module.denoiser, null, sigmas)
        with torch.no_grad():
            x0 = cfg(x_next, torch.full((2,), float(sigmas[i + 1]), dtype=torch.float64), text_cond)
            return (guide.encode_image(x0.float()) * text).sum(1)

    base, guided = similarity_after_step(0.0), similarity_after_step(2.0)
    assert (guided > base).all()
