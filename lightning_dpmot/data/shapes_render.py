"""Coloured-shape scenes: vocabulary, the 3x3 layout grid, counter-based scene sampling and vectorised rendering.

A scene holds 1-3 objects, each a (shape, colour, size) triple placed in one cell of a 3x3 grid over the image:

* simple scene: one object in any of the 9 cells (relation ``none``);
* ``left_of``: two objects in one row (any two of its three cells);
* ``above``: two objects in one column;
* ``between``: three objects filling one row or one column.

Objects are stored in **reading order** (increasing cell index ``3 * row + col``: left to right in a row, top to
bottom in a column), so the relations are exact: for ``left_of``/``above`` object 0 is left of / above object 1,
for ``between`` object 1 lies between objects 0 and 2 (:data:`MENTION_ORDER` gives the order a caption mentions
them). Scene arrays (NumPy, N scenes)::

    objects      (N, 3, 3) int64  (shape, colour, size) per slot in reading order, -1 padded
    num_objects  (N,)      int64  1..3
    relation     (N,)      int64  index into RELATIONS (0 = none)
    cells        (N, 3)    int64  grid cell per slot (3 * row + col), -1 padded

Sampling is counter-based (SplitMix64 of (seed, split, index, draw)): scene ``i`` of a split depends only on
(seed, split, i), never on the split's size. Within a scene the (shape, colour) pairs are distinct. Held-out
pairs (:data:`HELDOUT_PAIRS`) never occur in ``train``/``val``; every ``heldout`` scene has exactly one of them
(in a random slot) and seen pairs elsewhere.

Rendering looks up anti-aliased coverage stamps (one per shape x size x cell, supersampled, cached per
resolution) and composites them over a black background: thousands of images per second on one core.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange, reduce
from torch import Tensor

SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
RELATIONS = ("none", "left_of", "above", "between")
#: RGB in [0, 1] of each colour: distinct hues, all with maximum channel 1, so the per-pixel maximum over RGB of a
#: render is exactly the objects' coverage (shape is readable independently of colour).
COLOUR_RGB = (
    np.array(
        [
            [255, 45, 45],  # red
            [57, 255, 85],  # green
            [44, 89, 255],  # blue
            [255, 239, 54],  # yellow
            [182, 73, 255],  # purple
            [255, 146, 31],  # orange
            [255, 255, 255],  # white
            [58, 243, 255],  # cyan
        ],
        dtype=np.float32,
    )
    / 255.0
)
#: Object side (bounding box) as a fraction of a grid cell, per size.
SIZE_FRACTION = (0.55, 0.85)
GRID = 3
NUM_CELLS = GRID * GRID
MAX_OBJECTS = 3
#: (shape, colour) pairs never seen in train/val: 4 of 32 (12.5 %), one per shape, four different colours.
HELDOUT_PAIRS = ((0, 7), (1, 3), (2, 2), (3, 4))  # cyan square, yellow circle, blue triangle, purple cross
SEEN_PAIRS = tuple((s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS)) if (s, c) not in HELDOUT_PAIRS)
#: Order in which a caption mentions the slots, per relation (-1 = unused).
MENTION_ORDER = np.array([[0, -1, -1], [0, 1, -1], [0, 1, -1], [1, 0, 2]], dtype=np.int64)
SPLIT_TAGS = {"train": 1, "val": 2, "heldout": 3}

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_LAYOUTS = {  # relation -> list of cell tuples in reading order
    1: [(3 * r + a, 3 * r + b) for r in range(GRID) for a, b in ((0, 1), (0, 2), (1, 2))],
    2: [(3 * a + c, 3 * b + c) for c in range(GRID) for a, b in ((0, 1), (0, 2), (1, 2))],
    3: [(3 * r, 3 * r + 1, 3 * r + 2) for r in range(GRID)] + [(c, 3 + c, 6 + c) for c in range(GRID)],
}


@dataclass(frozen=True)
class SceneArrays:
    """N scenes as arrays (shapes and meaning: module docstring)."""

    objects: np.ndarray
    num_objects: np.ndarray
    relation: np.ndarray
    cells: np.ndarray

    def __len__(self) -> int:
        return len(self.num_objects)

    def take(self, idx: np.ndarray | slice) -> SceneArrays:
        """The scenes at ``idx`` (any NumPy index)."""
        return SceneArrays(self.objects[idx], self.num_objects[idx], self.relation[idx], self.cells[idx])


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _draws(seed: int, split: str, index: np.ndarray, num_draws: int) -> np.ndarray:
    """(N, num_draws) uint64 hashes of (seed, split, index, draw)."""
    key = _splitmix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(SPLIT_TAGS[split]))
    h = _splitmix(key ^ index.astype(np.uint64))
    return _splitmix(h[:, None] ^ (np.arange(1, num_draws + 1, dtype=np.uint64)[None, :] * np.uint64(0x632BE5AB)))


def _below(u: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Uniform integers in [0, n) from uint64 hashes (bias < 2^-40)."""
    return ((u >> np.uint64(11)) % np.asarray(n, dtype=np.uint64)).astype(np.int64)


