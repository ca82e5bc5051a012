"""Digests that identify a text encoder, and the on-disk cache of its per-text token states.

The cache is keyed by everything that decides an encoding: the encoder's *fingerprint* (SHA-256 of its weight files
or, for a model built in memory, of its state dict; plus its tokenizer and config), ``max_length``, the compute
dtype and the text itself. One text is one file ``<root>/<namespace>/<key[:2]>/<key>.pt`` holding
``{"text": str, "tokens": (L, C) float32}`` (``L`` = the text's own token count, no padding), written with
``torch.save`` to a temporary file and renamed into place (atomic: concurrent ranks or workers never read a partial
entry) and read back with ``torch.load(weights_only=True)``. A small in-memory LRU sits in front of the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_dpmot.utils.hashing import file_sha256

ENV_CACHE_DIR = "DPMOT_TEXT_CACHE_DIR"
"""Environment variable overriding the default cache directory."""

CACHE_FORMAT = 1
"""Bump when the stored layout or the meaning of an entry changes (old entries are then never read)."""

_HEX = set("0123456789abcdef")


class WeightHashError(ValueError):
    """A weight file whose SHA-256 differs from the digest it is pinned to."""


def default_cache_dir() -> Path:
    """``$DPMOT_TEXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lightning_dpmot/text_embeddings`` (``~/.cache/...``)."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "lightning_dpmot" / "text_embeddings"


def check_sha256(digest: str, what: str = "sha256") -> str:
    """``digest`` lower-cased if it is 64 hex characters, else a ValueError naming ``what``."""
    value = str(digest).strip().lower()
    if len(value) != 64 or not set(value) <= _HEX:
        raise ValueError(f"{what} must be a SHA-256 hex digest (64 hex characters), got {digest!r}")
    return value


def verify_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """The file's SHA-256 if it equals ``expected``; otherwise a :class:`WeightHashError` naming the file and both
    digests."""
    expected = check_sha256(expected)
    actual = file_sha256(path)
    if actual != expected:
        raise WeightHashError(
            f"weight file {path} fails its SHA-256 check: expected {expected}, got {actual} "
            "(the file is corrupt, truncated or not the pinned weights; reinstall or re-download it)"
        )
    return actual


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in sorted key order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def json_sha256(obj: object) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class EmbeddingCache:
    """Per-text token states ``(L, C)`` float32 on disk, under one namespace, plus an in-memory LRU.

    Args:
        root: cache directory (shared by all encoders; each gets its own sub-directory).
        namespace: SHA-256 of everything except the text that decides an encoding (fingerprint, max_length,
            dtype); see :meth:`TextEncoder._cache_namespace`.
        meta: JSON-serialisable description written once to ``<namespace>/meta.json`` (for people, never read).
        memory_size: entries kept in memory (0 = none).
    """

    def __init__(self, root: str | os.PathLike[str], namespace: str, meta: dict[str, object], memory_size: int) -> None:
        if memory_size < 0:
            raise ValueError(f"memory_cache_size must be >= 0, got {memory_size}")
        self.root = Path(root).expanduser()
        self.namespace = check_sha256(namespace, "cache namespace")
        self.directory = self.root / self.namespace[:32]
        self.meta = meta
        self.memory_size = memory_size
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self._meta_written = False

    def key(self, text: str) -> str:
        """The entry key of ``text`` in this namespace."""
        return json_sha256({"format": CACHE_FORMAT, "namespace": self.namespace, "text": text})

    def path(self, text: str) -> Path:
        """The file holding ``text``'s entry."""
        key = self.key(text)
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, text: str) -> Tensor | None:
        """The stored ``(L, C)`` states of ``text`` (a CPU float32 tensor; do not modify), or None on a miss.

        An unreadable or foreign entry is reported with a warning naming the file and treated as a miss (it is
        overwritten by the next :meth:`put`).
        """
        if text in self._memory:
            self._memory.move_to_end(text)
            return self._memory[text]
        path = self.path(text)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            states = entry["tokens"]
            if entry.get("text") != text or not isinstance(states, Tensor) or states.ndim != 2:
                raise ValueError("the entry does not hold this text's (L, C) states")
            if states.dtype != torch.float32:
                raise ValueError(f"the entry holds {states.dtype} states, expected torch.float32")
        except Exception as err:  # noqa: BLE001 - a cache entry is disposable: recompute it
            warnings.warn(f"ignoring unreadable text-embedding cache entry {path}: {err}", stacklevel=3)
            return None
        self._remember(text, states)
        return states

    def put(self, text: str, states: Tensor) -> None:
        """Store ``states`` ``(L, C)`` for ``text`` (atomically: temporary file + rename)."""
        states = _plain_cpu_copy(states)
        path = self.path(text)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_meta()
            _atomic_save({"text": text, "tokens": states}, path)
        except OSError as err:
            raise OSError(
                f"cannot write the text-embedding cache entry {path}: {err} "
                f"(choose another cache_dir or ${ENV_CACHE_DIR}, or disable the cache with cache=False)"
            ) from err
        self._remember(text, states)

    def _remember(self, text: str, states: Tensor) -> None:
        if self.memory_size == 0:
            return
        self._memory[text] = states
        self._memory.move_to_end(text)
        while len(self._memory) > self.memory_size:
            self._memory.popitem(last=False)

    def _write_meta(self) -> None:
        if self._meta_written:
            return
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = meta_path.with_name(f".meta.{os.getpid()}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, **self.meta}, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, meta_path)
        self._meta_written = True


def _plain_cpu_copy(states: Tensor) -> Tensor:
    """A contiguous float32 CPU copy that owns its storage and is a normal tensor even when ``states`` was made in
    inference mode (inference tensors cannot later be saved for backward in a training step)."""
    with torch.inference_mode(False):
        return states.detach().to("cpu", torch.float32).clone().contiguous()


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = [
    "CACHE_FORMAT",
    "ENV_CACHE_DIR",
    "EmbeddingCache",
    "WeightHashError",
    "check_sha256",
    "default_cache_dir",
    "file_sha256",
    "json_sha256",
    "state_dict_sha256",
    "verify_sha256",
]
