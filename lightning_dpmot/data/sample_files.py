"""Reading generated samples back: the ``dpmot predict`` outputs used as the "fake" data of a discriminator.

:func:`load_samples` accepts

* ``samples.npz`` written by :class:`~lightning_dpmot.callbacks.SampleWriter` (array ``x`` (N, *S) float32 in
  [-1, 1]; read with ``allow_pickle=False``);
* a ``.pt`` file holding a tensor (N, *S) or a dict with ``x`` (``torch.load(weights_only=True)``);
* a directory of PNGs (the writer's per-seed ``<seed:06d>.png``, sorted by name; ``grid.png`` is skipped), or a
  predictions directory holding a ``samples.npz`` (preferred over its PNGs).

Every problem (missing path, unknown format, wrong shape, image values outside [-1, 1], NaN/inf, no samples) raises one
``ValueError`` / ``FileNotFoundError`` naming the path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

#: Slack on the [-1, 1] range check (float rounding of clamped samples).
RANGE_TOL = 1e-3


def _read_pngs(paths: list[Path]) -> Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(p)) for p in paths]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"{paths[0].parent}: the PNGs differ in size or channels")
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1.0
    return x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def _read(path: Path) -> Tensor:
    if path.is_dir():
        if (path / "samples.npz").is_file():
            return _read(path / "samples.npz")
        pngs = sorted(p for p in path.glob("*.png") if p.name != "grid.png")
        if not pngs:
            raise ValueError(f"samples directory {path} holds neither samples.npz nor sample PNGs")
        return _read_pngs(pngs)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise ValueError(f"samples file {path} has no array 'x' (it has {sorted(data.files)})")
            return torch.from_numpy(np.asarray(data["x"], dtype=np.float32))
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        x = obj.get("x") if isinstance(obj, dict) else obj
        if not isinstance(x, Tensor):
            raise ValueError(f"samples file {path} holds no tensor (a tensor or a dict with 'x' is expected)")
        return x.float()
    raise ValueError(f"samples {path}: expected a samples.npz, a .pt file or a directory of PNGs")


def load_samples(path: str | Path, data_shape: tuple[int, ...] | None = None) -> Tensor:
    """Generated samples (N, *S) float32 in [-1, 1] from ``path`` (formats: module docstring).

    Args:
        path: the file or directory.
        data_shape: the expected per-sample shape S (checked when given).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"samples not found: {path} (a dpmot predict samples.npz, a .pt or a PNG directory)")
    x = _read(path)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"samples {path}: expected (N, *S) with N >= 1, got shape {tuple(x.shape)}")
    if data_shape is not None and tuple(x.shape[1:]) != tuple(data_shape):
        raise ValueError(f"samples {path}: shape {tuple(x.shape[1:])} per sample, the data's is {tuple(data_shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"samples {path}: contains NaN/inf")
    if x.ndim != 4:
        return x.contiguous()  # points: no range
    lo, hi = float(x.min()), float(x.max())
    if lo < -1 - RANGE_TOL or hi > 1 + RANGE_TOL:
        raise ValueError(f"samples {path}: values in [{lo:.3f}, {hi:.3f}], expected images in [-1, 1]")
    return x.clamp(-1, 1).contiguous()


__all__ = ["load_samples"]
