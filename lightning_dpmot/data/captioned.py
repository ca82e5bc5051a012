"""Captioned images for text-to-image training on real data: WebDataset shards, a folder + captions.jsonl, COCO.

Items are ``{"x": (3, R, R) float32 in [-1, 1], "index": () int64, "caption_en": str[, "caption_zh": str]}``
(batches: ``x`` (B, 3, R, R), ``index`` (B,), ``caption_en`` a list of B strings), the keys the text-to-image
model's conditioner reads and the shapes benchmark uses. Images are decoded lazily with Pillow (every mode, see
:func:`~lightning_dpmot.data.image_folder.to_8bit`), the shorter side resized to R (bicubic, antialiased when
downsampling), then centre-cropped.

Sources (``source``), each given per split (``train``; ``val``, or a seeded ``val_fraction`` of ``train``):

* ``"webdataset"``: a glob (``"/data/laion/{00000..}.tar"`` is not expanded; use ``"/data/laion/*.tar"``) or a list
  of uncompressed tar shards, read through a cached index of member offsets (:mod:`.webdataset_index`).
* ``"folder"``: a folder holding ``captions.jsonl``, one JSON object per line ``{"file": path relative to the folder,
  "caption": str[, "caption_zh": str]}``; one item per line, in file order.
* ``"coco"``: a COCO captions JSON (``captions_train2017.json``: ``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``caption``) and its image folder (``train_images`` / ``val_images``).
  **One item per (image, caption) pair** (about 5 per image), sorted by (image id, annotation id): every caption is
  trained on, and the val split's captions are the prompt list of zero-shot COCO FID-30K
  (``predict_num_samples: 30000``). ``coco_captions: first`` gives one item per image (its lowest-id caption).

Bad data (``on_bad_item``): ``"error"`` stops with an error naming the file (shard and key, or JSON line); ``"skip"``
leaves missing/undecodable images, samples without caption and truncated shards' tails out, counts them in
:attr:`CaptionedImagesDataModule.skipped` and warns once per split.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Subset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule, Split, split_indices, uint8_to_signed
from lightning_dpmot.data.image_folder import _DECODE_ERRORS, load_image, to_8bit
from lightning_dpmot.data.prompts import read_prompt_files
from lightning_dpmot.data.webdataset_index import OnBadItem, WebDatasetIndex

Source = Literal["webdataset", "folder", "coco"]
CAPTION_KEYS = ("caption_en", "caption_zh")


class CaptionedFileDataset(Dataset):
    """Image files with captions: ``records`` = ``[{"path": Path, "caption_en": str[, "caption_zh": str]}, ...]``."""

    def __init__(self, records: list[dict[str, Any]], resolution: int) -> None:
        self.records, self.resolution = records, resolution
        self.captions = [r["caption_en"] for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        x: Tensor = uint8_to_signed(load_image(record["path"], self.resolution, 3))
        item: dict[str, Any] = {"x": x, "index": torch.tensor(index, dtype=torch.long)}
        item.update({k: record[k] for k in CAPTION_KEYS if k in record})
        return item


class _Reindexed(Dataset):
    """A subset whose items carry their index in the subset (so ``index`` matches the sampler's indices)."""

    def __init__(self, subset: Subset) -> None:
        self.subset = subset
        base = subset.dataset
        self.captions = [base.captions[i] for i in subset.indices]  # type: ignore[attr-defined]

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.subset[index])
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item


