"""DataModules yielding dict batches ``{"x", "label", "index"}`` with images in [-1, 1] (see :mod:`.base`)."""

from lightning_dpmot.data.base import (
    DiffusionDataModule,
    SeedDataset,
    TensorDictDataset,
    generation_conditions,
    split_indices,
)
from lightning_dpmot.data.captioned import CaptionedImagesDataModule
from lightning_dpmot.data.cifar10 import CIFAR10DataModule
from lightning_dpmot.data.digits import DigitsDataModule
from lightning_dpmot.data.image_folder import ImageFolderDataModule
from lightning_dpmot.data.loading import EpochSeededRandomSampler, ResumableDataLoader
from lightning_dpmot.data.shapes import ShapesCaptionsDataModule
from lightning_dpmot.data.toy2d import Toy2DDataModule

__all__ = [
    "CIFAR10DataModule",
    "CaptionedImagesDataModule",
    "DiffusionDataModule",
    "DigitsDataModule",
    "EpochSeededRandomSampler",
    "ImageFolderDataModule",
    "ResumableDataLoader",
    "SeedDataset",
    "ShapesCaptionsDataModule",
    "TensorDictDataset",
    "Toy2DDataModule",
    "generation_conditions",
    "split_indices",
]
