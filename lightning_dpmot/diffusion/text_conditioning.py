"""Text conditioning: prompts -> ``{"tokens": (B, L, C), "mask": (B, L), "pooled": (B, C)}`` by a frozen encoder.

:class:`TextConditioner` is the :class:`~lightning_dpmot.diffusion.conditioning.Conditioner` of text-to-image
models. Batches carry raw prompts (a list of B strings under ``text_key``, e.g. ``"caption_en"``); the conditioner
encodes them with a frozen text encoder (any object with ``encode(texts) -> {"tokens", "mask", "pooled"}`` and a
``dim``, e.g. :class:`~lightning_dpmot.nets.text_encoder.TextEncoder`) and from then on only the tensor mapping
travels through denoisers, samplers, losses and guidance. The null condition is an empty mask (and zero states):
the network replaces it by its learned null token and pooled vector (UPainting / Imagen: a learned null).

Bilingual prompts (UPainting): the language model reads ``text_key`` (the English line for an English-only LM);
other entries (e.g. the aligned Chinese line for a bilingual matching model) pass by untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond, Conditioner

TEXT_KEYS = ("tokens", "mask", "pooled")


class TextEncoderLike(Protocol):
    """What a text conditioner needs from an encoder."""

    dim: int

    def encode(self, texts: Sequence[str]) -> dict[str, Tensor]: ...


class TextConditioner(Conditioner):
    """Prompts under ``text_key`` encoded by a frozen encoder; null = empty mask; CFG dropout per prompt.

    Args:
        encoder: the frozen text encoder (not a registered submodule of this conditioner's owner's optimizer).
        text_key: batch entry holding the prompts the encoder reads (a list of B strings).
        dropout: condition dropout probability (UPainting/Imagen: 0.1).
    """

    keys = TEXT_KEYS

    def __init__(self, encoder: TextEncoderLike, text_key: str = "caption_en", dropout: float = 0.1) -> None:
        super().__init__(dropout)
        self.encoder = encoder
        self.text_key = text_key

    def net_kwargs(self) -> dict[str, Any]:
        return {"context_dim": int(self.encoder.dim)}

    def encode(self, texts: Sequence[str], device: torch.device | str | None = None) -> Cond:
        """``{"tokens", "mask", "pooled"}`` of B prompts, float32 states, bool mask, on ``device``."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{self.text_key!r} must be a list of prompt strings, got {type(texts).__name__}")
        out = self.encoder.encode(list(texts))
        cond = {"tokens": out["tokens"].float(), "mask": out["mask"].bool(), "pooled": out["pooled"].float()}
        return {k: v.to(device) for k, v in cond.items()} if device is not None else cond

    def from_batch(self, batch: Mapping[str, Any]) -> Cond:
        """Encoded states of ``batch[text_key]`` (or the states themselves when the batch already holds them)."""
        if all(k in batch for k in TEXT_KEYS):
            return {k: batch[k] for k in TEXT_KEYS}
        if self.text_key not in batch:
            raise KeyError(f"TextConditioner needs the batch entry {self.text_key!r} (a list of prompts)")
        device = batch["x"].device if isinstance(batch.get("x"), Tensor) else None
        return self.encode(batch[self.text_key], device)

    def prepare(self, raw: Mapping[str, Any] | None) -> Cond | None:
        if not raw:
            return None
        if all(k in raw for k in TEXT_KEYS) or self.text_key in raw:
            return self.from_batch(raw)
        return None

    def null(self, cond: Cond) -> Cond:
        return {
            "tokens": torch.zeros_like(cond["tokens"]),
            "mask": torch.zeros_like(cond["mask"]),
            "pooled": torch.zeros_like(cond["pooled"]),
        }


__all__ = ["TEXT_KEYS", "TextConditioner", "TextEncoderLike"]