def _distinct3(u: np.ndarray, pool: int) -> np.ndarray:
    """(N, 3) distinct indices into a pool of ``pool`` items from (N, 3) hashes (sequential draws, skip-taken)."""
    a = _below(u[:, 0], pool)
    b = _below(u[:, 1], pool - 1)
    b = b + (b >= a)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    c = _below(u[:, 2], pool - 2)
    c = c + (c >= lo)
    c = c + (c >= hi)
    return np.stack([a, b, c], axis=1)


def sample_scenes(seed: int, split: str, index: np.ndarray, complex_fraction: float = 0.5) -> SceneArrays:
    """Scenes ``index`` of ``split``, each a function of (seed, split, index) only.

    Args:
        seed: data seed.
        split: ``"train"``, ``"val"`` or ``"heldout"``.
        index: (N,) non-negative int64 item indices.
        complex_fraction: probability of a complex scene (2-3 objects); relations of complex scenes are uniform
            over ``left_of``, ``above``, ``between``.

    Returns:
        :class:`SceneArrays` of N scenes.
    """
    if split not in SPLIT_TAGS:
        raise ValueError(f"split must be one of {sorted(SPLIT_TAGS)}, got {split!r}")
    if not 0.0 <= complex_fraction <= 1.0:
        raise ValueError(f"complex_fraction must be in [0, 1], got {complex_fraction}")
    index = np.asarray(index, dtype=np.int64)
    if index.ndim != 1 or (index.size and index.min() < 0):
        raise ValueError(f"index must be a 1-D array of non-negative integers, got shape {index.shape}")
    n = len(index)
    u = _draws(seed, split, index, 11)
    is_complex = (u[:, 0] >> np.uint64(11)).astype(np.float64) * 2.0**-53 < complex_fraction
    relation = np.where(is_complex, 1 + _below(u[:, 1], 3), 0)
    num_objects = np.where(relation == 3, 3, np.where(relation > 0, 2, 1))
    cells = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    cells[:, 0] = _below(u[:, 2], NUM_CELLS)  # simple scenes; complex ones are overwritten below
    for rel, layouts in _LAYOUTS.items():
        rows = relation == rel
        table = np.array(layouts, dtype=np.int64)
        cells[rows, : table.shape[1]] = table[_below(u[rows, 2], len(table))]
    pairs = np.array(SEEN_PAIRS, dtype=np.int64)[_distinct3(u[:, 3:6], len(SEEN_PAIRS))]  # (N, 3, 2)
    if split == "heldout":
        slot = _below(u[:, 6], num_objects)
        pairs[np.arange(n), slot] = np.array(HELDOUT_PAIRS, dtype=np.int64)[_below(u[:, 7], len(HELDOUT_PAIRS))]
    sizes = _below(u[:, 8:11], len(SIZES))
    objects = np.concatenate([pairs, sizes[:, :, None]], axis=2)
    objects[np.arange(MAX_OBJECTS)[None, :] >= num_objects[:, None]] = -1
    return SceneArrays(objects, num_objects.astype(np.int64), relation.astype(np.int64), cells)


