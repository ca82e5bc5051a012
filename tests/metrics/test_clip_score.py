"""CLIP score: the formula against a hand computation, the batched scorer, and torchmetrics' CLIPScore on a tiny
local CLIP directory (transformers 5 outputs unwrapped)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_dpmot.metrics.clip_score import ClipScorer, clip_model_and_processor, clip_score, torchmetrics_clip_score


def test_formula_by_hand() -> None:
    # cos = 0.5 (60 degrees) -> 50; cos = -0.8 -> clipped to 0; scale of either vector does not matter
    u = torch.tensor([[1.0, 0.0], [3.0, 4.0], [2.0, 0.0]])
    v = torch.tensor([[0.5, math.sqrt(3) / 2], [-3.0, -4.0 * 0.5], [0.0, 7.0]])
    cos1 = 0.5
    cos2 = (3 * -3 + 4 * -2) / (5 * math.hypot(3, 2))
    assert cos2 < 0
    expected = torch.tensor([100 * cos1, 0.0, 0.0])
    torch.testing.assert_close(clip_score(u, v), expected)
    torch.testing.assert_close(clip_score(7 * u, v / 3), expected)
    with pytest.raises(ValueError, match="same shape"):
        clip_score(u, v[:2])


class Fixed:
    """A matching model with fixed embeddings: image i -> e_i, text -> a table."""

    def __init__(self) -> None:
        self.calls = 0

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.normalize(images.flatten(1)[:, :2], dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        table = {"x": [1.0, 0.0], "y": [0.0, 1.0], "d": [1.0, 1.0]}
        return F.normalize(torch.tensor([table[t] for t in texts]), dim=-1)


def test_scorer_batches_and_matches_the_formula() -> None:
    images = torch.zeros(5, 1, 1, 2)
    images[:, 0, 0] = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    model = Fixed()
    scores = ClipScorer(model, batch_size=2)(images, ["x", "y", "y", "d", "x"])
    torch.testing.assert_close(scores, torch.tensor([100.0, 0.0, 100.0, 100 / math.sqrt(2), 0.0]))
    assert model.calls == 3
    with pytest.raises(ValueError, match="5 images need 5 prompts"):
        ClipScorer(model)(images, ["x"])


def tiny_clip_dir(path: Path) -> Path:
    """A tiny random CLIP with a character-level CLIP BPE tokenizer (no merges) built in memory, saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config={
            **text,
            "vocab_size": len(vocab),
            "max_position_embeddings": 64,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**text, "image_size": 16, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_torchmetrics_clip_score_on_a_local_tiny_clip(tmp_path: Path) -> None:
    path = tiny_clip_dir(tmp_path / "clip")
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    texts = ["a red circle", "a blue square", "a green cross"]
    metric = torchmetrics_clip_score(path)
    metric.update(images, texts)
    value = float(metric.compute())

    model, processor = clip_model_and_processor(path)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        u, v = model.get_image_features(pixels), model.get_text_features(**tokens)
    cos100 = 100 * F.cosine_similarity(u, v, dim=-1)
    # torchmetrics' implementation clamps the *mean* of 100 cos at 0; clip_score clamps each pair (the formula in
    # both docstrings): equal when every cosine is >= 0, as for matching pairs under a trained CLIP
    assert value == pytest.approx(max(float(cos100.mean()), 0.0), rel=1e-5, abs=1e-6)
    per_pair = clip_score(u, v)
    assert float(per_pair.mean()) == pytest.approx(float(cos100.clamp_min(0).mean()), rel=1e-6)
    assert (cos100 > 0).any() and (cos100 < 0).any()  # both branches of the clamp are exercised
    for i in range(3):  # one pair at a time the two definitions coincide
        metric.reset()
        metric.update(images[i : i + 1], texts[i : i + 1])
        assert float(metric.compute()) == pytest.approx(float(per_pair[i]), rel=1e-5, abs=1e-6)
    with pytest.raises(FileNotFoundError, match="not a local Hugging Face CLIP directory"):
        torchmetrics_clip_score(tmp_path / "nope")
