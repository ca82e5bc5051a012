"""A :class:`~lightning.pytorch.loggers.WandbLogger` that stays in one wandb run across requeues and resumes.

A preempted SLURM job is requeued and restarted (``dpmot fit ... --ckpt_path last``) in the same run directory;
a plain ``WandbLogger`` then starts a new wandb run each time. :class:`ResumableWandbLogger` writes the run id to a
file on first start and reads it back on every restart, so the steps of all restarts land in one wandb run
(``resume="allow"``, Lightning's default, continues it).

Which id a run gets, first match wins:

1. ``id=`` (or ``version=``) given to the logger;
2. the ``WANDB_RUN_ID`` environment variable (wandb's own; used as is, the id file is neither read nor written);
3. the id in the id file, when the file exists (a restart);
4. a new id, written to the id file (a first start).

The id file is ``<save_dir>/<project>/wandb_run_id`` unless ``id_file`` names another path: it is fixed for a
fixed ``save_dir`` and ``project``, so one run directory per job means one wandb run per job, and a new run
directory a new one. ``persist_id=False`` turns the file off (plain ``WandbLogger`` behaviour: a new run each
start). Only global rank 0 resolves the id (Lightning creates the wandb run there alone); the file is created
atomically (a hard link of a complete temporary file), so a concurrent start never sees a half-written id and
two concurrent first starts agree on one id.

:class:`ResumableCSVLogger` is the CSV side: Lightning's ``CSVLogger`` deletes ``metrics.csv`` when its log
directory exists, so a restart in a fixed log directory (``version:`` fixed per job) would lose the earlier
starts' rows; this one appends to it instead.
"""

from __future__ import annotations

import csv
import os
import secrets
import string
import tempfile
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

__all__ = ["ID_FILE_NAME", "ResumableCSVLogger", "ResumableWandbLogger", "new_run_id", "read_or_create_id"]

_ID_ALPHABET = string.ascii_lowercase + string.digits
ID_FILE_NAME = "wandb_run_id"


def new_run_id(length: int = 8) -> str:
    """A random wandb-style run id (lowercase letters and digits)."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def read_or_create_id(path: Path) -> str:
    """The id stored in ``path``; if there is none, a new id written there atomically (first writer wins)."""
    if path.is_file():
        stored = path.read_text().strip()
        if stored:
            return stored
        raise ValueError(f"ResumableWandbLogger: the wandb id file {path} is empty; delete it or pass id=")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_run_id() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the file first
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


class ResumableWandbLogger(WandbLogger):
    """``WandbLogger`` whose run id persists in ``<save_dir>/<project>/wandb_run_id`` (see the module docstring).

    Args:
        name: display name of the wandb run.
        save_dir: directory of the wandb files and (by default) of the id file; one per job.
        version: same as ``id``.
        offline: log offline (sync later with ``wandb sync``).
        dir: wandb directory when ``save_dir`` is ``None``.
        id: explicit run id; wins over ``WANDB_RUN_ID`` and the id file.
        anonymous: wandb anonymous mode.
        project: wandb project (default ``WANDB_PROJECT`` or ``lightning_logs``).
        log_model: upload checkpoints as artifacts.
        prefix: prefix of every metric key.
        checkpoint_name: artifact name of uploaded checkpoints.
        id_file: path of the id file (default ``<save_dir or dir>/<project>/wandb_run_id``).
        persist_id: ``False``: no id file (a new run every start unless ``id``/``WANDB_RUN_ID``).
        **kwargs: further ``wandb.init`` arguments (``resume`` defaults to ``"allow"``).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str | os.PathLike[str] = ".",
        version: str | None = None,
        offline: bool = False,
        dir: str | os.PathLike[str] | None = None,
        id: str | None = None,
        anonymous: bool | None = None,
        project: str | None = None,
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        checkpoint_name: str | None = None,
        id_file: str | os.PathLike[str] | None = None,
        persist_id: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            name=name,
            save_dir=save_dir,
            version=version,
            offline=offline,
            dir=dir,
            id=id,
            anonymous=anonymous,
            project=project,
            log_model=log_model,
            prefix=prefix,
            checkpoint_name=checkpoint_name,
            **kwargs,
        )
        self.persist_id = persist_id
        root = Path(self._save_dir if self._save_dir is not None else ".")
        self.id_file = Path(id_file) if id_file is not None else root / str(self._project) / ID_FILE_NAME

    def resolve_id(self) -> str | None:
        """The run id by precedence: ``id=``, ``WANDB_RUN_ID``, the id file, a new id (written to the file)."""
        if self._wandb_init.get("id"):
            return self._wandb_init["id"]
        if os.environ.get("WANDB_RUN_ID"):
            return os.environ["WANDB_RUN_ID"]
        if not self.persist_id:
            return None
        return read_or_create_id(self.id_file)

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The wandb run, created (rank 0) with the resolved id on first access."""
        if self._experiment is None and getattr(self, "_attach_id", None) is None:
            run_id = self.resolve_id()
            if run_id is not None:
                self._wandb_init["id"] = self._id = run_id
        return super().experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is kept and appended to (its columns carried on)."""

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it (restarts of one job in a
    fixed ``version`` directory). Rows logged after the last checkpoint of an interrupted start appear again for
    the steps the restart repeats. Takes ``CSVLogger``'s arguments."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The CSV writer of ``log_dir``, appending to its ``metrics.csv``."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
