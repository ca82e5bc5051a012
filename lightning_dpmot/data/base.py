"""Shared DataModule base: dict batches, [-1, 1] images, ``drop_last`` training loaders, seeded predictions.

Every DataModule of the project yields dict batches::

    {"x": (B, *data_shape) float32 in [-1, 1], "label": (B,) int64 (if the data has labels),
     "index": (B,) int64}

``data_shape`` and ``num_classes`` are known right after ``__init__`` (no file access), so LightningCLI can
link them into the model at instantiation. ``predict_dataloader`` yields ``{"seed": (B,) int64, **conditions}``:
one seed per generated sample (EDM's per-image seeds), so predictions do not depend on batch size or device count,
and the conditions of :func:`generation_conditions` (``"label": (B,)`` for class data) — the one place that says
which condition a seed generates. Training loaders resume mid-epoch exactly (:mod:`.loading`).

Image datasets may keep their pixels as uint8 (4x less memory than float32; CIFAR-10's 50k training images
take 150 MB instead of 600 MB): :class:`TensorDictDataset` converts each item to float32 in [-1, 1] on access.
:func:`split_indices` gives the seeded, stratified train/val splits of datasets without an official one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_dpmot.data.loading import EpochSeededRandomSampler, ResumableDataLoader
from lightning_dpmot.utils.random import global_seed, make_generator

Split = Literal["train", "val"]
_FLIP = 12  # generator purpose tag (11: the shuffle, in .loading)
_POOL_INDEX = 21  # generator purpose of OT pools (the value the OT callback used: pools stay bit-identical)
_POOL_FLIP_EPOCH = 1_000_000  # pool k's x-flip coins are those of "epoch" 1_000_000 + k


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


def generation_conditions(seeds: Tensor, num_classes: int) -> dict[str, Tensor]:
    """The condition mapping of the samples generated from ``seeds``: the project's one label rule.

    Args:
        seeds: (B,) int64 per-sample seeds (any shape works; the result has the same shape).
        num_classes: classes of the data; 0 for unlabelled data.

    Returns:
        ``{"label": seeds % num_classes}`` (int64, on ``seeds``' device) when ``num_classes > 0``, else ``{}``.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    if num_classes == 0:
        return {}
    return {"label": seeds.to(torch.long) % num_classes}


class SeedDataset(Dataset):
    """Seeds ``offset .. offset + num_samples - 1`` for generation, each with its conditions.

    ``conditions`` is the DataModule's :meth:`DiffusionDataModule.generation_conditions` (default: the class-label
    rule for ``num_classes``); it is evaluated once for all seeds here, so items are plain values and the dataset
    pickles for worker processes. Items: ``{"seed": () int64, **conditions}`` — batches are ``{"seed": (B,),
    "label": (B,)}`` for class data, ``{"seed": (B,)}`` for unlabelled data, and carry prompt entries (lists of
    strings) for captioned data.
    """

    def __init__(
        self,
        num_samples: int,
        offset: int = 0,
        num_classes: int = 0,
        conditions: Callable[[Tensor], dict[str, Any]] | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples, self.offset, self.num_classes = num_samples, offset, num_classes
        self.seeds = torch.arange(offset, offset + num_samples, dtype=torch.long)
        rule = conditions or (lambda seeds: generation_conditions(seeds, num_classes))
        self.conditions = dict(rule(self.seeds))
        for key, value in self.conditions.items():
            if len(value) != num_samples:
                raise ValueError(f"generation condition {key!r} has {len(value)} entries for {num_samples} seeds")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"seed": self.seeds[index], **{k: v[index] for k, v in self.conditions.items()}}


def _stack(values: list[Any], device: torch.device | str) -> Any:
    """Stack tensors into one (P, ...) tensor on ``device``; other values stay a list of P."""
    return torch.stack(values).to(device) if all(isinstance(v, Tensor) for v in values) else values


class DiffusionDataModule(L.LightningDataModule):
    """Base class: loaders, splits and shapes shared by all datasets; it owns the loader arguments.

    Subclasses take their own arguments plus ``**kwargs`` passed on to this ``__init__`` (LightningCLI follows
    them here, so ``data.init_args.batch_size`` works for every subclass), set ``self.data_shape`` and
    ``self.num_classes`` in ``__init__``, and implement :meth:`build_dataset`.

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

    def generation_conditions(self, seeds: Tensor) -> dict[str, Tensor]:
        """(B,) int64 seeds -> the condition mapping of those samples (see :func:`generation_conditions`)."""
        return generation_conditions(seeds, self.num_classes)

    def _ranks(self) -> tuple[int, int]:
        """``(num_replicas, rank)`` of the attached trainer's data-parallel split; ``(1, 0)`` without one."""
        kwargs = getattr(self.trainer, "distributed_sampler_kwargs", None)
        return (int(kwargs["num_replicas"]), int(kwargs["rank"])) if kwargs else (1, 0)

    def check_batch_size(self) -> None:
        """Raise if a rank's share of the training split cannot fill one ``batch_size`` batch (loaders drop it)."""
        n, (world, _) = len(self.dataset("train")), self._ranks()
        per_rank = -(-n // world)
        if per_rank < self.batch_size:
            share = f" ({per_rank} per rank on {world} ranks)" if world > 1 else ""
            raise ValueError(
                f"{self.name}: batch_size={self.batch_size} is larger than the training split of {n} items{share}; "
                f"lower data.init_args.batch_size to at most {per_rank}"
            )

    @override
    def setup(self, stage: str) -> None:
        # Runs before the sanity check and the first step: a batch that cannot be filled fails here, not later.
        if stage == "fit":
            self.check_batch_size()

    @override
    def train_dataloader(self) -> DataLoader:
        self.check_batch_size()
        dataset = self.dataset("train")
        world, rank = self._ranks()
        # drop_last: every rank sees equally shaped batches, which all_gather-based couplings need.
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(dataset, num_replicas=world, rank=rank),
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = self.trainer
        if self.x_flip and trainer is not None and trainer.training and isinstance(batch, dict) and "index" in batch:
            apply_x_flip(batch, len(self.dataset("train")), global_seed(), trainer.current_epoch)
        return batch

    def draw_pool(self, size: int, rank: int, pool_index: int, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Draw a pool of ``size`` distinct training items (OT pool mode), from counter-based generators.

        The items are a seeded permutation's first ``size`` of the training split, keyed by (run seed, ``rank``,
        ``pool_index``), so a resumed run redraws the same pool; with ``x_flip`` each pool gets its own coins.

        Args:
            size: pool size P (at most the training split's size).
            rank: global rank drawing the pool.
            pool_index: how many pools this rank drew before.
            device: where the pool goes.

        Returns:
            The stacked items: ``{"x": (P, *data_shape), "index": (P,)[, "label": (P,)]}`` on ``device``;
            entries that are not tensors (e.g. captions) as lists of P values.
        """
        dataset = self.dataset("train")
        if len(dataset) < size:
            raise ValueError(f"pool_size={size} exceeds the training split ({len(dataset)} items)")
        seed = global_seed()
        gen = make_generator(seed, rank, pool_index, _POOL_INDEX)
        idx = torch.randperm(len(dataset), generator=gen)[:size]
        items = [dataset[int(i)] for i in idx]
        pool = {key: _stack([item[key] for item in items], device) for key in items[0]}
        if self.x_flip and pool["x"].ndim == 4:
            apply_x_flip(pool, len(dataset), seed, _POOL_FLIP_EPOCH + pool_index)
        return pool

    def _loader(self, dataset: Dataset, batch_size: int) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.val_batch_size)

    @override
    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @override
    def predict_dataloader(self) -> DataLoader:
        seeds = SeedDataset(
            self.predict_num_samples, self.predict_seed_offset, self.num_classes, self.generation_conditions
        )
        return self._loader(seeds, self.predict_batch_size)