def relation_from_cells(cells: np.ndarray) -> np.ndarray:
    """The relation a set of occupied cells expresses, -1 where it expresses none of ours.

    Args:
        cells: (N, 3) cell indices in reading order, -1 padded (at least one cell per row).

    Returns:
        (N,) int64: 0 for one object, 1 (``left_of``) / 2 (``above``) for two in a row / column, 3 (``between``)
        for three filling a row or column, -1 otherwise (two diagonal objects, an empty scene, ...).
    """
    cells = np.asarray(cells, dtype=np.int64)
    count = (cells >= 0).sum(1)
    row, col = cells // GRID, cells % GRID
    same_row = (row[:, 1] == row[:, 0]) & ((count < 3) | (row[:, 2] == row[:, 0]))
    same_col = (col[:, 1] == col[:, 0]) & ((count < 3) | (col[:, 2] == col[:, 0]))
    out = np.full(len(cells), -1, dtype=np.int64)
    out[count == 1] = 0
    out[(count == 2) & same_row] = 1
    out[(count == 2) & same_col] = 2
    out[(count == 3) & (same_row | same_col)] = 3
    return out


def _inside(shape: int, dx: Tensor, dy: Tensor, side: float) -> Tensor:
    """Boolean mask of points (dx, dy) (offsets from the centre, y down) inside a shape of bounding side ``side``."""
    h = side / 2
    if shape == 0:  # square
        return (dx.abs() <= h) & (dy.abs() <= h)
    if shape == 1:  # circle
        return dx**2 + dy**2 <= h**2
    if shape == 2:  # triangle, apex up, base at the bottom of the box
        return (dy <= h) & (dx.abs() <= (dy + h) / 2)
    arm = side / 6  # cross: two bars one third of the side wide
    return ((dx.abs() <= arm) & (dy.abs() <= h)) | ((dy.abs() <= arm) & (dx.abs() <= h))


@functools.lru_cache(maxsize=8)
def coverage_stamps(resolution: int, supersample: int = 4) -> Tensor:
    """Anti-aliased coverage of every (shape, size, cell) object: the rendering lookup table.

    Args:
        resolution: image side R.
        supersample: sub-samples per pixel side (coverage = mean over ``supersample**2`` points).

    Returns:
        (len(SHAPES) * len(SIZES) * NUM_CELLS + 1, R, R) float32 in [0, 1]; row ``(shape * 2 + size) * 9 + cell``,
        the last row all zeros (an empty slot).
    """
    if resolution < 8 or supersample < 1:
        raise ValueError(f"resolution must be >= 8 and supersample >= 1, got {resolution} and {supersample}")
    n = resolution * supersample
    coords = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # sub-sample centres in [0, 1]
    cell = 1.0 / GRID
    stamps = []
    for shape in range(len(SHAPES)):
        for size in range(len(SIZES)):
            for c in range(NUM_CELLS):
                cx, cy = (c % GRID + 0.5) * cell, (c // GRID + 0.5) * cell
                dy, dx = torch.meshgrid(coords - cy, coords - cx, indexing="ij")
                stamps.append(_inside(shape, dx, dy, SIZE_FRACTION[size] * cell).to(torch.float32))
    table = reduce(torch.stack(stamps), "k (h a) (w b) -> k h w", "mean", a=supersample, b=supersample)
    return torch.cat([table, torch.zeros(1, resolution, resolution)]).contiguous()


def render_scenes(scenes: SceneArrays, resolution: int, supersample: int = 4) -> Tensor:
    """Render N scenes (vectorised lookup and composite of :func:`coverage_stamps`).

    Args:
        scenes: the scenes.
        resolution: image side R.
        supersample: anti-aliasing sub-samples per pixel side.

    Returns:
        (N, 3, R, R) float32 in [-1, 1]: the objects' colours over a black (-1) background.
    """
    stamps = coverage_stamps(resolution, supersample)
    obj = torch.from_numpy(np.ascontiguousarray(scenes.objects))
    cells = torch.from_numpy(np.ascontiguousarray(scenes.cells))
    empty = obj[..., 0] < 0
    row = (obj[..., 0] * len(SIZES) + obj[..., 2]) * NUM_CELLS + cells
    row = torch.where(empty, torch.full_like(row, len(stamps) - 1), row)
    colour = torch.from_numpy(COLOUR_RGB)[obj[..., 1].clamp_min(0)]  # (N, 3 slots, 3 channels)
    coverage = stamps[rearrange(row, "n k -> (n k)")]
    coverage = rearrange(coverage, "(n k) h w -> n k h w", k=MAX_OBJECTS)
    image = torch.einsum("nkhw,nkc->nchw", coverage, colour)  # objects never overlap: a plain sum
    return image.clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)
