"""A CLIP-style image-text matching model: images and captions to L2-normalised embeddings of one space.

:class:`MatchingModel` wraps a Hugging Face ``CLIPModel`` (or ``ChineseCLIPModel``) with its tokenizer and image
normalisation, and speaks the project's image convention::

    model = MatchingModel.small(seed=0)                     # from scratch (ByT5 byte tokenizer: reads Chinese)
    model = MatchingModel.from_pretrained("/path/to/clip")  # a local Hugging Face directory, nothing downloaded
    model = load_matching_model("runs/.../last.ckpt")       # a trained ContrastiveMatchingModule, or a directory
    img = model.encode_image(x)        # x (B, C, H, W) in [-1, 1] -> (B, M) float32, unit norm, differentiable
    txt = model.encode_text(captions)  # list of B strings        -> (B, M) float32, unit norm
    logits = model.logit_scale * img @ txt.T

**Text pooling.** CLIP's text tower pools the hidden state at the first ``eos_token_id`` of each sequence (unless the
config's ``eos_token_id`` is 2, the legacy rule "argmax of the ids", which is wrong for any tokenizer but CLIP's own
BPE). :meth:`MatchingModel.small` therefore sets the config's ``eos_token_id``/``pad_token_id`` to the ByT5
tokenizer's (1 and 0; ByT5 has no BOS token, so ``bos_token_id`` is left unset): the pooled position is the EOS byte
the tokenizer appends, and with the causal text mask the embedding does not depend on trailing padding (tested).

**Images.** Inputs in [-1, 1] with 3 channels (1 channel is repeated to 3) are resized to ``image_size`` x
``image_size`` when needed (bilinear, antialiased when shrinking; non-square inputs are stretched, not cropped),
mapped to [0, 1] and normalised by the model's ``mean``/``std`` (OpenAI CLIP's by default, or the directory's
``preprocessor_config.json``).

Requires ``transformers`` (the ``text`` extra). Loading is always ``local_files_only=True``; the model class is
picked from the config's ``model_type`` (``clip`` or ``chinese_clip``), never with ``trust_remote_code``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: OpenAI CLIP's image normalisation (``transformers.image_utils.OPENAI_CLIP_MEAN`` / ``_STD``).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: CLIP's initial temperature: logit_scale = log(1 / 0.07); the exp-ed scale is clamped at this maximum.
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = 100.0
_MODEL_TYPES = ("clip", "chinese_clip")


def _model_class(model_type: str) -> type:
    if model_type == "clip":
        from transformers import CLIPModel

        return CLIPModel
    if model_type == "chinese_clip":
        from transformers import ChineseCLIPModel

        return ChineseCLIPModel
    raise ValueError(f"model_type {model_type!r} is not a CLIP-like model (expected one of {_MODEL_TYPES})")


def _features(output: Any) -> Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` is projected (5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"unexpected features output {type(output).__name__}")


class MatchingModel(nn.Module):
    """Image and text towers of a CLIP model, with its tokenizer and image normalisation (see the module docstring).

    Args:
        clip: a ``CLIPModel`` or ``ChineseCLIPModel``.
        tokenizer: its tokenizer (a Hugging Face tokenizer called as ``tokenizer(texts, padding=..., ...)``).
        image_size: the side the vision tower takes (default: ``vision_config.image_size``).
        mean, std: per-channel image normalisation in [0, 1] units (default: OpenAI CLIP's).
        max_length: texts are truncated to this many tokens, EOS included (default: the text tower's
            ``max_position_embeddings``, or the tokenizer's ``model_max_length`` if smaller).

    Attributes:
        image_size: int; embed_dim: int (the projection dimension M); mean, std: (3,) buffers.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        clip: nn.Module,
        tokenizer: Any,
        *,
        image_size: int | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        max_length: int | None = None,
    ) -> None:
        super().__init__()
        config = clip.config
        if getattr(config, "model_type", None) not in _MODEL_TYPES:
            raise ValueError(f"not a CLIP-like model: model_type {getattr(config, 'model_type', None)!r}")
        self.clip = clip
        self.tokenizer = tokenizer
        self.image_size = int(image_size or config.vision_config.image_size)
        self.embed_dim = int(config.projection_dim)
        positions = int(config.text_config.max_position_embeddings)
        tok_max = getattr(tokenizer, "model_max_length", None)
        if max_length is None:
            max_length = min(positions, int(tok_max)) if isinstance(tok_max, int) and tok_max < 10**6 else positions
        if not 1 <= max_length <= positions:
            raise ValueError(f"max_length must be in [1, {positions}] (the text tower's positions), got {max_length}")
        self.max_length = int(max_length)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values (std > 0), got {mean} and {std}")
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]), persistent=True)
        self.register_buffer("std", torch.tensor([float(v) for v in std]), persistent=True)

    # ------------------------------------------------------------------------------------------------ builders
    @classmethod
    def small(
        cls,
        image_size: int = 16,
        patch_size: int = 4,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        embed_dim: int = 32,
        text_width: int = 64,
        text_layers: int = 2,
        max_length: int = 96,
        seed: int | None = None,
        init_logit_scale: float = CLIP_INIT_LOGIT_SCALE,
    ) -> MatchingModel:
        """A small CLIP built from scratch (random weights; ``seed`` makes them reproducible without touching the
        global RNG), with the ``ByT5Tokenizer`` (UTF-8 bytes: English and Chinese alike, no vocabulary file).
        ``heads`` is used by both towers; MLP widths are 4x the tower widths."""
        from transformers import ByT5Tokenizer, CLIPConfig, CLIPModel

        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads or text_width % heads:
            raise ValueError(f"width {width} and text_width {text_width} must be multiples of heads {heads}")
        tokenizer = ByT5Tokenizer()
        config = CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": text_width,
                "intermediate_size": 4 * text_width,
                "num_hidden_layers": text_layers,
                "num_attention_heads": heads,
                "max_position_embeddings": max_length,
                # EOS pooling: the first position holding eos_token_id (see the module docstring)
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id,  # None: ByT5 has no BOS
            },
            vision_config={
                "image_size": image_size,
                "patch_size": patch_size,
                "hidden_size": width,
                "intermediate_size": 4 * width,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_channels": 3,
            },
            projection_dim=embed_dim,
            logit_scale_init_value=init_logit_scale,
        )
        if config.text_config.eos_token_id == 2:  # would select the legacy argmax pooling
            raise RuntimeError("the tokenizer's EOS id is 2, which CLIP's text tower pools as the legacy argmax")
        devices: list[Any] = []
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            clip = CLIPModel(config)
        tokenizer.model_max_length = max_length
        return cls(clip.eval(), tokenizer, image_size=image_size, max_length=max_length)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MatchingModel:
        """A CLIP (or Chinese-CLIP) model saved with ``save_pretrained`` in the local directory ``path``, with the
        tokenizer saved beside it (``AutoTokenizer``) and the image size/mean/std of its ``preprocessor_config.json``
        (CLIP's defaults without one). Nothing is downloaded.

        Raises:
            FileNotFoundError: ``path`` is not an existing directory, or it has no ``config.json``.
            ValueError: the config's ``model_type`` is not ``clip``/``chinese_clip``, or no tokenizer loads.
        """
        from transformers import AutoTokenizer

        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"matching model directory not found: {root} (a local Hugging Face directory)")
        config_file = root / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{root} has no config.json: not a Hugging Face model directory")
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config_file} is not a JSON config: {err}") from err
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"{root} holds a {model_type!r} model, not a CLIP-like one (model_type must be one of {_MODEL_TYPES})"
            )
        clip = _model_class(model_type).from_pretrained(root, local_files_only=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{root}: no tokenizer could be loaded from the directory ({err})") from err
        kwargs: dict[str, Any] = {}
        processor_file = root / "preprocessor_config.json"
        if processor_file.is_file():
            proc = json.loads(processor_file.read_text(encoding="utf-8"))
            if proc.get("image_mean") is not None:
                kwargs["mean"] = proc["image_mean"]
            if proc.get("image_std") is not None:
                kwargs["std"] = proc["image_std"]
            size = proc.get("crop_size") or proc.get("size")
            if isinstance(size, dict):
                size = size.get("height") or size.get("shortest_edge")
            if isinstance(size, int):
                kwargs["image_size"] = size
        return cls(clip.eval(), tokenizer, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the model, tokenizer and image normalisation (``preprocessor_config.json``) for
        :meth:`from_pretrained`."""
        from transformers import CLIPImageProcessor

        root = Path(path)
        self.clip.save_pretrained(root)
        self.tokenizer.save_pretrained(root)
        size = {"height": self.image_size, "width": self.image_size}
        CLIPImageProcessor(
            image_mean=self.mean.tolist(),
            image_std=self.std.tolist(),
            size={"shortest_edge": self.image_size},
            crop_size=size,
        ).save_pretrained(root)

    # ------------------------------------------------------------------------------------------------ encoding
    @property
    def logit_scale(self) -> Tensor:
        """The exp-ed temperature ``exp(logit_scale)`` (clamped at 100, as CLIP's training does), a 0-dim tensor."""
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1], C in {1, 3} -> the vision tower's normalised (B, 3, S, S) input."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, 1 or 3, H, W) tensor in [-1, 1], got {shape}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=(h > s or w > s))
        x = (x + 1) / 2
        return (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, M) L2-normalised float32 embeddings (differentiable w.r.t. ``images``)."""
        x = self.preprocess(images).to(self.clip.dtype)
        feats = _features(self.clip.get_image_features(pixel_values=x)).float()
        return F.normalize(feats, dim=-1)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"input_ids", "attention_mask"}`` (B, L): padded to the longest, truncated to ``max_length``."""
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise ValueError(f"texts must be a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError("texts is empty: give at least one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise ValueError(f"texts must be strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = self.mean.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def encode_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask (B, L) -> (B, M) L2-normalised float32 embeddings."""
        feats = _features(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)).float()
        return F.normalize(feats, dim=-1)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """A list of B strings -> (B, M) L2-normalised float32 embeddings. ValueError for a non-list/empty input."""
        return self.encode_tokens(**self.tokenize(texts))

    def forward(self, images: Tensor, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(encode_image(images), encode_text(texts))``."""
        return self.encode_image(images), self.encode_text(texts)


def load_matching_model(source: str | Path) -> MatchingModel:
    """A frozen matching model (guide/scorer) from a ``ContrastiveMatchingModule`` checkpoint (``.ckpt``, loaded
    weights-only through :func:`~lightning_dpmot.utils.checkpoint_io.load_lightning_module`) or a local Hugging Face
    directory (:meth:`MatchingModel.from_pretrained`).

    Returned in eval mode with ``requires_grad_(False)`` on its parameters; gradients still flow to input images.
    """
    path = Path(str(source)).expanduser()
    if path.is_dir():
        model = MatchingModel.from_pretrained(path)
    else:
        from lightning_dpmot.models.matching import ContrastiveMatchingModule
        from lightning_dpmot.utils.checkpoint_io import CheckpointError, load_checkpoint, load_lightning_module

        if not path.exists() and not str(source).endswith(".ckpt"):
            raise FileNotFoundError(f"matching model not found: {source} (a .ckpt file or a local model directory)")
        hparams = load_checkpoint(source).get("hyper_parameters") or {}
        class_path = str(hparams.get("_class_path", ""))
        if class_path and class_path.rsplit(".", 1)[-1] != ContrastiveMatchingModule.__name__:
            raise CheckpointError(
                f"checkpoint {source} holds a {class_path.rsplit('.', 1)[-1]}, not a ContrastiveMatchingModule"
            )
        module = load_lightning_module(source, cls=ContrastiveMatchingModule)
        model = module.model
    model.eval()
    model.requires_grad_(False)
    return model
