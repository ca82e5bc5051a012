"""A folder of PNG/JPEG images, optionally one subfolder per class, decoded lazily with Pillow.

Images are found recursively (extensions ``.png``, ``.jpg``, ``.jpeg``, any case) and sorted by their path
relative to the root, so the file order, and with it the seeded train/val split, is the same on every machine.
Each item is decoded when it is read (nothing is cached; use DataLoader workers to decode in parallel):
converted to 8-bit grayscale or RGB (16-bit grayscale scaled, transparency composited over white: :func:`to_8bit`),
the shorter side resized to ``resolution`` (bicubic; Pillow antialiases when downsampling), then centre-cropped to a
square. An unreadable file stops the run with an error naming it, or is left out (``on_bad_item="skip"``).

With ``class_subfolders`` every immediate subfolder of the root is a class; sorted folder names give labels
0..K-1. The folder names are listed in ``__init__`` (so ``num_classes`` is known there); files are listed when
the first dataset is built.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule, Split, split_indices, uint8_to_signed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def list_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by their relative POSIX path."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


#: What Pillow raises for unreadable files: not an image, truncated, corrupt streams, decompression bombs.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def to_8bit(img: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``"L"`` (channels 1) or ``"RGB"`` (channels 3) without clipping.

    16-bit and 32-bit integer grayscale (``"I;16*"``, ``"I"``: 0..65535) is scaled by 255 / 65535, float
    grayscale (``"F"``: 0..1) by 255, both rounded and clipped; images with transparency (``"RGBA"``, ``"LA"``,
    ``"PA"``, palettes or ``"L"``/``"RGB"`` with a transparent colour) are composited over white; palettes and
    other modes (``"1"``, ``"CMYK"``, ``"YCbCr"``, ...) use Pillow's conversion.
    """
    mode = "L" if channels == 1 else "RGB"
    if img.mode.startswith("I") or img.mode == "F":
        value = np.asarray(img, dtype=np.float64)
        value = np.nan_to_num(value, nan=0.0) * (255.0 if img.mode == "F" else 255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(value), 0, 255).astype(np.uint8), "L").convert(mode)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert(mode)
    return img.convert(mode)


