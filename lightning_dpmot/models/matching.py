"""Contrastive (CLIP) training of a :class:`~lightning_dpmot.nets.matching.MatchingModel` on captioned images.

``dpmot fit --config configs/matching/shapes_guide.yaml`` trains :class:`ContrastiveMatchingModule` on any DataModule
whose batches hold ``x`` (B, C, H, W) in [-1, 1] and caption lists under ``text_keys`` (the embedded
:class:`~lightning_dpmot.data.ShapesCaptionsDataModule`: ``caption_en`` and ``caption_zh``). The trained model is
read back, frozen, by :func:`~lightning_dpmot.nets.matching.load_matching_model` (guidance, scoring).

**Loss** (:func:`contrastive_loss`): CLIP's symmetric InfoNCE, the mean of the image->text and text->image
cross-entropies over the batch, with logits ``s * <image_i, text_j>`` and the learnable temperature ``s =
exp(logit_scale)`` (clamped at 100), averaged over the text keys: the English and the Chinese caption of an image
are both its positives (one shared embedding space, bilingual).

**Duplicate-aware targets** (:func:`duplicate_targets`): captions repeat within a batch (the shapes data has only
~64 distinct one-object captions), and plain InfoNCE would push an image away from the identical caption of another
image. Every pair (i, j) whose caption strings are identical is a positive; the target distribution of row i is
uniform over its positives (one-hot when the caption is unique, which is CLIP's loss). Retrieval accuracy counts a
retrieved item with the identical caption as correct.

Under DDP each rank contrasts its own batch (no cross-rank gathering of negatives).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.models.base import plain_data, standalone_factory
from lightning_dpmot.nets.matching import CLIP_INIT_LOGIT_SCALE, MatchingModel
from lightning_dpmot.utils.distributed import global_batch_size
from lightning_dpmot.utils.precision import autocast_off

DEFAULT_TEXT_KEYS = ("caption_en", "caption_zh")


def adamw(params: Iterator[Any]) -> torch.optim.Optimizer:
    """CLIP's optimizer settings at a small-model learning rate: AdamW(lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
    weight_decay=0.1)."""
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)


def duplicate_targets(texts: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """(B, B) float targets: row i is uniform over the j whose caption equals caption i (itself included)."""
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(t, len(index)) for t in texts], device=device)
    same = (ids[:, None] == ids[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


def at_least_fp32(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it already is (bf16 / fp16 embeddings are upcast)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, scale: Tensor | float, texts: Sequence[str]) -> Tensor:
    """Symmetric InfoNCE with duplicate-aware targets (module docstring): embeddings (B, M) (unit norm), ``scale``
    the exp-ed temperature, ``texts`` the B caption strings (equal strings are positives of each other)."""
    if image_embeds.shape != text_embeds.shape or len(texts) != len(image_embeds):
        raise ValueError(
            f"image {tuple(image_embeds.shape)} and text {tuple(text_embeds.shape)} embeddings and {len(texts)} "
            "captions must agree"
        )
    with autocast_off(image_embeds.device):  # logits, softmax and the reduction in float32, also under bf16 autocast
        scale = at_least_fp32(scale) if isinstance(scale, Tensor) else scale
        logits = scale * at_least_fp32(image_embeds) @ at_least_fp32(text_embeds).T  # (images, texts)
        targets = duplicate_targets(texts, logits.device)  # symmetric, rows = columns
        i2t = -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()
        t2i = -(targets.T * logits.T.log_softmax(dim=1)).sum(dim=1).mean()
        return (i2t + t2i) / 2


def retrieval_hits(image_embeds: Tensor, text_embeds: Tensor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Top-1 hits (N,) bool, image->text and text->image, where item i's caption is ``texts[i]``; a retrieved item
    whose caption equals the query's counts as correct."""
    with autocast_off(image_embeds.device):  # bf16 similarities would tie and mis-rank near neighbours
        sims = at_least_fp32(image_embeds) @ at_least_fp32(text_embeds).T
    same = duplicate_targets(texts, sims.device) > 0
    rows = torch.arange(len(texts), device=sims.device)
    i2t = same[rows, sims.argmax(dim=1)]
    t2i = same[sims.argmax(dim=0), rows]
    return i2t, t2i


@torch.no_grad()
def retrieval_accuracy(
    model: MatchingModel, images: Tensor, texts: Sequence[str], batch_size: int = 256
) -> dict[str, float]:
    """Top-1 retrieval accuracy of ``model`` over N image-caption pairs (image i's caption is ``texts[i]``).

    Returns:
        ``{"i2t": image->text accuracy among the N captions, "t2i": text->image accuracy among the N images,
        "chance_i2t": the expected i2t accuracy of a random ranking, "num_distinct": distinct captions}``;
        duplicates count as correct (a retrieved caption identical to the true one, an image whose caption is the
        query).
    """
    texts = list(texts)
    if len(images) != len(texts) or not texts:
        raise ValueError(f"{len(images)} images and {len(texts)} texts: give one caption per image (N >= 1)")
    device = model.mean.device
    img = torch.cat(
        [model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(texts), batch_size)]
    )
    txt = torch.cat([model.encode_text(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)])
    i2t, t2i = retrieval_hits(img, txt, texts)
    same = duplicate_targets(texts) > 0
    return {
        "i2t": i2t.float().mean().item(),
        "t2i": t2i.float().mean().item(),
        "chance_i2t": same.float().mean(dim=1).mean().item(),
        "num_distinct": len(set(texts)),
    }


