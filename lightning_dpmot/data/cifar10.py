"""CIFAR-10 (32x32 RGB, 10 classes) from the official python-pickle batches, with an opt-in verified download.

Expected layout: ``<root>/cifar-10-batches-py/{data_batch_1 .. data_batch_5, test_batch}`` (or ``root``
pointing at ``cifar-10-batches-py`` itself). Each batch is a pickled dict with ``b"data"``: (N, 3072) uint8,
each row the red, green and blue 32x32 planes in row-major order, and ``b"labels"``: N ints in 0..9. The
"train" split is the 50,000 images of the five data batches, "val" the 10,000 of the official test batch.

Security: pickle can execute code, so only files the user pointed at are read, and through a restricted
unpickler that resolves nothing but the NumPy array constructors the official batches need; any other global
in the stream raises an error instead of running.

Pixels stay uint8 in memory (150 MB for the training set) and become float32 in [-1, 1] per item.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.request
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_dpmot.data.base import DiffusionDataModule, Split, TensorDictDataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_VAL_FILES = ("test_batch",)
CIFAR10_FILES = CIFAR10_TRAIN_FILES + CIFAR10_VAL_FILES
CIFAR10_NUM_TRAIN = 50_000
CIFAR10_NUM_CLASSES = 10

# The only globals a CIFAR-10 batch (a dict of bytes, lists and NumPy arrays) refers to; ``_codecs.encode`` is
# how Python 3 writes bytes under pickle protocol 2 (it only re-encodes a string).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except NumPy's array reconstruction."""

    @override
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one official CIFAR-10 python batch.

    Args:
        path: a ``data_batch_*`` or ``test_batch`` file.

    Returns:
        ``(images, labels)``: (N, 3, 32, 32) uint8 and (N,) int64.
    """
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path}: expected a dict with keys b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: b'labels' must be a list of integers ({err})") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise ValueError(
            f"{path}: b'data' must be (N, 3072) uint8 with N labels, got {data.shape} {data.dtype} "
            f"and labels of shape {labels.shape}"
        )
    bad = (labels < 0) | (labels >= CIFAR10_NUM_CLASSES)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{path}: {int(bad.sum())} label(s) outside 0..{CIFAR10_NUM_CLASSES - 1}, the first at row {first} "
            f"({int(labels[first])}); not an official CIFAR-10 batch"
        )
    images = rearrange(data, "n (c h w) -> n c h w", c=3, h=32, w=32)
    return np.ascontiguousarray(images), labels


def find_cifar10_dir(root: Path) -> Path | None:
    """``root/cifar-10-batches-py`` or ``root`` itself, whichever holds all six batch files; else ``None``."""
    for folder in (root / CIFAR10_DIR, root):
        if all((folder / name).is_file() for name in CIFAR10_FILES):
            return folder
    return None


def download_url(url: str, dest: Path) -> None:
    """Download ``url`` to the file ``dest`` (no checks; see :func:`download_cifar10`)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


def file_digests(path: Path) -> tuple[str, str]:
    """Hex ``(MD5, SHA-256)`` digests of a file, read once."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return md5.hexdigest(), sha256.hexdigest()


def archive_mismatch(path: Path) -> str | None:
    """``None`` if ``path`` has the official archive's MD5 and SHA-256, else a sentence saying which differ."""
    md5, sha256 = file_digests(path)
    wrong = [
        f"{name} {got} (expected {want})"
        for name, got, want in (("MD5", md5, CIFAR10_MD5), ("SHA-256", sha256, CIFAR10_SHA256))
        if got != want
    ]
    return f"{path}: " + " and ".join(wrong) if wrong else None


def _aside_name(path: Path) -> Path:
    """A free name ``<path>.corrupt``, ``<path>.corrupt-1``, ... beside ``path``."""
    candidate, n = path.with_name(path.name + ".corrupt"), 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.corrupt-{n}")
    return candidate


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a .tar.gz into ``dest`` without ever writing outside it or overwriting a file.

    Every member is checked before anything is written: absolute paths, ``..`` components, links and special
    files are rejected. Files that already exist are left as they are.

    Returns:
        The files written.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith(("/", "\\")) or os.path.isabs(member.name) or ".." in parts:
                raise ValueError(f"{archive}: refusing unsafe member path {member.name!r}")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing member {member.name!r} (only files and folders allowed)")
        written = []
        for member in members:
            target = dest.joinpath(*PurePosixPath(member.name).parts)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:
                raise ValueError(f"{archive}: cannot read member {member.name!r}")
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out)
            written.append(target)
    return written


