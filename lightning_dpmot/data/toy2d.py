"""2-D toy mixtures for mode-mixing experiments: 8 Gaussians, a 5x5 grid of Gaussians, two moons.

Geometry (``scale`` = 1, the default), chosen so points lie roughly in [-1, 1]^2 like image pixels:

* ``"8gaussians"``: centres ``(cos 2πk/8, sin 2πk/8)``, k = 0..7, on the unit circle; neighbours are
  2 sin(π/8) ≈ 0.765 apart, 15 std at the default ``std = 0.05``.
* ``"grid25"``: centres on the 5x5 grid ``{-1, -0.5, 0, 0.5, 1}^2`` (label = 5 * row + column, row along y);
  neighbours are 0.5 apart (10 std).
* ``"moons"``: scikit-learn's two half circles (upper: (cos t, sin t), lower: (1 - cos t, 0.5 - sin t),
  t ~ U[0, π]), shifted by (-0.5, -0.25) and scaled by 2/3, so x ∈ [-1, 1], y ∈ [-0.5, 0.5]; isotropic
  Gaussian noise of std ``std`` is added in these final coordinates. The "centre" of a moon is the mean of its
  noise-free arc: (-1/3, 2/3 (2/π - 1/4)) ≈ (-0.333, 0.258) for the upper moon (label 0) and
  (1/3, -0.258) for the lower one (label 1).

``scale`` multiplies every centre and arc (not ``std``). Labels are the mode index; every split holds each
mode exactly ``n // K`` or ``n // K + 1`` times. Train and val are drawn from independent streams seeded by
``(seed, split)``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule, Split, TensorDictDataset

Toy2DName = Literal["8gaussians", "grid25", "moons"]
TOY2D_NAMES: tuple[str, ...] = ("8gaussians", "grid25", "moons")

_MOONS_SHIFT = np.array([-0.5, -0.25])
_MOONS_SCALE = 2.0 / 3.0


def _check_name(dataset: str) -> None:
    if dataset not in TOY2D_NAMES:
        raise ValueError(f"dataset must be one of {TOY2D_NAMES}, got {dataset!r}")


def toy2d_centers(dataset: Toy2DName, scale: float = 1.0) -> Tensor:
    """Mode centres of a toy mixture.

    Args:
        dataset: ``"8gaussians"``, ``"grid25"`` or ``"moons"`` (moons: the means of the noise-free arcs).
        scale: factor applied to the geometry.

    Returns:
        (K, 2) float32, row k = centre of label k.
    """
    _check_name(dataset)
    if dataset == "8gaussians":
        angles = 2 * np.pi * np.arange(8) / 8
        centers = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif dataset == "grid25":
        ticks = np.linspace(-1.0, 1.0, 5)
        row, col = np.divmod(np.arange(25), 5)
        centers = np.stack([ticks[col], ticks[row]], axis=1)
    else:
        arc_means = np.array([[0.0, 2 / np.pi], [1.0, 0.5 - 2 / np.pi]])
        centers = (arc_means + _MOONS_SHIFT) * _MOONS_SCALE
    return torch.from_numpy(centers * scale).to(torch.float32)


def sample_toy2d(
    dataset: Toy2DName, num_samples: int, std: float, scale: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``num_samples`` points with balanced labels.

    Args:
        dataset: mixture name.
        num_samples: N.
        std: per-coordinate noise std (mixtures: each Gaussian's std; moons: noise around the arcs).
        scale: factor applied to the geometry (not to ``std``).
        rng: NumPy generator.

    Returns:
        ``(x, labels)``: (N, 2) float32 and (N,) int64 mode indices.
    """
    _check_name(dataset)
    num_modes = 2 if dataset == "moons" else len(toy2d_centers(dataset))
    labels = rng.permutation(np.arange(num_samples) % num_modes)
    if dataset == "moons":
        t = rng.uniform(0.0, np.pi, size=num_samples)
        upper = np.stack([np.cos(t), np.sin(t)], axis=1)
        lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], axis=1)
        arcs = np.where(labels[:, None] == 0, upper, lower)
        mean = (arcs + _MOONS_SHIFT) * _MOONS_SCALE * scale
    else:
        mean = toy2d_centers(dataset, scale).double().numpy()[labels]
    x = mean + std * rng.standard_normal((num_samples, 2))
    return torch.from_numpy(x).to(torch.float32), torch.from_numpy(labels.astype(np.int64))


class Toy2DDataModule(DiffusionDataModule):
    """2-D toy mixtures: ``"8gaussians"`` (unit circle), ``"grid25"`` (5x5 grid on [-1, 1]^2), ``"moons"``.

    Batches: ``x`` (B, 2) float32, ``label`` (B,) int64 mode index, ``index`` (B,). ``centers`` (K, 2) and
    ``mode_std`` describe the geometry for metrics (see the module docstring for the exact values).

    Args:
        dataset: which mixture.
        num_train: training points.
        num_val: validation points.
        std: per-coordinate std of each Gaussian mode (moons: of the noise around the arcs).
        scale: factor applied to centres and arcs (not to ``std``).
        seed: data seed (train and val use independent streams derived from it).
        batch_size: per-device training batch size (default 256 here).
        predict_num_samples: how many samples ``dpmot predict`` generates (default 2,000 here).
        predict_batch_size: per-device batch size for generation (default 2,000 here).
        **kwargs: the other loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule`
            (``x_flip`` must stay false: points have no left-right flip).
    """

    def __init__(
        self,
        dataset: Toy2DName = "8gaussians",
        num_train: int = 20_000,
        num_val: int = 2_000,
        std: float = 0.05,
        scale: float = 1.0,
        seed: int = 0,
        batch_size: int = 256,
        predict_num_samples: int = 2_000,
        predict_batch_size: int = 2_000,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("x_flip"):
            raise ValueError("x_flip flips images left-right and is meaningless for 2-D points; set x_flip: false")
        super().__init__(
            batch_size=batch_size,
            predict_num_samples=predict_num_samples,
            predict_batch_size=predict_batch_size,
            **kwargs,
        )
        _check_name(dataset)
        if num_train < 1 or num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not (std > 0 and math.isfinite(std)) or not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"std and scale must be positive and finite, got std={std}, scale={scale}")
        self.mixture: Toy2DName = dataset
        self.num_train, self.num_val = num_train, num_val
        self.std, self.scale, self.seed = std, scale, seed
        self.centers = toy2d_centers(dataset, scale)
        self.data_shape = (2,)
        self.num_classes = len(self.centers)

    @property
    def mode_std(self) -> float | None:
        """Per-coordinate std of every Gaussian mode; ``None`` for moons (modes are arcs, not Gaussians)."""
        return None if self.mixture == "moons" else self.std

    @property
    @override
    def name(self) -> str:
        """E.g. ``"toy2d-8gaussians-std0.05-scale1-seed0"``."""
        return f"toy2d-{self.mixture}-std{self.std:g}-scale{self.scale:g}-seed{self.seed}"

    @override
    def build_dataset(self, split: Split) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        split_id = 0 if split == "train" else 1
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, split_id]))
        n = self.num_train if split == "train" else self.num_val
        x, labels = sample_toy2d(self.mixture, n, self.std, self.scale, rng)
        return TensorDictDataset(x, labels)
