"""Shared DataModule base: dict batches, [-1, 1] images, ``drop_last`` training loaders, seeded predictions.

Every DataModule of the project yields dict batches::

    {"x": (B, *data_shape) float32 in [-1, 1], "label": (B,) int64 (if the data has labels),
     "index": (B,) int64}

``data_shape`` and ``num_classes`` are known right after ``__init__`` (no file access), so LightningCLI can
link them into the model at instantiation. ``predict_dataloader`` yields ``{"seed": (B,) int64, "label": (B,)
int64}``: one seed per generated sample (EDM's per-image seeds), so predictions do not depend on batch size or
device count.

Image datasets may keep their pixels as uint8 (4x less memory than float32; CIFAR-10's 50k training images
take 150 MB instead of 600 MB): :class:`TensorDictDataset` converts each item to float32 in [-1, 1] on access.
:func:`split_indices` gives the seeded, stratified train/val splits of datasets without an official one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from typing_extensions import override

from lightning_dpmot.utils.random import global_seed, make_generator

Split = Literal["train", "val"]
_SHUFFLE, _FLIP = 11, 12  # generator purpose tags


def uint8_to_signed(x: Tensor) -> Tensor:
    """Map uint8 pixels to float32: 0 -> -1, 255 -> +1 (``x / 127.5 - 1``), any shape."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of ``N`` items into train and val index arrays.

    Within each class (ascending label order) the indices are permuted by one ``np.random.RandomState(seed)``,
    whose stream NumPy keeps frozen, so the split is identical across runs, machines and NumPy versions; the
    first ``round(val_fraction * n_class)`` of each class go to val.

    Args:
        labels: (N,) integer class labels (all zeros for unlabelled data: a plain seeded split).
        val_fraction: fraction of every class held out, in (0, 1).
        seed: split seed.

    Returns:
        ``(train_idx, val_idx)``: disjoint, sorted int64 arrays that together cover ``0 .. N-1``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(np.floor(val_fraction * len(idx) + 0.5))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    train_idx = np.sort(np.concatenate(train)).astype(np.int64)
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(labels)} items gives {len(train_idx)} train and "
            f"{len(val_idx)} val items; both splits must be non-empty"
        )
    return train_idx, val_idx


class TensorDictDataset(Dataset):
    """In-memory dataset of ``x`` (N, *S) with optional labels.

    Args:
        x: (N, *S) float32 in [-1, 1], or uint8 in [0, 255] (converted per item to float32 in [-1, 1]);
            images are (N, C, H, W).
        labels: (N,) int64 class labels, or ``None``.
    """

    def __init__(self, x: Tensor, labels: Tensor | None = None) -> None:
        if x.dtype not in (torch.float32, torch.uint8):
            raise ValueError(f"x must be float32 in [-1, 1] or uint8 in [0, 255], got dtype {x.dtype}")
        if labels is not None and len(labels) != len(x):
            raise ValueError(f"labels has {len(labels)} entries but x has {len(x)}")
        self.x = x.contiguous()
        self.labels = labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x = self.x[index]
        x = uint8_to_signed(x) if x.dtype == torch.uint8 else x
        item = {"x": x, "index": torch.tensor(index, dtype=torch.long)}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


