"""One safe way to read and write checkpoints.

Reading: :func:`load_checkpoint` is the only checkpoint loader of the project. It always uses
``torch.load(..., weights_only=True)`` (no code runs from a checkpoint, whatever its source), refuses remote URLs
unless ``DPMOT_ALLOW_REMOTE_CKPT=1`` (and then downloads to a temporary file and still loads weights-only), and turns
every way a file can be broken (missing, empty, truncated, random bytes, not a checkpoint, a pickle with code in it)
into one :class:`CheckpointError` (a ``ValueError``) that names the file.

Writing: :func:`atomic_save` writes to ``.<name>.partial`` beside the target, ``fsync``\\ s it, renames it over the
target and ``fsync``\\ s the directory: a kill at any moment leaves either the previous file or the new one, never a
half-written one. :class:`SafeCheckpointIO` is the Lightning ``CheckpointIO`` plugin with both (the CLI installs it),
so ``trainer.save_checkpoint``, ``ModelCheckpoint`` and ``fit/validate/test/predict --ckpt_path`` all go through here.
It also refuses to write a checkpoint whose weights are NaN/inf.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

from lightning_dpmot.errors import NonFiniteError

ALLOW_REMOTE_ENV = "DPMOT_ALLOW_REMOTE_CKPT"
MapLocation = str | torch.device | Callable[..., Any] | dict[str, str] | None
# ckpt_path values Lightning resolves itself (to local files that then load through SafeCheckpointIO)
LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class NonFiniteCheckpointError(NonFiniteError):
    """Refusal to write a checkpoint whose weights are NaN/inf (see :class:`SafeCheckpointIO`)."""


def is_remote(path_or_url: str | os.PathLike[str]) -> bool:
    """True for URLs such as ``http://…``, ``https://…``, ``s3://…`` (``file://`` and plain paths are local)."""
    scheme = urllib.parse.urlparse(str(path_or_url)).scheme
    return "://" in str(path_or_url) and scheme not in ("", "file")


def remote_allowed() -> bool:
    """Whether ``DPMOT_ALLOW_REMOTE_CKPT=1`` is set."""
    return os.environ.get(ALLOW_REMOTE_ENV, "").strip().lower() in ("1", "true", "yes")