class ContrastiveMatchingModule(L.LightningModule):
    """CLIP training of a small :class:`MatchingModel` from scratch (see the module docstring).

    Args:
        image_size: side of the vision tower's input (default: the data's, ``data_shape[-1]``).
        patch_size, width, layers, heads, embed_dim, text_width, text_layers, max_length: the architecture, as
            :meth:`MatchingModel.small`.
        seed: seed of the initial weights (independent of ``seed_everything``).
        text_keys: batch keys of the caption lists; the loss is averaged over them (all are positives of the image).
        optimizer: optimizer factory (``class_path`` of a ``torch.optim`` class with ``init_args``); gains, biases
            and the temperature get no weight decay.
        lr_warmup_images: linear learning-rate warm-up over this many training images; 0 disables it.
        cosine_decay: after the warm-up, decay the learning rate to 0 on a cosine over the run's optimizer steps
            (``trainer.max_steps`` or the epochs).
        init_logit_scale: initial ``logit_scale`` (CLIP: log(1 / 0.07)); the exp-ed scale is clamped at 100.
        data_shape, num_classes: linked from the DataModule by the CLI (``num_classes`` is unused).
    """

    def __init__(
        self,
        image_size: int | None = None,
        patch_size: int = 4,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        embed_dim: int = 32,
        text_width: int = 64,
        text_layers: int = 2,
        max_length: int = 96,
        seed: int = 0,
        text_keys: Sequence[str] = DEFAULT_TEXT_KEYS,
        optimizer: OptimizerCallable = adamw,
        lr_warmup_images: int = 0,
        cosine_decay: bool = False,
        init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
        data_shape: Sequence[int] = (3, 16, 16),
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(text_keys, str) or not text_keys:
            raise ValueError(f"text_keys must be a non-empty list of batch keys, got {text_keys!r}")
        if len(data_shape) != 3 or data_shape[0] not in (1, 3):
            raise ValueError(f"data_shape must be (1 or 3, H, W) images, got {tuple(data_shape)}")
        if lr_warmup_images < 0:
            raise ValueError(f"lr_warmup_images must be >= 0, got {lr_warmup_images}")
        self.save_hyperparameters()
        self.text_keys = [str(k) for k in text_keys]
        self.optimizer_factory = standalone_factory(optimizer)
        self.lr_warmup_images = lr_warmup_images
        self.cosine_decay = cosine_decay
        self.model = MatchingModel.small(
            image_size=int(image_size or data_shape[-1]),
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            embed_dim=embed_dim,
            text_width=text_width,
            text_layers=text_layers,
            max_length=max_length,
            seed=seed,
            init_logit_scale=init_logit_scale,
        )
        self.model.train()

    # ---------------------------------------------------------------------------------------------------- steps
    def batch_texts(self, batch: dict[str, Any], key: str) -> list[str]:
        texts = batch.get(key)
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise KeyError(
                f"batch has no list of captions under {key!r} (text_keys={self.text_keys}; batch keys: {sorted(batch)})"
            )
        return list(texts)

    def losses(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor, list[str]]]]:
        """Mean loss over the text keys, and per key ``(image embeds, text embeds, texts)``."""
        image = self.model.encode_image(batch["x"])
        scale = self.model.logit_scale
        losses, embeds = [], {}
        for key in self.text_keys:
            texts = self.batch_texts(batch, key)
            text = self.model.encode_text(texts)
            losses.append(contrastive_loss(image, text, scale, texts))
            embeds[key] = (image, text, texts)
        return torch.stack(losses).mean(), embeds

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _ = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/logit_scale", self.model.logit_scale.detach())
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        loss, embeds = self.losses(batch)
        n = len(batch["x"])
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        for key, (image, text, texts) in embeds.items():
            i2t, t2i = retrieval_hits(image, text, texts)
            self.log(f"{stage}/retrieval_i2t_{key}", i2t.float().mean(), sync_dist=True, batch_size=n)
            self.log(f"{stage}/retrieval_t2i_{key}", t2i.float().mean(), sync_dist=True, batch_size=n)

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ----------------------------------------------------------------------------------------------- optimizer
    def global_batch_size(self) -> int:
        return global_batch_size(self.trainer)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.clip.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2]},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # gains, biases, temperature
        ]
        optimizer = self.optimizer_factory(groups)
        warmup = math.ceil(self.lr_warmup_images / self.global_batch_size()) if self.lr_warmup_images else 0
        total = int(self.trainer.estimated_stepping_batches) if self.cosine_decay else 0
        if self.cosine_decay and not 0 < total < 10**12:
            raise ValueError("cosine_decay needs a finite run length (trainer.max_steps or max_epochs)")

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if self.cosine_decay:
                progress = min((step - warmup) / max(total - warmup, 1), 1.0)
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # an optimizer factory object (not a class_path) would need pickle: keep its repr (weights_only loads)
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])
