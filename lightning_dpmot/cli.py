"""The composition root: ``dpmot {fit,validate,test,predict} --config configs/....yaml``.

Lightning 2.x ships no ``lightning fit`` command; ``dpmot`` (or ``python -m lightning_dpmot``) is this project's
LightningCLI. Models and DataModules are chosen by ``class_path`` in YAML (subclass mode); the DataModule's
``data_shape`` and ``num_classes`` are linked into the model, which builds its network from them.

Reliability (see the README's reliability section):

- ``--ckpt_path`` (file or URL) is loaded only through :mod:`lightning_dpmot.utils.checkpoint_io` with
  ``weights_only=True``; remote URLs are refused unless ``DPMOT_ALLOW_REMOTE_CKPT=1``. Every trainer gets
  :class:`~lightning_dpmot.utils.checkpoint_io.SafeCheckpointIO` (atomic writes, weights-only loads).
- Hyperparameters stored in the checkpoint are merged into the config (Lightning's behaviour), but a flag given
  on the command line that disagrees with them is an error in ``fit`` (resume must be faithful) and wins with a
  warning in ``validate``/``test``/``predict`` (network architecture excepted); a checkpoint of another model class,
  network, ``data_shape`` or ``num_classes`` is refused with a message naming both.
- Every trainer gets :class:`~lightning_dpmot.callbacks.GracefulShutdown` (SIGTERM/SIGINT → checkpoint → exit
  143/130) and :class:`~lightning_dpmot.callbacks.NonFiniteGuard` (NaN/inf → exit 3) unless the config has them,
  and :class:`~lightning_dpmot.callbacks.summary.RunSummary` (rank 0 prints the run folder, checkpoints, final
  metrics and new files at the end).
- ``num_threads`` (top level, like ``seed_everything``) pins ``torch.set_num_threads`` before anything is built.
- Relative logger ``save_dir``\\ s are relative to ``trainer.default_root_dir`` when it is set; an unwritable output
  directory is an error before anything runs; a failed run leaves no empty ``version_N/``.
- User errors print one ``dpmot: error: …`` line and exit 2 (non-finite values: 3); ``DPMOT_DEBUG=1`` re-raises.

For a newcomer: ``dpmot --help`` lists the shipped configs, the project's classes and examples
(:mod:`lightning_dpmot.cli_help`); runs from a training run's checkpoint write into that run's folder
(:mod:`lightning_dpmot.run_dirs`); every run ends with a short summary (:mod:`lightning_dpmot.callbacks.summary`).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override

from lightning_dpmot.callbacks.model_summary import CompactModelSummary
from lightning_dpmot.callbacks.nonfinite import NonFiniteGuard
from lightning_dpmot.callbacks.signals import GracefulShutdown
from lightning_dpmot.callbacks.summary import RunSummary
from lightning_dpmot.cli_checks import (
    _flatten,
    _is_explicit,
    _plain,
    _same_class,
    _say,
    _set_in_hparams,
    _short,
    check_config_files,
    check_writable,
    explicit_model_keys,
    upgraded_hparams,
)
from lightning_dpmot.cli_help import (
    DPMOTArgumentParser,
    HelpFormatter,
    add_subcommands,
    import_project_classes,
    main_epilog,
)
from lightning_dpmot.errors import NonFiniteError, TrainingInterrupted
from lightning_dpmot.run_dirs import (
    STAMP_ENV,
    explicit_output_flags,
    logger_configs,
    name_wandb_loggers,
    redirect_to_training_run,
    run_stamp,
    training_run_dir,
)
from lightning_dpmot.utils.checkpoint_io import (
    LIGHTNING_CKPT_ALIASES,
    CheckpointError,
    SafeCheckpointIO,
    download_checkpoint,
    is_remote,
    load_local_checkpoint,
)

USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
    ValueError,
    KeyError,
)
# files a run writes before its first step; a version folder holding nothing else is removed after a failure
_SETUP_ONLY_FILES = {"config.yaml", "hparams.yaml"}


class SaveConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` to the log directory (Lightning's behaviour) and also into the wandb run's config."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            config_path = Path(trainer.log_dir or trainer.default_root_dir) / self.config_filename  # collective
            state = "absent"
            if trainer.is_global_zero and config_path.is_file():
                resuming = stage == "fit" and bool(self.config.get("ckpt_path"))
                same = resuming and config_path.read_text() == self.parser.dump(self.config, skip_none=False)
                state = "same" if same else "different"
            state = trainer.strategy.broadcast(state)
            if state == "same":  # a requeued job resuming (--ckpt_path) in its own fixed log directory
                self.already_saved = True
                return
            if state == "different":
                raise FileExistsError(
                    f"{config_path} already exists: that log directory belongs to an earlier run and would be "
                    "overwritten; choose another --trainer.default_root_dir (or logger name/version), or move it away "
                    "(resuming with --ckpt_path and the identical config in the same log directory is allowed)"
                )
        super().setup(trainer, pl_module, stage)

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs on rank 0 only: no collectives here.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="yaml")
                logger.experiment.config.update(yaml.safe_load(config), allow_val_change=True)


_LINKED = ("data_shape", "num_classes")


def _same_value(stored: Any, wanted: Any) -> bool:
    """A checkpoint's stored value equals the config's (a function equals its dotted import path)."""
    if callable(wanted) and isinstance(stored, str):
        return stored == f"{getattr(wanted, '__module__', '')}.{getattr(wanted, '__qualname__', '')}"
    return _plain(stored) == wanted


class DPMOTCLI(LightningCLI):
    """LightningCLI with the project's links, defaults and safety checks (see the module docstring)."""

    _ckpt_hparams: dict[str, Any] | None = None
    _ckpt_label: str | None = None
    _explicit: set[str] = set()  # noqa: RUF012 - replaced per instance
    _argv: tuple[Any, ...] = ()
    _ckpt_dirpaths: list[str] = []  # noqa: RUF012 - replaced per instance

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--num_threads",
            type=Optional[int],  # noqa: UP045  (a runtime type for jsonargparse)
            default=None,
            help="torch.set_num_threads before anything is built (results are bit-reproducible for a fixed count)",
        )

    # ---- parsing ------------------------------------------------------------------------------------------------
    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        add_subcommands(self, parser, **kwargs)  # one-line help per subcommand (cli_help.SUBCOMMAND_HELP)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = sys.argv[1:] if args is None else args
        self._explicit = explicit_model_keys(argv) if isinstance(argv, (list, tuple)) else set()
        self._argv = tuple(argv) if isinstance(argv, (list, tuple)) else ()
        super().parse_arguments(parser, args)

    @override
    def _parse_ckpt_path(self) -> None:
        """Load ``ckpt_path`` safely and merge its hyperparameters into the config, refusing conflicts."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise CheckpointError(
                "--weights_only false is not supported: checkpoints are always loaded with weights_only=True"
            )
        if "weights_only" in config:
            config["weights_only"] = True
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in LIGHTNING_CKPT_ALIASES or str(ckpt_path).startswith("registry"):
            return
        label = str(ckpt_path)
        if is_remote(label):
            local = download_checkpoint(label)  # refused unless DPMOT_ALLOW_REMOTE_CKPT=1
            atexit.register(local.unlink, missing_ok=True)
            config["ckpt_path"] = str(local)
        elif label.startswith("file://"):
            config["ckpt_path"] = label[len("file://") :]
        checkpoint = load_local_checkpoint(config["ckpt_path"], "cpu", name=label)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        states = (checkpoint.get("callbacks") or {}).values()
        self._ckpt_dirpaths = [str(s["dirpath"]) for s in states if isinstance(s, dict) and s.get("dirpath")]
        del checkpoint
        hparams.pop("_instantiator", None)
        self._ckpt_hparams, self._ckpt_label = dict(hparams), label
        if not hparams:
            return
        if "_class_path" in hparams:
            class_path = hparams.pop("_class_path")
            hparams = {"class_path": class_path, "dict_kwargs": upgraded_hparams(class_path, hparams)}
        self._check_hparams(subcommand, label, hparams)
        try:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"dpmot: error: the hyperparameters stored in checkpoint {label} do not parse\n")
            raise

    def _check_hparams(self, subcommand: str, label: str, hparams: dict[str, Any]) -> None:
        """Wrong model → error; explicit flags that disagree → error (fit) or flag wins (evaluation)."""
        wanted = _flatten(_plain(self.config[subcommand].get("model")))
        stored_tree = {"class_path": hparams.get("class_path"), "init_args": hparams.get("dict_kwargs", {})}
        stored = _flatten(_plain(stored_tree))
        stored_desc = ", ".join(
            f"{k} {stored[k]}" for k in ("net.class_path", "data_shape", "num_classes") if stored.get(k) is not None
        )
        for key in sorted(k for k in stored if k.endswith("class_path")):
            if key in wanted and wanted[key] is not None and stored[key] is not None:
                if not _same_class(wanted[key], stored[key]):
                    what = "model class" if key == "class_path" else f"{key.rsplit('.', 1)[0]} class"
                    raise CheckpointError(
                        f"checkpoint {label} holds {_short(stored['class_path'])} ({stored_desc}), but the config asks "
                        f"for {what} {_short(wanted[key])} where the checkpoint has {_short(stored[key])}: it is a "
                        "checkpoint of another model"
                    )
        conflicts = [
            k
            for k in sorted(stored)
            if k in wanted
            and wanted[k] is not None
            and not k.endswith("class_path")
            and k not in _LINKED  # set from the DataModule at instantiation; checked in after_instantiate_classes
            and not _same_value(stored[k], wanted[k])
        ]
        for key in conflicts:
            both = (
                f"the command line gives {key}={wanted[key]!r} but checkpoint {label} was trained with {stored[key]!r}"
            )
            if _is_explicit(key, self._explicit):
                if subcommand == "fit" or key.startswith("net."):
                    reason = (
                        "resuming must use the checkpoint's hyperparameters; drop the flag, or start a new run"
                        if subcommand == "fit"
                        else "the network's weights cannot take another architecture"
                    )
                    raise ValueError(f"{both} ({reason})")
                _say(f"warning: {both}; using {wanted[key]!r}")
                _set_in_hparams(hparams["dict_kwargs"], key, wanted[key])
            else:
                _say(
                    f"warning: the config gives model {key}={wanted[key]!r} but checkpoint {label} holds "
                    f"{stored[key]!r}; using the checkpoint's value"
                )

    # ---- before building anything --------------------------------------------------------------------------------
    def _subconfig(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    @override
    def before_instantiate_classes(self) -> None:
        config = self._subconfig()
        threads = config.get("num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {threads}")
            torch.set_num_threads(threads)
        trainer = config.get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir")
        if self.subcommand is not None:
            check_writable(root or os.getcwd(), "trainer.default_root_dir" if root else "the working directory")
        for logger in logger_configs(trainer.get("logger")):
            init_args = logger.get("init_args")
            save_dir = init_args.get("save_dir") if init_args is not None else None
            if save_dir is None:
                continue
            if root and not Path(save_dir).expanduser().is_absolute():
                init_args["save_dir"] = str(Path(root) / save_dir)
            if self.subcommand is not None:
                check_writable(init_args["save_dir"], f"{_short(logger.get('class_path'))} save_dir")
        if self.subcommand is not None:
            self._place_outputs(config, trainer)

    def _place_outputs(self, config: Namespace, trainer: Namespace) -> None:
        """One experiment, one folder (:mod:`lightning_dpmot.run_dirs`): runs from a training run's checkpoint write
        into that run's folder; unnamed wandb loggers take the CSV logger's name."""
        name_wandb_loggers(trainer)
        run = training_run_dir(config.get("ckpt_path"))
        if run is None or explicit_output_flags(self._argv) or self.subcommand is None:
            return
        for dirpath in self._ckpt_dirpaths:  # the spelling ModelCheckpoint saved, so it restores its state
            if Path(dirpath).absolute() == run / "checkpoints":
                run = Path(dirpath).parent
        stamp = run_stamp()
        os.environ[STAMP_ENV] = stamp  # DDP workers started by the launcher pick the same folder
        folder = redirect_to_training_run(trainer, self.subcommand, run, stamp)
        if self.subcommand == "fit" and (run / self.save_config_kwargs.get("config_filename", "config.yaml")).is_file():
            self.save_config_kwargs["config_filename"] = f"config-resume-{stamp}.yaml"
        what = "continuing in" if self.subcommand == "fit" else "writing to"
        _say(f"{what} {os.path.relpath(folder)} (the folder of the checkpoint's training run)")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        config = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", config.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if not any(isinstance(c, GracefulShutdown) for c in callbacks):
            callbacks.append(GracefulShutdown())
        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard())
        if not any(isinstance(c, RunSummary) for c in callbacks):
            callbacks.append(RunSummary())  # where the outputs went and the final metrics, at the end
        if config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks
        ):
            callbacks.append(CompactModelSummary())  # Lightning's table without the FLOPs column of zeros
            kwargs["enable_model_summary"] = False  # so Lightning adds no default summary (and says nothing)
        kwargs["callbacks"] = callbacks
        plugins = kwargs.get("plugins", config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        strategy = str(config.get("strategy", "auto")).lower()
        if not any(isinstance(p, CheckpointIO) for p in plugins) and not any(
            s in strategy for s in ("fsdp", "deepspeed", "xla")
        ):
            plugins.append(SafeCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    @override
    def after_instantiate_classes(self) -> None:
        hparams, data = self._ckpt_hparams, getattr(self, "datamodule", None)
        if not hparams or data is None:
            return
        for key in ("data_shape", "num_classes"):
            stored, given = _plain(hparams.get(key)), _plain(getattr(data, key, None))
            if stored is not None and given is not None and stored != given:
                raise CheckpointError(
                    f"checkpoint {self._ckpt_label} holds a {_short(hparams.get('_class_path', 'model'))} for "
                    f"{key} {stored}, but the data ({type(data).__name__}) gives {key} {given}: it is a checkpoint of "
                    "another model or dataset"
                )

    # ---- running -------------------------------------------------------------------------------------------------
    @override
    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_log_dirs()
            raise

    def _remove_empty_log_dirs(self) -> None:
        """After a failure: delete version folders that hold nothing but what setup wrote (config/hparams)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero:
            return
        name = str(self.save_config_kwargs.get("config_filename", ""))
        if name.startswith("config-resume-") and trainer.loggers:  # logger.log_dir: no collective on rank 0 alone
            resumed = Path(trainer.loggers[0].log_dir or ".") / name
            if resumed.is_file():
                written = resumed.stat().st_mtime
                if not any(p.stat().st_mtime > written for p in resumed.parent.rglob("*.ckpt")):
                    resumed.unlink()  # a resume that failed before saving a checkpoint leaves no record of itself
        for logger in trainer.loggers:
            try:
                log_dir = getattr(logger, "log_dir", None)
            except Exception:  # noqa: BLE001 - a logger that cannot say where it writes has nothing to clean
                continue
            if not log_dir or not Path(log_dir).is_dir():
                continue
            files = [p for p in Path(log_dir).rglob("*") if p.is_file() or p.is_symlink()]
            if all(p.name in _SETUP_ONLY_FILES for p in files):
                shutil.rmtree(log_dir, ignore_errors=True)
                parent = Path(log_dir).parent  # e.g. runs/quickstart, if this was its only version
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()


