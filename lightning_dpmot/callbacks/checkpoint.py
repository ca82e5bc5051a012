"""``last.ckpt`` that is really the last step: at the end, on a step cadence, and after a crash.

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``save_last=True`` refreshes ``last.ckpt``
only when it saves a checkpoint anyway, and with a ``monitor`` that is logged by validation it saves nothing before
the first validation (quickstart: step 220): a crash before it loses the run. Its ``on_train_end`` writes one only if
none was ever written, so when ``max_steps`` ends training between two validations ``last.ckpt`` is left at the
last validation. :class:`LastCheckpoint` fixes the three:

- ``last_every_n_steps``: ``last.ckpt`` every N optimizer steps, whether or not the monitored key exists yet
  (top-k checkpoints keep their own monitor-driven rhythm);
- at the end of training ``last.ckpt`` holds the final step;
- an exception inside the training loop (a data error, a crash in a hook) leaves ``last.ckpt`` of the last
  completed step — except for NaN/inf weights (nothing non-finite is ever written) and Ctrl+C twice.

Writes are atomic when the trainer uses :class:`~lightning_dpmot.utils.checkpoint_io.SafeCheckpointIO` (the
``dpmot`` CLI installs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.callbacks.nonfinite import nonfinite_parameters
from lightning_dpmot.errors import NonFiniteError, TrainingInterrupted


class LastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` follows the training steps.

    Takes ModelCheckpoint's arguments (set ``save_last: true``). Runs in ``on_train_end``, before
    :class:`~lightning_dpmot.callbacks.EMAHalfLife` copies the average into the module (``on_fit_end``), so the
    checkpoint holds the raw weights as the current ones and the EMA weights as the exported ``state_dict``.

    Args:
        last_every_n_steps: also write ``last.ckpt`` every this many optimizer steps, independent of ``monitor``
            and ``every_n_train_steps`` (``None`` or 0: off).
        save_last_on_exception: write ``last.ckpt`` of the last completed step when the training loop raises.
        *args: ModelCheckpoint's positional arguments.
        **kwargs: ModelCheckpoint's keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        last_every_n_steps: int | None = None,
        save_last_on_exception: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if last_every_n_steps is not None and last_every_n_steps < 0:
            raise ValueError(f"LastCheckpoint: last_every_n_steps must be >= 0, got {last_every_n_steps}")
        if last_every_n_steps and not self.save_last:
            raise ValueError("LastCheckpoint: last_every_n_steps needs save_last: true")
        self.last_every_n_steps = last_every_n_steps or 0
        self.save_last_on_exception = save_last_on_exception
        self._last_step_in_last = -1  # global step that last.ckpt holds
        self._dir_to_check: Any = None  # dirpath whose emptiness ModelCheckpoint.setup wanted to warn about

    @override
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_in_last = trainer.global_step

    def _ModelCheckpoint__warn_if_dir_not_empty(self, dirpath: Any) -> None:  # noqa: N802 - overrides the private hook
        """ModelCheckpoint warns "Checkpoint directory ... exists and is not empty" in ``setup``, before the trainer
        knows whether it resumes; decided in ``on_fit_start`` instead (see there)."""
        self._dir_to_check = dirpath

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed from one of this directory's own checkpoints (`dpmot fit --ckpt_path .../last.ckpt`)
        # continues there on purpose: no warning; anything else writing into a non-empty directory still gets it
        dirpath, self._dir_to_check = self._dir_to_check, None
        resumed = trainer.ckpt_path
        if dirpath is None or (resumed and Path(str(resumed)).resolve().parent == Path(str(dirpath)).resolve()):
            return
        super()._ModelCheckpoint__warn_if_dir_not_empty(dirpath)  # type: ignore[misc]

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        # A resume into another folder (`dpmot fit --ckpt_path ... --trainer.logger/default_root_dir ...`, or a
        # fresh logger version) is deliberate: the old folder's top-k ranking stays there, as in ModelCheckpoint, but
        # without its "The dirpath has changed" warning. best_model_path still points at the old best.
        self.best_model_path = state_dict["best_model_path"]
        rank_zero_debug(
            f"LastCheckpoint: state from {state_dict.get('dirpath')}; new checkpoints go to {self.dirpath} "
            "(top-k ranking starts afresh there)"
        )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if (
            self.last_every_n_steps
            and step % self.last_every_n_steps == 0
            and self._last_step_in_last != step
            and not trainer.fast_dev_run
            and trainer.state.fn == TrainerFn.FITTING
        ):
            # leave the top-k bookkeeping alone: a validation at this step must still be able to save best-*.ckpt
            previous = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = previous

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final_step_unsaved = self._last_step_in_last != trainer.global_step
        if self.save_last and final_step_unsaved and not trainer.fast_dev_run and not trainer.sanity_checking:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self._should_save_last_on_exception(trainer, exception):
            super().on_exception(trainer, pl_module, exception)
            return
        if nonfinite_parameters(pl_module):
            rank_zero_warn(f"LastCheckpoint: not saving after {type(exception).__name__}: the weights are NaN/inf")
            return
        # The exception may have hit one rank only: no collectives (no barrier, no broadcast) from here on.
        filepath = self.format_checkpoint_name(self._monitor_candidates(trainer), self.CHECKPOINT_NAME_LAST)
        self.last_model_path = filepath
        try:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            if trainer.is_global_zero:
                trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, filepath)
        except Exception as err:  # noqa: BLE001 - never mask the original exception
            rank_zero_warn(f"LastCheckpoint: could not save {filepath} after {type(exception).__name__}: {err}")
            return
        self._last_step_in_last = trainer.global_step
        rank_zero_info(
            f"LastCheckpoint: {type(exception).__name__} in training; saved {filepath} (step {trainer.global_step})"
        )

    def _should_save_last_on_exception(self, trainer: L.Trainer, exception: BaseException) -> bool:
        return (
            self.save_last_on_exception
            and bool(self.save_last)
            and not isinstance(exception, (NonFiniteError, KeyboardInterrupt, TrainingInterrupted))
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.training  # not in validation: EMA weights may be swapped in there
            and not trainer.sanity_checking
            and not trainer.fast_dev_run
            and trainer.global_step > 0
            and self._last_step_in_last != trainer.global_step
            and self.dirpath is not None
        )