class EpochSeededRandomSampler(RandomSampler):
    """Shuffles with a permutation derived from (seed, epoch) only, so a resumed run replays the same order.

    Lightning calls :meth:`set_epoch` every epoch; under DDP it replaces this sampler (a ``RandomSampler``) by a
    ``DistributedSampler``, which is seeded from the run's seed and epoch in the same spirit.
    """

    def __init__(self, data_source: Dataset, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        seed = self.seed if self.seed is not None else global_seed()
        gen = make_generator(seed, self.epoch, _SHUFFLE)
        yield from torch.randperm(len(self.data_source), generator=gen).tolist()


def x_flip_mask(index: Tensor, num_items: int, seed: int, epoch: int) -> Tensor:
    """Which items are flipped this epoch: one fair coin per (seed, epoch, dataset index).

    Args:
        index: (B,) dataset indices of a batch; num_items: dataset size.
    Returns:
        (B,) bool on ``index``'s device; the same on every rank and in a resumed run.
    """
    coins = torch.randint(0, 2, (num_items,), generator=make_generator(seed, epoch, _FLIP), dtype=torch.uint8)
    return coins.bool()[index.cpu()].to(index.device)


def apply_x_flip(batch: dict[str, Tensor], num_items: int, seed: int, epoch: int) -> dict[str, Tensor]:
    """Flip ``batch["x"]`` (B, C, H, W) left-right where :func:`x_flip_mask` says so (in place on the dict)."""
    x = batch["x"]
    if x.ndim != 4:
        raise ValueError(f"x_flip needs images (B, C, H, W); got shape {tuple(x.shape)}")
    mask = x_flip_mask(batch["index"], num_items, seed, epoch).reshape(-1, 1, 1, 1)
    batch["x"] = torch.where(mask, x.flip(-1), x)
    return batch


class SeedDataset(Dataset):
    """Seeds ``offset .. offset + num_samples - 1`` (and a class label per seed) for generation."""

    def __init__(self, num_samples: int, offset: int = 0, num_classes: int = 0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.offset, self.num_classes = num_samples, offset, num_classes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        seed = self.offset + index
        label = seed % self.num_classes if self.num_classes > 0 else -1
        return {"seed": torch.tensor(seed, dtype=torch.long), "label": torch.tensor(label, dtype=torch.long)}


class DiffusionDataModule(L.LightningDataModule):
    """Base class: loaders, splits and shapes shared by all datasets.

    Subclasses set ``self.data_shape`` and ``self.num_classes`` in ``__init__`` and implement
    :meth:`build_dataset`.

    Args:
        batch_size: per-device training batch size (the global batch is ``batch_size * world_size``).
        val_batch_size: per-device batch size for validation / test (default: ``batch_size``).
        num_workers: DataLoader workers.
        x_flip: random horizontal flips of training images (EDM's x-flip augmentation), applied to each batch
            after it reaches the device; the coin for each image depends only on (seed, epoch, index).
        predict_num_samples: how many samples ``dpmot predict`` generates.
        predict_batch_size: per-device batch size for generation.
        predict_seed_offset: first per-sample seed for generation.
    """

    data_shape: tuple[int, ...]
    num_classes: int

    def __init__(
        self,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        x_flip: bool = False,
        predict_num_samples: int = 64,
        predict_batch_size: int = 64,
        predict_seed_offset: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1 or null, got {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if predict_num_samples < 1 or predict_batch_size < 1:
            raise ValueError(
                f"predict_num_samples and predict_batch_size must be >= 1, got {predict_num_samples} and "
                f"{predict_batch_size}"
            )
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.x_flip = x_flip
        self.predict_num_samples = predict_num_samples
        self.predict_batch_size = predict_batch_size
        self.predict_seed_offset = predict_seed_offset
        self._datasets: dict[str, Dataset] = {}

    @property
    def name(self) -> str:
        """Short identifier of the dataset and its preprocessing (used as a cache key for real statistics)."""
        return type(self).__name__

    @abstractmethod
    def build_dataset(self, split: Split) -> Dataset:
        """Return the dataset of one split (items as described in the module docstring)."""

    def dataset(self, split: Split) -> Dataset:
        """The (cached) dataset of ``split``."""
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededRandomSampler(dataset) if shuffle else None,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        if len(dataset) < self.batch_size:
            raise ValueError(
                f"{self.name}: the training split has {len(dataset)} items, fewer than batch_size={self.batch_size}"
            )
        # drop_last: every rank sees equally shaped batches, which all_gather-based couplings need.
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=True)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.x_flip and trainer is not None and trainer.training and isinstance(batch, dict) and "index" in batch:
            apply_x_flip(batch, len(self.dataset("train")), global_seed(), trainer.current_epoch)
        return batch

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.val_batch_size, shuffle=False, drop_last=False)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        seeds = SeedDataset(self.predict_num_samples, self.predict_seed_offset, self.num_classes)
        return self._loader(seeds, self.predict_batch_size, shuffle=False, drop_last=False)
