"""The composition root: ``dpmot {fit,validate,test,predict} --config configs/....yaml``.

Lightning 2.x ships no ``lightning fit`` command; ``dpmot`` (or ``python -m lightning_dpmot``) is this project's
LightningCLI. Models and DataModules are chosen by ``class_path`` in YAML (subclass mode); the DataModule's
``data_shape`` and ``num_classes`` are linked into the model, which builds its network from them.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from typing_extensions import override


class SaveConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` to the log directory (Lightning's behaviour) and also into the wandb run's config."""

    @override
    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Runs on rank 0 only: no collectives here.
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = self.parser.dump(self.config, skip_none=False, format="yaml")
                import yaml

                logger.experiment.config.update(yaml.safe_load(config), allow_val_change=True)


class DPMOTCLI(LightningCLI):
    """LightningCLI with the project's links and defaults."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.data_shape", "model.init_args.data_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def main(args: list[str] | dict[str, Any] | None = None, run: bool = True) -> DPMOTCLI:
    """Run the CLI (``args`` for programmatic use, e.g. tests) and return it."""
    try:
        cli = DPMOTCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToLoggers,
            parser_kwargs={"parser_mode": "omegaconf"},
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        if os.environ.get("DPMOT_DEBUG"):
            raise
        print(f"dpmot: error: {type(err).__name__}: {err}\n(set DPMOT_DEBUG=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from err
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # gloo aborts at interpreter exit otherwise
    return cli


def console_main() -> None:
    """The ``dpmot`` console script: exit status 0 on success (``main``'s return value is for Python callers)."""
    main()


if __name__ == "__main__":
    console_main()
