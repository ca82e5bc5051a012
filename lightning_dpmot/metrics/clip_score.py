"""CLIP score of generated images against their prompts, by a *scorer* matching model.

Definition (torchmetrics' ``CLIPScore``, after Hessel et al. 2021 but with weight 100 instead of 2.5)::

    CLIPScore(I, T) = max(100 * cos(E_I(I), E_T(T)), 0)

per image-prompt pair, averaged over pairs; ``E_I``/``E_T`` are the scorer's image and text encoders. (torchmetrics
1.9's implementation clamps the *mean* of ``100 cos`` at 0 instead of each pair; the two agree whenever every
cosine is >= 0, as for matching pairs under a trained CLIP, and differ for random models.) Score with a
*different* model than any guide of cross-modal guidance: guidance optimises the guide's similarity directly and
inflates its own score (upainting notes §4).

- :func:`clip_score` is the formula on embeddings (B, M) -> (B,).
- :class:`ClipScorer` scores images in [-1, 1] against prompts with any matching model offering
  ``encode_image``/``encode_text`` (:class:`~lightning_dpmot.nets.matching.MatchingModel`), batched, without grad.
- :func:`torchmetrics_clip_score` builds torchmetrics' ``CLIPScore`` on a local Hugging Face CLIP directory through
  its "callable returning (model, processor)" option (its model names must contain "openai"/"jinaai"/"zer0int" and
  would be downloaded). Under transformers 5, ``CLIPModel.get_image_features``/``get_text_features`` return an
  output object whose ``pooler_output`` is the projected embedding, which torchmetrics 1.9 cannot normalise; the
  model is therefore wrapped so that both methods return that tensor (:class:`TensorFeaturesCLIP`). Images for it
  are uint8-range tensors (B, 3, H, W) in [0, 255], as torchmetrics expects.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ImageTextEncoder(Protocol):
    """What scoring needs from a matching model."""

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...


def clip_score(image_embeds: Tensor, text_embeds: Tensor) -> Tensor:
    """``max(100 * cos(u_i, v_i), 0)`` per pair: embeddings (B, M) and (B, M) (any norm) -> (B,) float32."""
    if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"clip_score needs image and text embeddings of the same shape (B, M), got {tuple(image_embeds.shape)} "
            f"and {tuple(text_embeds.shape)}"
        )
    cos = F.cosine_similarity(image_embeds.float(), text_embeds.float().to(image_embeds.device), dim=-1)
    return (100 * cos).clamp_min(0)


class ClipScorer:
    """CLIP score of images against prompts with a frozen matching model (the *scorer*).

    Args:
        model: the scorer (``encode_image(images in [-1, 1]) -> (B, M)``, ``encode_text(list of B str) -> (B, M)``).
        batch_size: images encoded per forward pass.
        name: a label for tables (e.g. the scorer's source path).
    """

    def __init__(self, model: ImageTextEncoder, batch_size: int = 64, name: str = "") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size, self.name = model, batch_size, name

    @torch.no_grad()
    def __call__(self, images: Tensor, texts: Sequence[str]) -> Tensor:
        """Images (B, C, H, W) in [-1, 1] and B prompts -> (B,) float32 scores on the CPU."""
        if isinstance(texts, str) or len(texts) != len(images):
            raise ValueError(f"ClipScorer: {len(images)} images need {len(images)} prompts, got {len(texts)}")
        device = _device_of(self.model, images.device)
        scores = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size].to(device)
            prompts = list(texts[start : start + self.batch_size])
            scores.append(clip_score(self.model.encode_image(chunk), self.model.encode_text(prompts)).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def _device_of(model: Any, default: torch.device) -> torch.device:
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    first = next(params, None)
    return first.device if first is not None else default


class TensorFeaturesCLIP(nn.Module):
    """A Hugging Face ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return the projected
    embedding tensor (B, M) under transformers 4 and 5 alike (what torchmetrics' ``CLIPScore`` calls)."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(output: Any) -> Tensor:
        if isinstance(output, Tensor):
            return output
        pooled = getattr(output, "pooler_output", None)
        if not isinstance(pooled, Tensor):
            raise TypeError(f"unexpected CLIP features output {type(output).__name__}")
        return pooled

    def get_image_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._tensor(self.clip.get_text_features(*args, **kwargs))


def clip_model_and_processor(path: str | Path) -> tuple[TensorFeaturesCLIP, Any]:
    """``(model, processor)`` of a local Hugging Face CLIP directory (``save_pretrained`` of a ``CLIPModel``, its
    tokenizer and ``CLIPImageProcessor``), loaded with ``local_files_only=True``; nothing is downloaded."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} is not a local Hugging Face CLIP directory (no config.json)")
    model = CLIPModel.from_pretrained(root, local_files_only=True).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(root, local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(root, local_files_only=True),
    )
    return TensorFeaturesCLIP(model), processor


def torchmetrics_clip_score(path: str | Path) -> Any:
    """torchmetrics' ``CLIPScore`` on the local CLIP directory ``path`` (see the module docstring)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    root = Path(path).expanduser()
    if not (root / "config.json").is_file():  # fail now, naming the path, rather than inside torchmetrics
        raise FileNotFoundError(f"{root} is not a local Hugging Face CLIP directory (no config.json)")
    return CLIPScore(model_name_or_path=functools.partial(clip_model_and_processor, path))


__all__ = ["ClipScorer", "TensorFeaturesCLIP", "clip_model_and_processor", "clip_score", "torchmetrics_clip_score"]