def _one_line(err: BaseException) -> str:
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip())


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DPMOTCLI:
    """Run the CLI (``args`` for programmatic use, e.g. tests) and return it."""
    debug = bool(os.environ.get("DPMOT_DEBUG"))
    own_stamp = STAMP_ENV not in os.environ  # set for this command's DDP workers only
    from lightning_dpmot.utils.quiet import install_warning_filters

    install_warning_filters(args)  # narrow filters for harmless third-party warnings (see utils/quiet.py)
    try:
        check_config_files(sys.argv[1:] if args is None else args if isinstance(args, list) else [])
        import_project_classes()  # known subclasses in --help; short names (--model EDMModule)
        cli = DPMOTCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToLoggers,
            parser_class=DPMOTArgumentParser,
            parser_kwargs={
                "parser_mode": "omegaconf",
                "allow_abbrev": False,
                "prog": "dpmot",
                "description": "Diffusion models (EDM, DDPM, DPM-OT, AOT, text-to-image) on PyTorch Lightning.",
                "epilog": main_epilog(),
                "formatter_class": HelpFormatter,
            },
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    except TrainingInterrupted as err:
        _say(str(err))
        raise
    except NonFiniteError as err:
        if debug:
            raise
        print(
            f"dpmot: error: {type(err).__name__}: {_one_line(err)} (DPMOT_DEBUG=1 shows the traceback)", file=sys.stderr
        )
        raise SystemExit(err.exit_code) from err
    except USER_ERRORS as err:
        if debug:
            raise
        print(
            f"dpmot: error: {type(err).__name__}: {_one_line(err)} (DPMOT_DEBUG=1 shows the traceback)", file=sys.stderr
        )
        raise SystemExit(2) from err
    except MisconfigurationException as err:  # e.g. a GPU config on a machine without one
        if debug:
            raise
        hint = ""
        if "gpu" in str(err).lower() or "cuda" in str(err).lower():
            hint = f"; this machine has no usable GPU (torch {torch.__version__}): use --trainer.accelerator cpu"
        print(f"dpmot: error: trainer configuration: {_one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        if own_stamp:
            os.environ.pop(STAMP_ENV, None)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # gloo aborts at interpreter exit otherwise
    return cli


def console_main() -> None:
    """The ``dpmot`` console script: exit status 0 on success (``main``'s return value is for Python callers)."""
    main()


if __name__ == "__main__":
    console_main()
