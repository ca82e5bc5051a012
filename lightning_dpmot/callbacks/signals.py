"""SIGTERM/SIGINT: checkpoint the current step, flush the metrics, exit non-zero.

Lightning's own SIGTERM handling stops at the next batch with **exit status 0** and no checkpoint (a scheduler sees
a successful job), and its handler runs a ``dist.broadcast`` inside the signal handler. :class:`GracefulShutdown`
replaces it during training:

1. the handler only records the signal (no I/O, no collectives);
2. at the next training-batch boundary every rank contributes its flag to an all-reduce (MAX), so all ranks act on
   the same step even when only one of them was signalled (``kill -TERM <rank-0 pid>``);
3. all ranks write ``last.ckpt`` of that step (through the ``ModelCheckpoint``/:class:`LastCheckpoint` with
   ``save_last`` when there is one, else ``<log_dir>/checkpoints/last.ckpt``; written atomically by
   :class:`~lightning_dpmot.utils.checkpoint_io.SafeCheckpointIO`), loggers are flushed, and
4. :class:`~lightning_dpmot.errors.TrainingInterrupted` exits with 128 + signal: 143 for SIGTERM, 130 for SIGINT.

Outside training (validate/test/predict, the sanity check) there is nothing to save: the handler stops at once with
the same exit status. A second SIGINT (Ctrl+C twice) does not wait for the batch boundary. :meth:`after_checkpoint`
is the hook for a requeue (SLURM) instead of exiting.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_dpmot.errors import TrainingInterrupted


class GracefulShutdown(Callback):
    """Turn SIGTERM/SIGINT into a checkpoint of the current step and a non-zero exit (see the module docstring).

    Args:
        signals: names of the signals to handle (default SIGTERM and SIGINT).
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM", "SIGINT")) -> None:
        super().__init__()
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.received = 0  # signal number recorded by the handler; 0 = none
        self._stage: str | None = None
        self._trainer: L.Trainer | None = None
        self._original: dict[signal.Signals, Any] = {}

    # ---- handler ------------------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl+C twice: stop waiting for the batch boundary
        first = not self.received
        self.received = self.received or int(signum)
        if first and (self._stage != "fit" or signum == signal.SIGTERM):
            self._forward(signum)
        if self._stage != "fit":
            raise TrainingInterrupted(signum)  # nothing to checkpoint outside training

    def _forward(self, signum: int) -> None:
        """Pass the signal on to the ranks this process launched (Lightning's ``ddp`` subprocess launcher)."""
        trainer = self._trainer
        launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
        if launcher is not None and getattr(launcher, "procs", None):
            try:
                launcher.kill(signum)
            except Exception:  # noqa: BLE001 - a dead child must not break the handler
                pass

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.signals:
            if signum not in self._original:
                self._original[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._original.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._original = {}

    # ---- hooks --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stage, self._trainer, self.received = stage, trainer, 0
        self._install()

    # Lightning registers its own SIGTERM handler just before the loops start: take the signals back.
    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        signum = self.agreed_signal(trainer)
        if signum:
            path = self.save(trainer)
            for logger in trainer.loggers:
                logger.save()
            self.after_checkpoint(trainer, signum, path)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()
        self._trainer = None

    # ---- the decision and the checkpoint --------------------------------------------------------------------
    def agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal to act on now, identical on every rank (all-reduce MAX of the ranks' flags); 0 for none."""
        flag = self.received
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            tensor = torch.tensor([flag], dtype=torch.int64, device=trainer.strategy.root_device)
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
            flag = int(tensor.item())
        return flag

    @staticmethod
    def save(trainer: L.Trainer) -> str | None:
        """Write ``last.ckpt`` of the current step on all ranks (a collective); return its path."""
        if trainer.fast_dev_run:
            return None
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                if callback._last_global_step_saved != trainer.global_step or not callback.last_model_path:
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                return callback.last_model_path
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "last.ckpt"  # log_dir: collective
        trainer.save_checkpoint(path)
        return str(path)

    def after_checkpoint(self, trainer: L.Trainer, signum: int, path: str | None) -> None:
        """Stop the run (override to requeue instead, e.g. under SLURM): raises ``TrainingInterrupted``."""
        interrupted = TrainingInterrupted(signum, trainer.global_step, path)
        rank_zero_info(f"dpmot: {interrupted}")
        raise interrupted
