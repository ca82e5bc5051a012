"""One experiment, one folder: where ``dpmot`` runs that start from a training run's checkpoint write.

A checkpoint at ``<run>/checkpoints/<file>.ckpt`` (``<run>`` holding the ``config.yaml``, ``hparams.yaml`` or
``metrics.csv`` of a training run, e.g. ``runs/quickstart/version_3``) ties a later run to that training run:

- ``validate``/``test``/``predict`` write into ``<run>/<subcommand>-<YYYYmmdd-HHMMSS>/`` (with the logger's name
  when an evaluation config renamed it: ``<run>/test-eval-solvers-<time>/``) instead of a new ``version_N``;
- ``fit`` (a resume) continues in ``<run>`` itself: its CSV metrics are appended to (``ResumableCSVLogger``) and the
  resumed run's config is saved beside the first one as ``config-resume-<time>.yaml``.

Nothing changes when the command line sets the logger or ``trainer.default_root_dir`` (``--trainer.logger...``).
:func:`name_wandb_loggers` gives a wandb logger without a name the name (and folder) of the CSV logger beside it,
so ``--config configs/loggers/wandb.yaml`` keeps the experiment's ``runs/<name>/`` folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jsonargparse import Namespace

__all__ = [
    "RUN_MARKERS",
    "explicit_output_flags",
    "logger_configs",
    "name_wandb_loggers",
    "redirect_to_training_run",
    "run_stamp",
    "training_run_dir",
]

RUN_MARKERS = ("config.yaml", "hparams.yaml", "metrics.csv")
_DEFAULT_NAMES = ("", "lightning_logs")
_CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
_RESUMABLE_CSV_LOGGER = "lightning_dpmot.loggers.ResumableCSVLogger"
STAMP_ENV = "DPMOT_RUN_STAMP"  # shared with the processes a DDP launcher starts, so every rank agrees


def run_stamp() -> str:
    """``YYYYmmdd-HHMMSS`` of this command (inherited by its DDP worker processes through ``DPMOT_RUN_STAMP``)."""
    return os.environ.get(STAMP_ENV) or time.strftime("%Y%m%d-%H%M%S")


def training_run_dir(ckpt_path: Any) -> Path | None:
    """The training run folder of a checkpoint at ``<run>/checkpoints/<file>``, or ``None``."""
    if not ckpt_path or not isinstance(ckpt_path, (str, os.PathLike)):
        return None
    path = Path(ckpt_path).expanduser()
    if not path.is_file() or path.parent.name != "checkpoints":
        return None
    run = path.parent.parent.absolute()
    return run if any((run / marker).is_file() for marker in RUN_MARKERS) else None


def explicit_output_flags(argv: Iterable[Any]) -> bool:
    """Whether the command line chooses the outputs itself (``--trainer.logger...``, ``--trainer.default_root_dir``)."""
    return any(
        isinstance(token, str) and token.startswith(("--trainer.logger", "--trainer.default_root_dir"))
        for token in argv
    )


def logger_configs(logger: Any) -> list[Namespace]:
    """The ``{class_path, init_args}`` entries of a parsed ``trainer.logger`` value."""
    if isinstance(logger, Namespace):
        return [logger]
    if isinstance(logger, list):
        return [item for item in logger if isinstance(item, Namespace)]
    return []


def _is_wandb(logger: Namespace) -> bool:
    return "wandb" in str(logger.get("class_path", "")).lower()


def _is_folder_logger(logger: Namespace) -> bool:
    """A logger writing to ``save_dir/name/version`` (CSV, TensorBoard)."""
    args = logger.get("init_args")
    keys = ("save_dir", "name", "version")
    return isinstance(args, Namespace) and not _is_wandb(logger) and all(k in args for k in keys)


def _set(args: Namespace, **values: Any) -> None:
    for key, value in values.items():
        args[key] = value


def name_wandb_loggers(trainer: Namespace) -> None:
    """Unnamed wandb loggers get the name of the first CSV/TensorBoard logger, and its ``save_dir/name`` folder
    when they share its ``save_dir`` (``configs/loggers/wandb.yaml`` added to an experiment's config)."""
    loggers = logger_configs(trainer.get("logger"))
    folder = next((lg for lg in loggers if _is_folder_logger(lg)), None)
    if folder is None:
        return
    name, save_dir = folder.init_args.get("name"), folder.init_args.get("save_dir")
    if not name or name in _DEFAULT_NAMES:
        return
    for logger in loggers:
        args = logger.get("init_args")
        if not _is_wandb(logger) or not isinstance(args, Namespace) or args.get("name"):
            continue
        args["name"] = str(name)
        if save_dir is not None and str(args.get("save_dir")) == str(save_dir):
            args["save_dir"] = str(Path(save_dir) / str(name))


def _free(folder: Path) -> Path:
    candidate, n = folder, 2
    while candidate.exists():
        candidate, n = folder.with_name(f"{folder.name}-{n}"), n + 1
    return candidate


def redirect_to_training_run(trainer: Namespace, subcommand: str, run: Path, stamp: str) -> Path:
    """Point the loggers of ``trainer`` at training run ``run`` (see the module docstring); return the log folder."""
    loggers = logger_configs(trainer.get("logger"))
    if subcommand == "fit":
        for logger in loggers:
            if _is_folder_logger(logger):
                if logger.get("class_path") == _CSV_LOGGER:
                    logger["class_path"] = _RESUMABLE_CSV_LOGGER  # append to metrics.csv, do not replace it
                _set(logger.init_args, save_dir=str(run.parent), name="", version=run.name)
        return run
    if trainer.get("logger") in (None, True):  # Lightning's default logger would start runs/lightning_logs/...
        trainer["logger"] = loggers = [
            Namespace(class_path=_CSV_LOGGER, init_args=Namespace(save_dir=str(run), name="", version=None))
        ]
    folder_loggers = [lg for lg in loggers if _is_folder_logger(lg)]
    renamed = next((str(lg.init_args.name) for lg in folder_loggers if lg.init_args.get("name")), "")
    label = subcommand if renamed in (*_DEFAULT_NAMES, run.parent.name) else f"{subcommand}-{renamed}"
    folder = _free(run / f"{label}-{stamp}")
    for logger in loggers:
        if any(logger is lg for lg in folder_loggers):
            _set(logger.init_args, save_dir=str(run), name="", version=folder.name)
        elif _is_wandb(logger) and isinstance(logger.get("init_args"), Namespace):
            logger.init_args["save_dir"] = str(folder)
            if not logger.init_args.get("name"):
                logger.init_args["name"] = f"{run.parent.name}/{run.name}/{folder.name}"
    return folder
