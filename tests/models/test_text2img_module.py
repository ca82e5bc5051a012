"""TextToImageModule: prompts reach the network, CFG limits, the frozen encoder stays out of training state."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from conftest import tiny_text2img  # noqa: E402

from lightning_dpmot.diffusion.guidance import GuidanceSpec  # noqa: E402
from lightning_dpmot.models import TextToImageModule  # noqa: E402
from lightning_dpmot.sampling import SamplerSpec  # noqa: E402

PROMPTS = ["a large red circle", "a small blue square to the left of a green cross", "a yellow triangle", ""]


def tiny_module(**kwargs: object) -> TextToImageModule:
    torch.manual_seed(0)
    model = tiny_text2img((3, 8, 8), **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the zero-initialised output layers so that prompts visibly matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_encoder_is_frozen_and_outside_parameters_state_and_ema_copy() -> None:
    model = tiny_module()
    encoder_params = {id(p) for p in model.text_encoder.hf_model.parameters()}
    assert encoder_params and not encoder_params & {id(p) for p in model.parameters()}
    assert not any(k.startswith("conditioner") for k in model.state_dict())
    assert all(not p.requires_grad for p in model.text_encoder.hf_model.parameters())
    model.train()
    assert not model.text_encoder.hf_model.training
    twin = copy.deepcopy(model)  # what EMA's WeightAveraging does
    assert twin.text_encoder.hf_model is model.text_encoder.hf_model
    assert model.denoiser.raw_net.context_dim == 16


def test_training_step_encodes_prompts_and_drops_some_to_the_null() -> None:
    model = tiny_module(cond_dropout=0.5)
    batch = {"x": torch.rand(64, 3, 8, 8) * 2 - 1, "caption_en": [PROMPTS[i % 3] for i in range(64)]}
    cond = model.training_condition(batch, batch_idx=0)
    assert cond["tokens"].shape[:2] == cond["mask"].shape and cond["pooled"].shape == (64, 16)
    dropped = ~cond["mask"].any(1)
    assert 10 < int(dropped.sum()) < 54
    loss = model.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and model.denoiser.raw_net.null_token.grad is not None
    with pytest.raises(KeyError, match="caption_en"):
        model.training_condition({"x": batch["x"]}, 0)


def test_prompts_steer_generation_and_cfg_limits() -> None:
    model = tiny_module()
    seeds = torch.tensor([0, 0])
    spec = SamplerSpec("euler", num_steps=4)
    a = model.generate(seeds, {"caption_en": PROMPTS[:2]}, spec).x
    assert (a[0] - a[1]).abs().max() > 1e-3  # same noise, different prompts
    cond = {"caption_en": PROMPTS[:2]}
    w1 = model.generate(seeds, cond, spec, GuidanceSpec(scale=1.0)).x
    assert torch.equal(w1, a)
    w0 = model.generate(seeds, cond, spec, GuidanceSpec(scale=0.0)).x
    null = model.generate(seeds, None, spec).x  # no prompt at all: the learned null
    torch.testing.assert_close(w0, null, rtol=1e-4, atol=1e-4)
    w3 = model.generate(seeds, cond, spec, GuidanceSpec(scale=3.0)).x
    assert (w3 - a).abs().max() > 1e-4


@pytest.mark.parametrize("pool_size", [None, 32])
def test_ot_coupling_callback_works_unchanged_on_captioned_batches(tmp_path, pool_size: int | None) -> None:
    from conftest import quiet_trainer

    from lightning_dpmot.callbacks import OTCouplingCallback
    from lightning_dpmot.data import ShapesCaptionsDataModule

    class Seen(OTCouplingCallback):
        """Records what reached the module: the coupled noise and the prompts beside their images."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.batch = {k: (v.clone() if isinstance(v, torch.Tensor) else list(v)) for k, v in batch.items()}

    model = tiny_text2img()
    dm = ShapesCaptionsDataModule(resolution=16, num_train=64, num_val=8, num_heldout=8, batch_size=16)
    seen = Seen(pool_size=pool_size)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[seen]).fit(model, dm)
    batch = seen.batch
    assert batch["noise"].shape == batch["x"].shape and len(batch["caption_en"]) == 16
    train = dm.dataset("train")
    assert batch["caption_en"] == [train[int(i)]["caption_en"] for i in batch["index"]]  # prompts follow their images
    assert model.global_step == 2


def test_sample_grid_writes_each_prompt_under_its_image(tmp_path) -> None:
    from conftest import quiet_trainer
    from PIL import Image

    from lightning_dpmot.callbacks import SampleGrid
    from lightning_dpmot.data import ShapesCaptionsDataModule

    model = tiny_text2img(
        sampler=SamplerSpec("euler", num_steps=2),
    )
    dm = ShapesCaptionsDataModule(resolution=16, num_train=64, num_val=8, num_heldout=8, batch_size=16)
    grid = SampleGrid(num_samples=6)
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, callbacks=[grid]).fit(model, dm)
    image = Image.open(grid.last_path)
    assert grid.last_path.name == "final.png" and image.width > 6 * 100  # readable tiles, not 16 px thumbnails
    assert image.height > image.width / 6  # room for the captions under the tiles