def load_image(path: Path, resolution: int, channels: int) -> Tensor:
    """Decode (any mode, see :func:`to_8bit`), resize the shorter side to ``resolution`` and centre-crop one image.

    Args:
        path: a PNG or JPEG file.
        resolution: output side R.
        channels: 1 (grayscale) or 3 (RGB).

    Returns:
        (channels, R, R) uint8.

    Raises:
        ValueError: naming ``path`` when the file cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            img = to_8bit(img, channels)
    except _DECODE_ERRORS as err:
        raise ValueError(
            f"cannot read image {path}: {err} (set data.init_args.on_bad_item: skip to leave unreadable files out)"
        ) from err
    width, height = img.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)  # returns a copy when the size is unchanged
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        return torch.from_numpy(rearrange(array, "h w -> 1 h w").copy())
    return torch.from_numpy(rearrange(array, "h w c -> c h w").copy())


class ImageFileDataset(Dataset):
    """Image files decoded on access into dict items ``{"x", "index"[, "label"]}``.

    Args:
        paths: N image files.
        labels: (N,) int64 class labels, or ``None``.
        resolution: output side R; items are ``x`` (channels, R, R) float32 in [-1, 1].
        channels: 1 (grayscale) or 3 (RGB).
    """

    def __init__(self, paths: list[Path], labels: Tensor | None, resolution: int, channels: int) -> None:
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"labels has {len(labels)} entries but there are {len(paths)} paths")
        self.paths, self.labels = list(paths), labels
        self.resolution, self.channels = resolution, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x = uint8_to_signed(load_image(self.paths[index], self.resolution, self.channels))
        item = {"x": x, "index": torch.tensor(index, dtype=torch.long)}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


class ImageFolderDataModule(DiffusionDataModule):
    """PNG/JPEG images from a folder (recursive), resized and centre-cropped to squares, decoded lazily.

    Batches: ``x`` (B, C, R, R) float32 in [-1, 1], ``index`` (B,), and ``label`` (B,) int64 with
    ``class_subfolders``. Validation holds out ``val_fraction`` of the files (of each class), seeded.

    Args:
        root: folder of images, or of one subfolder per class.
        resolution: image side R (shorter side resized to R, then centre crop).
        channels: 1 (grayscale) or 3 (RGB).
        class_subfolders: each immediate subfolder is a class (sorted names -> labels 0..K-1).
        val_fraction: fraction of the images (of every class) held out for validation.
        split_seed: seed of the train/val split.
        on_bad_item: what an unreadable (corrupt, truncated, not an image) file does: ``"error"`` stops the run
            with an error naming the file when the file is read; ``"skip"`` decodes every file once when the
            dataset is built and leaves the unreadable ones out, with a warning that counts and names them.
        **kwargs: the loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule` (``batch_size``,
            ``num_workers``, ``x_flip``, ``predict_num_samples``, ...).
    """

    def __init__(
        self,
        root: str,
        resolution: int = 64,
        channels: int = 3,
        class_subfolders: bool = False,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        on_bad_item: Literal["error", "skip"] = "error",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if on_bad_item not in ("error", "skip"):
            raise ValueError(f"on_bad_item must be 'error' or 'skip', got {on_bad_item!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        self.resolution, self.channels = resolution, channels
        self.class_subfolders = class_subfolders
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.on_bad_item = on_bad_item
        self.skipped: list[Path] = []  # files left out by on_bad_item="skip"
        self.classes: list[str] = []
        if class_subfolders:
            self._check_root()
            self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not self.classes:
                raise FileNotFoundError(f"class_subfolders=True but {self.root} has no subfolders")
        self.data_shape = (channels, resolution, resolution)
        self.num_classes = len(self.classes)
        self._files: tuple[list[Path], np.ndarray] | None = None

    @property
    @override
    def name(self) -> str:
        """E.g. ``"folder-faces-1a2b3c4d-64px"``: folder name, hash of its absolute path, size, options."""
        digest = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        name = f"folder-{self.root.name}-{digest}-{self.resolution}px"
        name += "-gray" if self.channels == 1 else ""
        name += "-classes" if self.class_subfolders else ""
        if (self.val_fraction, self.split_seed) != (0.05, 0):
            name += f"-val{self.val_fraction:g}-seed{self.split_seed}"
        return name

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist (or is not a directory)")

    def files(self) -> tuple[list[Path], np.ndarray]:
        """All image files and their (N,) int64 labels (zeros without class subfolders); listed once."""
        if self._files is None:
            self._check_root()
            exts = ", ".join(IMAGE_EXTENSIONS)
            if self.class_subfolders:
                paths, labels = [], []
                for label, cls in enumerate(self.classes):
                    found = self._readable(list_images(self.root / cls))
                    if not found:
                        raise FileNotFoundError(f"class folder {self.root / cls} has no {self._usable}images ({exts})")
                    paths += found
                    labels += [label] * len(found)
            else:
                paths = self._readable(list_images(self.root))
                labels = [0] * len(paths)
                if not paths:
                    raise FileNotFoundError(f"no {self._usable}images ({exts}) found under {self.root}")
            if self.skipped:
                shown = ", ".join(str(p) for p in self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
                rank_zero_warn(
                    f"{self.root}: left out {len(self.skipped)} unreadable image file(s) of "
                    f"{len(paths) + len(self.skipped)} (on_bad_item='skip'): {shown}"
                )
            self._files = (paths, np.asarray(labels, dtype=np.int64))
        return self._files

    @property
    def _usable(self) -> str:
        return "readable " if self.on_bad_item == "skip" else ""

    def _readable(self, paths: list[Path]) -> list[Path]:
        """``paths`` without the files that cannot be decoded (all of them unless ``on_bad_item="skip"``)."""
        if self.on_bad_item != "skip":
            return paths
        kept = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    to_8bit(img, self.channels)
                kept.append(path)
            except _DECODE_ERRORS:
                self.skipped.append(path)
        return kept

    @override
    def build_dataset(self, split: Split) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        paths, labels = self.files()
        train_idx, val_idx = split_indices(labels, self.val_fraction, self.split_seed)
        idx = train_idx if split == "train" else val_idx
        split_labels = torch.from_numpy(labels[idx]) if self.class_subfolders else None
        return ImageFileDataset(
            [paths[i] for i in idx],
            split_labels,
            self.resolution,
            self.channels,
        )
