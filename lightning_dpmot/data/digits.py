"""scikit-learn's bundled 8x8 handwritten digits: the embedded, download-free dataset of the CPU quickstart.

1,797 grayscale images of the digits 0-9 (about 180 per class), pixel values 0..16, shipped inside the
scikit-learn wheel as ``sklearn/datasets/data/digits.csv.gz``. The file is read directly with NumPy (the same
parse ``sklearn.datasets.load_digits`` performs) because importing scikit-learn itself costs about 2 s;
``load_digits`` is the fallback when the file cannot be located. Loading takes well under a second and the
parsed array is cached per process.

There is no official split: ``val_fraction`` of every class is held out by a seeded, stratified split
(:func:`~lightning_dpmot.data.base.split_indices`), identical across runs and machines.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule, Split, TensorDictDataset, split_indices

#: Supported output resolutions (the native 8 px, or a smooth bicubic upsampling).
DIGITS_RESOLUTIONS = (8, 16, 32)
#: Number of images in the bundled dataset.
DIGITS_NUM_IMAGES = 1797


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as arrays, cached per process.

    Returns:
        ``(images, labels)``: (1797, 8, 8) float32 in [0, 16] and (1797,) int64 in 0..9.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    roots = spec.submodule_search_locations if spec is not None else None
    path = Path(roots[0], "datasets", "data", "digits.csv.gz") if roots else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        images, labels = table[:, :-1], table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, labels = bunch.data, bunch.target
    images = rearrange(np.asarray(images, dtype=np.float32), "n (h w) -> n h w", h=8, w=8)
    labels = np.asarray(labels).astype(np.int64)
    if images.shape[0] != DIGITS_NUM_IMAGES:
        raise ValueError(f"expected {DIGITS_NUM_IMAGES} digits images, read {images.shape[0]} from {path}")
    return images, labels


def digits_to_signed(images: np.ndarray, resolution: int) -> torch.Tensor:
    """Scale digits to [-1, 1] and resize them.

    Args:
        images: (N, 8, 8) values in [0, 16].
        resolution: output side; upsampling is bicubic, then clamped back into [-1, 1].

    Returns:
        (N, 1, resolution, resolution) float32 in [-1, 1].
    """
    x = rearrange(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), "n h w -> n 1 h w")
    x = x / 8.0 - 1.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(-1.0, 1.0).contiguous()


class DigitsDataModule(DiffusionDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), bundled: no download, instant load.

    Batches: ``x`` (B, 1, R, R) float32 in [-1, 1] (ink is +1), ``label`` (B,) int64 digit, ``index`` (B,).

    Args:
        resolution: image side R: 8 (native), 16 or 32 (bicubic upsampling).
        val_fraction: fraction of each class held out for validation (seeded, stratified split).
        split_seed: seed of the train/val split.
        **kwargs: the loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule` (``batch_size``,
            ``num_workers``, ``x_flip``, ``predict_num_samples``, ...).
    """

    def __init__(
        self,
        resolution: int = 8,
        val_fraction: float = 0.15,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if resolution not in DIGITS_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {DIGITS_RESOLUTIONS}, got {resolution}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.resolution = resolution
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.data_shape = (1, resolution, resolution)
        self.num_classes = 10

    @property
    @override
    def name(self) -> str:
        """E.g. ``"digits-16px"``; a non-default split appends ``"-val0.2-seed3"``."""
        name = f"digits-{self.resolution}px"
        if (self.val_fraction, self.split_seed) != (0.15, 0):
            name += f"-val{self.val_fraction:g}-seed{self.split_seed}"
        return name

    def indices(self, split: Split) -> np.ndarray:
        """(N_split,) sorted int64 indices of ``split`` into the 1,797 bundled images."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        _, labels = load_digits_arrays()
        train_idx, val_idx = split_indices(labels, self.val_fraction, self.split_seed)
        return train_idx if split == "train" else val_idx

    @override
    def build_dataset(self, split: Split) -> Dataset:
        idx = self.indices(split)
        images, labels = load_digits_arrays()
        x = digits_to_signed(images[idx], self.resolution)
        return TensorDictDataset(x, torch.from_numpy(labels[idx]))