def read_captions_jsonl(folder: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Records of ``folder/captions.jsonl`` and the bad lines ``(where, reason)`` (no image decoding here)."""
    path = folder / "captions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist (a folder source needs captions.jsonl)")
    records, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not a JSON object ({err.msg})") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise ValueError(f"{where}: each line must be an object with a 'file' string, got {line[:80]!r}")
        caption = entry.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            bad.append((where, f"no caption for {entry['file']!r}"))
            continue
        record = {"path": folder / entry["file"], "caption_en": caption.strip(), "where": where}
        if isinstance(entry.get("caption_zh"), str):
            record["caption_zh"] = entry["caption_zh"].strip()
        records.append(record)
    return records, bad


def read_coco(annotations: Path, images: Path, first_only: bool) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(image, caption) records of a COCO captions JSON, sorted by (image id, annotation id)."""
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO captions file {str(annotations)!r} does not exist")
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        files = {int(img["id"]): img["file_name"] for img in data["images"]}
        anns = sorted((int(a["image_id"]), int(a["id"]), a["caption"]) for a in data["annotations"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{str(annotations)!r} is not a COCO captions file (needs 'images' [id, file_name] and 'annotations' "
            f"[id, image_id, caption]): {err!r}"
        ) from err
    records, bad, seen = [], [], set()
    for image_id, ann_id, caption in anns:
        where = f"{annotations} annotation {ann_id}"
        if image_id not in files:
            bad.append((where, f"image id {image_id} is not in 'images'"))
            continue
        if first_only and image_id in seen:
            continue
        if not isinstance(caption, str) or not caption.strip():
            bad.append((where, "empty caption"))
            continue
        seen.add(image_id)
        records.append({"path": images / files[image_id], "caption_en": caption.strip(), "where": where})
    return records, bad


def _decodes(path: Path) -> str | None:
    """``None`` when ``path`` decodes, else the reason."""
    if not path.is_file():
        return "image file does not exist"
    try:
        with Image.open(path) as img:
            to_8bit(img, 3)
        return None
    except _DECODE_ERRORS as err:
        return f"image does not decode: {err}"


class CaptionedImagesDataModule(DiffusionDataModule):
    """Captioned images from WebDataset shards, a folder + ``captions.jsonl`` or COCO captions (module docstring).

    ``data_shape = (3, R, R)``, ``num_classes = 0``. **Generation**: :meth:`prompts` is a fixed prompt list (the
    captions of a split in item order, or a prompt file); :meth:`generation_conditions` maps (B,) seeds to
    ``{"prompt_index": (B,) int64 = seed % P, "caption_en": [B][, "caption_zh": [B]]}``, as the shapes module does.

    Args:
        source: ``"webdataset"``, ``"folder"`` or ``"coco"``.
        train: the training data: shard glob or list (webdataset), folder (folder), captions JSON (coco).
        val: the same for validation; ``None``: hold out ``val_fraction`` of ``train`` (seeded by ``split_seed``).
        train_images, val_images: COCO image folders of ``train`` / ``val``.
        resolution: image side R.
        coco_captions: ``"all"`` (one item per caption) or ``"first"`` (one per image).
        val_fraction, split_seed: held-out share of ``train`` when ``val`` is ``None``.
        on_bad_item: ``"error"`` or ``"skip"`` (module docstring).
        predict_prompts: ``"val"`` / ``"train"`` (that split's captions) or a prompt file (one prompt per line).
        predict_prompts_zh: with a prompt file, an optional line-aligned Chinese file.
        index_cache_dir: where WebDataset shard indices are cached (default ``~/.cache/lightning_dpmot/wds_index``).
        **kwargs: loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule`.
    """

    def __init__(
        self,
        source: Source,
        train: str | list[str],
        val: str | list[str] | None = None,
        train_images: str | None = None,
        val_images: str | None = None,
        resolution: int = 256,
        coco_captions: Literal["all", "first"] = "all",
        val_fraction: float = 0.01,
        split_seed: int = 0,
        on_bad_item: OnBadItem = "error",
        predict_prompts: str = "val",
        predict_prompts_zh: str | None = None,
        index_cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if source not in ("webdataset", "folder", "coco"):
            raise ValueError(f"source must be 'webdataset', 'folder' or 'coco', got {source!r}")
        if on_bad_item not in ("error", "skip"):
            raise ValueError(f"on_bad_item must be 'error' or 'skip', got {on_bad_item!r}")
        if coco_captions not in ("all", "first"):
            raise ValueError(f"coco_captions must be 'all' or 'first', got {coco_captions!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if val is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if source == "coco" and (train_images is None or (val is not None and val_images is None)):
            raise ValueError("source 'coco' needs train_images (and val_images with val): the image folders")
        if predict_prompts in ("train", "val"):
            if predict_prompts_zh is not None:
                raise ValueError("predict_prompts_zh goes with a prompt file in predict_prompts, not a split")
        else:
            read_prompt_files(predict_prompts, predict_prompts_zh)  # fail now: missing, empty or misaligned
        self.source, self.resolution, self.coco_captions = source, resolution, coco_captions
        self.inputs: dict[str, Any] = {"train": train, "val": val}
        self.images = {"train": train_images, "val": val_images}
        self.val_fraction, self.split_seed, self.on_bad_item = val_fraction, split_seed, on_bad_item
        self.predict_prompts, self.predict_prompts_zh = predict_prompts, predict_prompts_zh
        self.index_cache_dir = index_cache_dir
        self.skipped: dict[str, list[tuple[str, str]]] = {}  # per input split: (where, reason) left out
        self.data_shape = (3, resolution, resolution)
        self.num_classes = 0
        self._full: dict[str, Dataset] = {}

    @property
    @override
    def name(self) -> str:
        """E.g. ``"captioned-webdataset-1a2b3c4d-256px"``: source, a hash of the inputs and options, resolution."""
        spec = json.dumps([self.source, self.inputs, self.images, self.coco_captions, self.val_fraction,
                           self.split_seed, self.on_bad_item], sort_keys=True, default=str)  # fmt: skip
        return f"captioned-{self.source}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}-{self.resolution}px"

    def shards(self, split: Split) -> list[str]:
        """The shard paths of ``split`` (a glob is expanded and sorted; a list keeps its order)."""
        spec = self.inputs[split]
        if isinstance(spec, str):
            found = sorted(glob.glob(str(Path(spec).expanduser())))
            if not found:
                raise FileNotFoundError(f"no WebDataset shards match {spec!r} ({split})")
            return found
        return [str(p) for p in spec]

    def _build_full(self, split: Split) -> Dataset:
        """The whole dataset of an input (``train`` or ``val``), bad items handled per ``on_bad_item``."""
        if self.source == "webdataset":
            wds = WebDatasetIndex(self.shards(split), self.resolution, self.on_bad_item, self.index_cache_dir)
            skipped = [(f"{shard}:{key}", reason) for shard, key, reason in wds.skipped_keys]
            self._report(split, skipped)
            return wds
        spec = Path(self.inputs[split]).expanduser()
        if self.source == "folder":
            records, bad = read_captions_jsonl(spec)
        else:
            records, bad = read_coco(spec, Path(self.images[split]).expanduser(), self.coco_captions == "first")
        if bad and self.on_bad_item == "error":
            where, reason = bad[0]
            raise ValueError(f"{where}: {reason} (set data.init_args.on_bad_item: skip to leave such items out)")
        if self.on_bad_item == "skip":
            kept = []
            for record in records:
                reason = _decodes(record["path"])
                if reason is None:
                    kept.append(record)
                else:
                    bad.append((f"{record['where']} ({record['path']})", reason))
            records = kept
        self._report(split, bad)
        if not records:
            raise ValueError(f"no usable captioned images in {str(spec)!r}")
        return CaptionedFileDataset(records, self.resolution)

    def _report(self, split: str, skipped: list[tuple[str, str]]) -> None:
        self.skipped[split] = skipped
        if skipped:
            shown = "; ".join(f"{w}: {r}" for w, r in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            rank_zero_warn(f"{self.name} ({split}): left out {len(skipped)} bad item(s) (on_bad_item='skip'): {shown}")

    def _full_dataset(self, split: Split) -> Dataset:
        if split not in self._full:
            self._full[split] = self._build_full(split)
        return self._full[split]

    @override
    def build_dataset(self, split: Split) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if self.inputs["val"] is not None:
            return self._full_dataset(split)
        full = self._full_dataset("train")
        train_idx, val_idx = split_indices(np.zeros(len(full), dtype=np.int64), self.val_fraction, self.split_seed)
        return _Reindexed(Subset(full, (train_idx if split == "train" else val_idx).tolist()))

    def prompts(self, split: str = "val") -> list[dict[str, str]]:
        """A fixed prompt list: a split's captions in item order (``{"caption_en"[, "caption_zh"]}``), or a prompt
        file (the aligned file ``predict_prompts_zh`` when it is ``predict_prompts``)."""
        if split not in ("train", "val"):
            return read_prompt_files(split, self.predict_prompts_zh if split == self.predict_prompts else None)
        dataset = self.dataset(split)  # type: ignore[arg-type]
        if isinstance(dataset, _Reindexed):
            base, indices = dataset.subset.dataset, dataset.subset.indices
        else:
            base, indices = dataset, range(len(dataset))  # type: ignore[arg-type]
        if isinstance(base, CaptionedFileDataset):
            return [{k: base.records[i][k] for k in CAPTION_KEYS if k in base.records[i]} for i in indices]
        return [{"caption_en": base.captions[i]} for i in indices]  # type: ignore[attr-defined]

    @functools.cached_property
    def _prompt_list(self) -> list[dict[str, str]]:
        return self.prompts(self.predict_prompts)

    @override
    def generation_conditions(self, seeds: Tensor) -> dict[str, Any]:
        """(B,) int64 seeds -> ``{"prompt_index": (B,) int64 = seed % P, "caption_en": [B][, "caption_zh": [B]]}``
        into ``prompts(predict_prompts)`` (P prompts)."""
        prompts = self._prompt_list
        index = seeds.to(torch.long) % len(prompts)
        keys = [k for k in CAPTION_KEYS if all(k in p for p in prompts)]
        return {"prompt_index": index, **{k: [prompts[i][k] for i in index.tolist()] for k in keys}}


__all__ = ["CaptionedFileDataset", "CaptionedImagesDataModule", "read_captions_jsonl", "read_coco"]
