"""Random access into WebDataset tar shards through a cached index of member offsets (no ``webdataset`` needed).

A WebDataset shard (what img2dataset writes for LAION/CC and open_clip reads) is a plain, uncompressed tar whose
members are grouped into samples by key: ``00001.jpg`` + ``00001.txt`` [+ ``00001.json``] form sample ``00001``
(the key is the member name up to the first dot of its base name, as in ``webdataset``; extensions are compared
lower-case). :func:`index_shard` walks a shard's headers once with :mod:`tarfile` and records, per sample, the byte
offset and size of its image (``jpg``/``jpeg``/``png``/``webp``) and its caption (the ``txt`` member, read into the
index). The index is stored as JSON in a cache directory, keyed by the shard's absolute path, size and mtime, so a
shard is walked once; afterwards ``dataset[i]`` is one ``seek`` + ``read`` of the image bytes. Being a map-style
dataset, it works unchanged with the epoch-seeded sampler, DDP and exact mid-epoch resume (:mod:`.loading`).

Bad data (``on_bad_item``): a sample without an image or without a (non-empty) caption, a truncated shard (a member
whose data runs past the end of the file, or a missing end-of-archive block) and, with ``"skip"``, images that do
not decode are either one error naming the shard (and key), or left out and counted (``"skip"``; a truncated
shard keeps the samples that lie wholly before the cut). With ``"error"`` a corrupt image is found when it is read,
with an error naming shard and key; with ``"skip"`` every image is decoded once when the shard is indexed (the
verdicts are cached with the index).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from lightning_dpmot.data.base import uint8_to_signed
from lightning_dpmot.data.image_folder import _DECODE_ERRORS, load_image, to_8bit

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext
OnBadItem = Literal["error", "skip"]


def default_index_dir() -> Path:
    """``$DPMOT_WDS_INDEX_DIR``, else ``$XDG_CACHE_HOME/lightning_dpmot/wds_index`` (``~/.cache/...``)."""
    if os.environ.get("DPMOT_WDS_INDEX_DIR"):
        return Path(os.environ["DPMOT_WDS_INDEX_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lightning_dpmot" / "wds_index"


@dataclass
class ShardIndex:
    """The samples of one shard: ``samples`` = ``[[key, image_offset, image_size, caption], ...]`` in tar order;
    ``bad`` = ``[[key, reason], ...]`` (samples that cannot be used); ``truncated``: the error text when the shard is
    cut short (its ``samples`` are those wholly before the cut); ``verified``: the images were decoded once (and
    those that failed moved to ``bad``)."""

    path: str
    samples: list[list[Any]] = field(default_factory=list)
    bad: list[list[str]] = field(default_factory=list)
    truncated: str | None = None
    verified: bool = False


def _walk(path: Path) -> ShardIndex:
    """Read the headers of ``path`` (and the caption members) into a :class:`ShardIndex`."""
    size = path.stat().st_size
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    truncated = None
    end = 0
    with open(path, "rb") as raw:
        try:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for info in tar:
                    if info.offset_data + info.size > size:
                        truncated = f"member {info.name!r} needs {info.offset_data + info.size} bytes, file has {size}"
                        break
                    end = info.offset_data + -(-info.size // 512) * 512
                    match = _KEY_EXT.match(info.name)
                    if not info.isfile() or match is None:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    if key not in members:
                        members[key] = {}
                        order.append(key)
                    members[key][ext] = (info.offset_data, info.size)
                else:
                    raw.seek(end)
                    if raw.read(512) != bytes(512):  # a complete tar ends with zero blocks
                        truncated = f"no end-of-archive block after byte {end} (file has {size} bytes)"
        except (tarfile.TarError, EOFError, OSError) as err:
            if not order:
                raise ValueError(f"WebDataset shard {str(path)!r} is not a readable (uncompressed) tar: {err}") from err
            truncated = f"unreadable after byte {end}: {err}"
        index = ShardIndex(str(path), truncated=truncated)
        for key in order:
            parts = members[key]
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if image is None:
                index.bad.append([key, f"no image member ({'/'.join(IMAGE_EXTS)})"])
                continue
            if "txt" not in parts:
                index.bad.append([key, "no caption member (.txt)"])
                continue
            raw.seek(parts["txt"][0])
            caption = raw.read(parts["txt"][1]).decode("utf-8", errors="replace").strip()
            if not caption:
                index.bad.append([key, "empty caption"])
                continue
            index.samples.append([key, image[0], image[1], caption])
    return index


def _verify(index: ShardIndex) -> None:
    """Decode every image of ``index`` once; move those that fail to ``index.bad``."""
    kept = []
    with open(index.path, "rb") as raw:
        for sample in index.samples:
            raw.seek(sample[1])
            try:
                with Image.open(io.BytesIO(raw.read(sample[2]))) as img:
                    to_8bit(img, 3)
                kept.append(sample)
            except _DECODE_ERRORS as err:
                index.bad.append([sample[0], f"image does not decode: {err}"])
    index.samples, index.verified = kept, True


def index_shard(path: str | Path, verify: bool = False, cache_dir: str | Path | None = None) -> ShardIndex:
    """The (cached) :class:`ShardIndex` of one shard; ``verify`` decodes the images once (see module docstring).

    Args:
        path: an uncompressed ``.tar`` shard.
        verify: decode every image (and cache the verdicts).
        cache_dir: where index files go (default :func:`default_index_dir`).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"WebDataset shard {str(path)!r} does not exist")
    stat = path.stat()
    digest = hashlib.sha1(f"{INDEX_VERSION}|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir else default_index_dir()
    cache = root / f"{path.stem}-{digest}.json"
    index = None
    if cache.is_file():
        try:
            index = ShardIndex(**json.loads(cache.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            index = None  # a damaged cache file is rebuilt
    dirty = index is None
    if index is None:
        index = _walk(path)
    if verify and not index.verified:
        _verify(index)
        dirty = True
    if dirty:
        root.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index.__dict__), encoding="utf-8")
        tmp.replace(cache)  # atomic: concurrent ranks write the same content
    return index


class WebDatasetIndex(Dataset):
    """Map-style dataset over WebDataset shards: items ``{"x": (3, R, R) float32 in [-1, 1], "index": () int64,
    "caption_en": str}``, read with one seek per item.

    Args:
        shards: shard paths (their order is the dataset's order; samples in tar order within a shard).
        resolution: output side R (shorter side resized, bicubic with antialiasing, then centre crop).
        on_bad_item: ``"error"``: the first bad sample, truncated shard or undecodable image raises an error naming
            the shard (and key); ``"skip"``: they are left out, counted in :attr:`skipped` (``{reason: count}``) and
            listed in :attr:`skipped_keys` (``(shard, key, reason)``).
        cache_dir: index cache directory (default :func:`default_index_dir`).
    """

    def __init__(
        self,
        shards: list[str] | list[Path],
        resolution: int,
        on_bad_item: OnBadItem = "error",
        cache_dir: str | Path | None = None,
    ) -> None:
        if not shards:
            raise ValueError("WebDatasetIndex needs at least one shard")
        if on_bad_item not in ("error", "skip"):
            raise ValueError(f"on_bad_item must be 'error' or 'skip', got {on_bad_item!r}")
        self.resolution, self.on_bad_item = resolution, on_bad_item
        self.shards: list[str] = []
        self.skipped: dict[str, int] = {}
        self.skipped_keys: list[tuple[str, str, str]] = []
        shard_of, offsets, sizes, self.keys, self.captions = [], [], [], [], []
        for path in shards:
            index = index_shard(path, verify=on_bad_item == "skip", cache_dir=cache_dir)
            if on_bad_item == "error":
                if index.truncated:
                    raise ValueError(
                        f"WebDataset shard {index.path!r} is truncated ({index.truncated}); re-download it, or set "
                        f"data.init_args.on_bad_item: skip to use the samples before the cut"
                    )
                if index.bad:
                    key, reason = index.bad[0]
                    raise ValueError(
                        f"WebDataset shard {index.path!r}, sample {key!r}: {reason} ({len(index.bad)} bad sample(s) in "
                        f"this shard; set data.init_args.on_bad_item: skip to leave them out)"
                    )
            else:
                if index.truncated:
                    self.skipped["truncated shard"] = self.skipped.get("truncated shard", 0) + 1
                    self.skipped_keys.append((index.path, "", f"truncated: {index.truncated}"))
                for key, reason in index.bad:
                    kind = reason.split(":")[0]
                    self.skipped[kind] = self.skipped.get(kind, 0) + 1
                    self.skipped_keys.append((index.path, key, reason))
            self.shards.append(index.path)
            for key, offset, size, caption in index.samples:
                shard_of.append(len(self.shards) - 1)
                offsets.append(offset)
                sizes.append(size)
                self.keys.append(key)
                self.captions.append(caption)
        if not self.keys:
            raise ValueError(f"no usable samples in {len(self.shards)} WebDataset shard(s) (skipped: {self.skipped})")
        self.shard_of = torch.tensor(shard_of, dtype=torch.int32)
        self.offsets = torch.tensor(offsets, dtype=torch.int64)
        self.sizes = torch.tensor(sizes, dtype=torch.int64)

    @property
    def num_skipped(self) -> int:
        """Samples (and truncated shards) left out by ``on_bad_item="skip"``."""
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, index: int) -> bytes:
        """The raw image bytes of item ``index`` (one seek + read)."""
        with open(self.shards[int(self.shard_of[index])], "rb") as raw:
            raw.seek(int(self.offsets[index]))
            return raw.read(int(self.sizes[index]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            pixels = load_image(io.BytesIO(self.read_bytes(index)), self.resolution, 3)  # type: ignore[arg-type]
        except ValueError as err:
            shard = self.shards[int(self.shard_of[index])]
            raise ValueError(
                f"WebDataset shard {shard!r}, sample {self.keys[index]!r}: image does not decode ({err.__cause__}); "
                f"set data.init_args.on_bad_item: skip to leave undecodable images out"
            ) from err
        x: Tensor = uint8_to_signed(pixels)
        return {"x": x, "index": torch.tensor(index, dtype=torch.long), "caption_en": self.captions[index]}


__all__ = ["ShardIndex", "WebDatasetIndex", "default_index_dir", "index_shard"]