def download_checkpoint(url: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to a temporary file (deleted at interpreter exit is the caller's job) and return its path.

    Raises:
        CheckpointError: remote checkpoints are not allowed, or the download failed.
    """
    if not remote_allowed():
        raise CheckpointError(
            f"checkpoint {url} is a remote URL; refusing to download it (set {ALLOW_REMOTE_ENV}=1 to allow remote "
            "checkpoints; they are then still loaded with weights_only=True), or download it yourself and pass the file"
        )
    suffix = Path(urllib.parse.urlparse(url).path).suffix or ".ckpt"
    fd, tmp = tempfile.mkstemp(prefix="dpmot-remote-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            scheme = urllib.parse.urlparse(url).scheme
            if scheme in ("http", "https"):
                with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (scheme checked)
                    shutil.copyfileobj(response, out)
            else:
                import fsspec

                with fsspec.open(url, "rb") as src:
                    shutil.copyfileobj(src, out)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(f"checkpoint {url} could not be downloaded: {type(err).__name__}: {err}") from err
    return Path(tmp)


def _first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's are long and multi-line)."""
    for line in str(err).splitlines():
        if line.strip():
            return line.strip().split(". ")[0][:200]
    return type(err).__name__


def _refused_global(err: BaseException) -> str | None:
    """The detail of a weights_only refusal ('unsupported GLOBAL posix.system …'), if present."""
    for line in str(err).splitlines():
        low = line.lower()
        if "unsupported global" in low or "unsupported operand" in low or "weightsunpickler error" in low:
            return line.strip()[:200]
    return None


def _looks_like_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive (``PK\\x03\\x04``); legacy files start with a pickle protocol byte."""
    with path.open("rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_local_checkpoint(
    path: str | os.PathLike[str], map_location: MapLocation = "cpu", *, name: str | None = None
) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with one clear :class:`CheckpointError` naming the file for any failure.

    Args:
        path: a local file.
        map_location: as for :func:`torch.load`.
        name: how to name the checkpoint in messages (default: ``path``; e.g. the URL it was downloaded from).
    """
    path = Path(path)
    label = name or str(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {label}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {label} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {label} is empty (0 bytes): the save that wrote it did not finish")
    if not _looks_like_checkpoint(path):  # PermissionError propagates with the file named
        raise CheckpointError(
            f"checkpoint {label} is not a PyTorch checkpoint ({size} bytes that are neither a torch.save zip archive "
            "nor a pickle)"
        )
    try:
        with path.open("rb") as f:  # PermissionError propagates with the file named
            checkpoint = torch.load(f, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as err:
        refused = _refused_global(err)
        if refused is not None or "weights only load failed" in str(err).lower():
            raise CheckpointError(
                f"checkpoint {label} was refused by the safe loader (weights_only=True): it holds Python objects that "
                f"are not plain tensors/containers ({refused or _first_line(err)}); it is not a checkpoint this "
                "project wrote, and loading it could run code"
            ) from err
        raise CheckpointError(f"checkpoint {label} is corrupt ({size} bytes; {_first_line(err)})") from err
    except (EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint {label} is truncated or corrupt ({size} bytes; {type(err).__name__})"
        ) from err
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {label} is not a readable PyTorch checkpoint: truncated or corrupt ({size} bytes; "
            f"{_first_line(err)})"
        ) from err
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise CheckpointError(
            f"checkpoint {label} is not a readable PyTorch checkpoint ({size} bytes; {type(err).__name__}: "
            f"{_first_line(err)})"
        ) from err
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {label} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def load_checkpoint(path_or_url: str | os.PathLike[str], map_location: MapLocation = "cpu") -> dict[str, Any]:
    """Load a checkpoint from a file or (when ``DPMOT_ALLOW_REMOTE_CKPT=1``) a URL, always with ``weights_only=True``.

    Args:
        path_or_url: a local path, ``file://`` URL, or a remote URL (``http(s)://``, ``s3://`` …).
        map_location: as for :func:`torch.load` (default ``"cpu"``).
    Returns:
        The checkpoint dictionary.
    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: remote URL not allowed, download failed, or the file is empty/truncated/corrupt/unsafe.
    """
    text = str(path_or_url)
    if text.startswith("file://"):
        return load_local_checkpoint(urllib.parse.urlparse(text).path, map_location)
    if is_remote(text):
        local = download_checkpoint(text)
        try:
            return load_local_checkpoint(local, map_location, name=text)
        finally:
            local.unlink(missing_ok=True)
    return load_local_checkpoint(text, map_location)


def load_lightning_module(
    path_or_url: str | os.PathLike[str], map_location: MapLocation = "cpu", cls: type | None = None
) -> Any:
    """Rebuild a LightningModule from a checkpoint through :func:`load_checkpoint` (weights-only, errors name the file).

    Args:
        path_or_url: as for :func:`load_checkpoint`.
        map_location: as for :func:`torch.load`.
        cls: the class whose ``load_from_checkpoint`` to use (default: ``lightning.LightningModule``, i.e. the class
            recorded in the checkpoint by the CLI).
    """
    import lightning as L

    checkpoint = load_checkpoint(path_or_url, map_location)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    cls = cls or L.LightningModule
    try:
        return cls.load_from_checkpoint(buffer, map_location=map_location, weights_only=True)
    except (TypeError, KeyError, AttributeError, ImportError) as err:
        raise CheckpointError(
            f"checkpoint {path_or_url} could not be turned into a model ({type(err).__name__}: {_first_line(err)})"
        ) from err


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The temporary file :func:`atomic_save` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` (tmp file + fsync + rename + dir fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _tensors(state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, Mapping):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                yield str(key), value
            elif isinstance(value, Mapping):
                for sub, tensor in _tensors(value):
                    yield f"{key}.{sub}", tensor


def nonfinite_weights(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of floating-point weight tensors with NaN/inf in ``state_dict`` / ``current_model_state``."""
    bad = []
    for section in ("state_dict", "current_model_state"):
        for name, tensor in _tensors(checkpoint.get(section, {})):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{section}.{name}" if section != "state_dict" else name)
    return bad


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, finite-only writes and weights-only loads through :func:`load_checkpoint`.

    ``weights_only=False`` requests are refused: no checkpoint may run code. Remote targets (``s3://`` …) are
    written with Lightning's own (fsspec transaction) implementation.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = nonfinite_weights(checkpoint)
        if bad:
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {path} at step {checkpoint.get('global_step', '?')}: {len(bad)} weight "
                f"tensor(s) hold NaN/inf (first: {bad[0]}); the previous checkpoint is kept"
            )
        if is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local files")
        atomic_save(checkpoint, path)

    @override
    def load_checkpoint(
        self, path: Any, map_location: Any | None = "cpu", weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                f"checkpoint {path}: weights_only=False was requested; this project loads checkpoints with "
                "weights_only=True only (a checkpoint must not be able to run code)"
            )
        return load_checkpoint(path, map_location if map_location is not None else "cpu")