def download_cifar10(root: Path) -> Path:
    """Fetch and extract CIFAR-10 into ``root`` unless already there; returns the batch folder.

    An existing ``root/cifar-10-python.tar.gz`` is reused when its MD5 and SHA-256 are the official ones
    (:data:`CIFAR10_MD5`, :data:`CIFAR10_SHA256`). One that does not match is never deleted: it is renamed to
    ``cifar-10-python.tar.gz.corrupt`` (``.corrupt-1``, ... if taken) and a fresh copy is downloaded. Downloads go
    to ``cifar-10-python.tar.gz.part`` and become the archive only once both digests match; a download that does
    not match is removed and nothing is extracted. Extraction never overwrites a file.
    """
    found = find_cifar10_dir(root)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    archive = root / CIFAR10_ARCHIVE
    if archive.is_file():
        mismatch = archive_mismatch(archive)
        if mismatch is not None:
            aside = _aside_name(archive)
            archive.rename(aside)
            warnings.warn(
                f"{mismatch}: not the official CIFAR-10 archive; moved it to {aside} (delete it yourself if it is of "
                f"no use) and downloading a fresh copy from {CIFAR10_URL}",
                stacklevel=2,
            )
    if not archive.is_file():
        partial = root / (CIFAR10_ARCHIVE + ".part")
        try:
            download_url(CIFAR10_URL, partial)
            mismatch = archive_mismatch(partial)
            if mismatch is not None:
                raise ValueError(
                    f"the download of {CIFAR10_URL} does not verify: {mismatch}; it was discarded and nothing was "
                    f"extracted. Retry, or download the archive by hand into {archive}"
                )
            partial.rename(archive)
        finally:
            partial.unlink(missing_ok=True)
    safe_extract(archive, root)
    found = find_cifar10_dir(root)
    if found is None:
        raise FileNotFoundError(f"{archive} did not contain {CIFAR10_DIR}/ with {', '.join(CIFAR10_FILES)}")
    return found


class CIFAR10DataModule(DiffusionDataModule):
    """CIFAR-10 32x32 RGB (50,000 train / 10,000 test images, 10 classes) from the python-pickle batches.

    Batches: ``x`` (B, 3, 32, 32) float32 in [-1, 1], ``label`` (B,) int64, ``index`` (B,). Validation uses
    the official test batch. Batch files are unpickled with a restricted unpickler, and only from ``root``.

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or that folder itself).
        download: fetch the official archive into ``root`` if the batches are missing (MD5- and SHA-256-checked;
            a mismatching archive already there is moved aside, never deleted).
        subset: use only the first N training images (debugging and tests); ``null`` uses all 50,000.
        **kwargs: the loader arguments of :class:`~lightning_dpmot.data.base.DiffusionDataModule` (``batch_size``,
            ``num_workers``, ``x_flip``, ``predict_num_samples``, ...).
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        subset: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if subset is not None and not 1 <= subset <= CIFAR10_NUM_TRAIN:
            raise ValueError(f"subset must be in 1..{CIFAR10_NUM_TRAIN} or null, got {subset}")
        self.root = Path(root).expanduser()
        self.download = download
        self.subset = subset
        self.data_shape = (3, 32, 32)
        self.num_classes = 10

    @property
    @override
    def name(self) -> str:
        """``"cifar10-32px"``, or ``"cifar10-32px-subset1000"`` with a subset."""
        return "cifar10-32px" + (f"-subset{self.subset}" if self.subset is not None else "")

    @override
    def prepare_data(self) -> None:
        # Lightning calls this on one process per node before setup: the only place that downloads under DDP.
        if self.download:
            download_cifar10(self.root)

    def batch_dir(self) -> Path:
        """The folder holding the six batch files (downloading first if ``download``)."""
        found = download_cifar10(self.root) if self.download else find_cifar10_dir(self.root)
        if found is None:
            raise FileNotFoundError(
                f"CIFAR-10 not found: searched {self.root / CIFAR10_DIR} and {self.root} for "
                f"{', '.join(CIFAR10_FILES)}. Set `download: true` on the data module to fetch it, or "
                f"download {CIFAR10_URL} and extract it into {self.root}"
            )
        return found

    @override
    def build_dataset(self, split: Split) -> Dataset:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        folder = self.batch_dir()
        limit = self.subset if split == "train" and self.subset is not None else None
        images, labels, count = [], [], 0
        for name in CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_VAL_FILES:
            if limit is not None and count >= limit:
                break
            batch_images, batch_labels = read_cifar_batch(folder / name)
            images.append(batch_images)
            labels.append(batch_labels)
            count += len(batch_images)
        x, y = np.concatenate(images), np.concatenate(labels)
        if limit is not None:
            if len(x) < limit:
                raise ValueError(f"subset={limit} but {folder} holds only {len(x)} training images")
            x, y = x[:limit], y[:limit]
        return TensorDictDataset(torch.from_numpy(x), torch.from_numpy(y))
