"""MatchingModel: shapes and norms, image resizing, gradients to images, EOS pooling, save/reload, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lightning_dpmot.nets.matching import CLIP_MEAN, MatchingModel, load_matching_model  # noqa: E402

TINY = {"width": 32, "layers": 1, "heads": 2, "embed_dim": 16, "text_width": 32, "text_layers": 1}
TEXTS = [
    "a large red circle",
    "一个小的蓝色正方形在一个大的白色三角形的左边",
    "a small cyan cross above a large red square",
]


@pytest.fixture(scope="module")
def model() -> MatchingModel:
    return MatchingModel.small(**TINY, seed=0).eval()


def images(n: int = 3, side: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=g) * 2 - 1


def test_attributes_and_embeddings(model: MatchingModel) -> None:
    assert model.image_size == 16 and model.embed_dim == 16
    assert model.mean.shape == (3,) and model.std.shape == (3,)
    assert torch.allclose(model.mean, torch.tensor(CLIP_MEAN))
    assert "mean" in dict(model.named_buffers()) and "std" in dict(model.named_buffers())
    assert torch.isclose(model.logit_scale, torch.tensor(1 / 0.07), rtol=1e-5)
    img, txt = model(images(), TEXTS)
    for e in (img, txt):
        assert e.shape == (3, 16) and e.dtype == torch.float32
        assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_small_is_seeded_and_leaves_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b, c = (MatchingModel.small(**TINY, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_logit_scale_is_clamped_at_100() -> None:
    m = MatchingModel.small(**TINY, seed=0, init_logit_scale=10.0)
    assert m.logit_scale.item() == pytest.approx(100.0)


def test_encode_image_resizes_to_image_size(model: MatchingModel) -> None:
    big = images(side=32)
    small = F.interpolate(big, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(model.encode_image(big), model.encode_image(small), atol=1e-5)
    tiny = images(side=8)
    up = F.interpolate(tiny, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(model.encode_image(tiny), model.encode_image(up), atol=1e-5)
    grey = images(channels=1)
    assert torch.allclose(model.encode_image(grey), model.encode_image(grey.repeat(1, 3, 1, 1)), atol=1e-6)
    with pytest.raises(ValueError, match="images must be"):
        model.encode_image(torch.zeros(2, 4, 16, 16))


def test_preprocess_maps_minus_one_one_to_normalised_unit_range(model: MatchingModel) -> None:
    x = torch.full((1, 3, 16, 16), 1.0)
    expected = (1.0 - model.mean) / model.std
    assert torch.allclose(model.preprocess(x)[0, :, 0, 0], expected)


def test_gradients_reach_input_images(model: MatchingModel) -> None:
    frozen = frozen_copy(model)
    x = images(side=32).requires_grad_(True)
    target = frozen.encode_text(TEXTS)
    (frozen.encode_image(x) * target).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in frozen.parameters())


def frozen_copy(model: MatchingModel) -> MatchingModel:
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def test_eos_pooling_is_invariant_to_padding(model: MatchingModel) -> None:
    tok = model.tokenizer
    assert model.clip.config.text_config.eos_token_id == tok.eos_token_id == 1 != 2  # 2 = legacy argmax pooling
    assert model.clip.config.text_config.pad_token_id == tok.pad_token_id
    enc = model.tokenize(TEXTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (ids == tok.eos_token_id).sum(dim=1).tolist() == [1, 1, 1]  # exactly one EOS per caption
    base = model.encode_tokens(ids, mask)
    padded_ids = F.pad(ids, (0, 7), value=tok.pad_token_id)
    padded_mask = F.pad(mask, (0, 7), value=0)
    assert torch.allclose(model.encode_tokens(padded_ids, padded_mask), base, atol=1e-5)
    # the pooled state is the EOS position's: bytes after EOS do not matter, bytes before it do
    eos = (ids == tok.eos_token_id).int().argmax(dim=1)
    after = padded_ids.clone()
    after[:, -1] = 100
    assert torch.allclose(model.encode_tokens(after, padded_mask), base, atol=1e-5)
    before = ids.clone()
    before[torch.arange(3), eos - 1] = 120
    assert not torch.allclose(model.encode_tokens(before, mask), base, atol=1e-3)
    # a caption encoded alone (no padding) equals the same caption in a padded batch
    assert torch.allclose(model.encode_text([TEXTS[0]]), base[:1], atol=1e-5)


def test_long_texts_are_truncated_with_their_eos(model: MatchingModel) -> None:
    enc = model.tokenize(["圆形" * 100])
    assert enc["input_ids"].shape == (1, model.max_length) == (1, 96)
    assert enc["input_ids"][0, -1].item() == model.tokenizer.eos_token_id
    assert model.encode_text(["圆形" * 100]).shape == (1, 16)


@pytest.mark.parametrize("bad", ["a caption", [], ("ok", 3), None])
def test_encode_text_rejects_bad_input(model: MatchingModel, bad: object) -> None:
    with pytest.raises(ValueError, match="texts"):
        model.encode_text(bad)  # type: ignore[arg-type]


def test_from_pretrained_round_trip(model: MatchingModel, tmp_path: Path) -> None:
    from transformers import ByT5Tokenizer

    model.clip.save_pretrained(tmp_path / "clip")  # a bare Hugging Face save: CLIP's default mean/std
    ByT5Tokenizer().save_pretrained(tmp_path / "clip")
    loaded = MatchingModel.from_pretrained(str(tmp_path / "clip"))
    x = images()
    assert type(loaded.clip).__name__ == "CLIPModel"
    assert loaded.image_size == 16 and loaded.embed_dim == 16 and loaded.max_length == 96
    assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
    assert torch.allclose(loaded.encode_text(TEXTS), model.encode_text(TEXTS), atol=1e-6)


def test_save_pretrained_keeps_the_image_normalisation(tmp_path: Path) -> None:
    from transformers import ByT5Tokenizer, CLIPModel

    m = MatchingModel.small(**TINY, seed=2)
    custom = MatchingModel(m.clip, ByT5Tokenizer(), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_length=96)
    custom.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())["image_mean"] == [0.5, 0.5, 0.5]
    loaded = load_matching_model(tmp_path / "m")
    assert isinstance(loaded.clip, CLIPModel) and not loaded.training
    assert torch.equal(loaded.mean, torch.full((3,), 0.5)) and loaded.image_size == 16
    x = images()
    assert torch.allclose(loaded.encode_image(x), custom.encode_image(x), atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_from_pretrained_picks_chinese_clip_from_the_config(tmp_path: Path) -> None:
    from transformers import BertTokenizer, ChineseCLIPConfig, ChineseCLIPModel

    root = tmp_path / "cn"
    root.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"一个大的红色圆形"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = ChineseCLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
        },
        vision_config={
            "image_size": 16,
            "patch_size": 8,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=8,
    )
    ChineseCLIPModel(config).save_pretrained(root)
    BertTokenizer(str(root / "vocab.txt")).save_pretrained(root)
    loaded = MatchingModel.from_pretrained(root)
    assert isinstance(loaded.clip, ChineseCLIPModel)
    assert loaded.encode_text(["一个大的红色圆形"]).shape == (1, 8)
    assert loaded.encode_image(images(1)).shape == (1, 8)


def test_from_pretrained_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        MatchingModel.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_matching_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MatchingModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a CLIP-like"):
        MatchingModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a CLIP-like"):
        load_matching_model(str(tmp_path))
