"""SIGTERM/SIGINT/SIGUSR1: checkpoint the current step, flush the metrics, requeue under SLURM, exit non-zero.

Lightning's own SIGTERM handling stops at the next batch with **exit status 0** and no checkpoint (a scheduler sees
a successful job), and its handler runs a ``dist.broadcast`` inside the signal handler. :class:`GracefulShutdown`
replaces it during training:

1. the handler only records the signal (no I/O, no collectives);
2. at the next training-batch boundary every rank contributes its flag to an all-reduce (MAX), so all ranks act on
   the same step even when only one of them was signalled (``kill -TERM <rank-0 pid>``);
3. all ranks write ``last.ckpt`` of that step (through the ``ModelCheckpoint``/:class:`LastCheckpoint` with
   ``save_last`` when there is one, else ``<log_dir>/checkpoints/last.ckpt``; written atomically by
   :class:`~lightning_dpmot.utils.checkpoint_io.SafeCheckpointIO`), loggers are flushed, and
4. for a *requeue signal* (SIGUSR1, what ``#SBATCH --signal=USR1@90`` and ``scancel --signal=USR1`` send), global
   rank 0 of a SLURM job runs ``scontrol requeue $SLURM_JOB_ID`` when ``scontrol`` is on the PATH. Inside a container
   it usually is not: rank 0 then writes the file named by ``$DPMOT_REQUEUE_MARKER`` (the sbatch templates set it)
   and the batch script requeues the job from the host when it finds that file (``experiments/cluster/common.sh``);
5. :class:`~lightning_dpmot.errors.TrainingInterrupted` exits with 128 + signal: 143 for SIGTERM, 130 for SIGINT,
   138 for SIGUSR1.

This replaces Lightning's SLURM auto-requeue, which writes ``hpc_ckpt_N.ckpt`` from inside the signal handler, in the
middle of whatever step is running: its resumed run replays the interrupted epoch and ends with other weights. Here
the checkpoint is taken at a batch boundary, with the data loader's position, so ``--ckpt_path last`` in the
restarted job continues bit-identically (tested under a real SLURM requeue in ``tests/cluster/``).

Outside training (validate/test/predict, the sanity check) there is nothing to save: the handler stops at once with
the same exit status. A second SIGINT (Ctrl+C twice) does not wait for the batch boundary. :meth:`after_checkpoint`
is the hook for a requeue (SLURM) instead of exiting.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
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

#: The file rank 0 writes when the job must be requeued from outside (no ``scontrol`` in a container).
REQUEUE_MARKER_ENV = "DPMOT_REQUEUE_MARKER"


class GracefulShutdown(Callback):
    """Turn SIGTERM/SIGINT into a checkpoint of the current step and a non-zero exit (see the module docstring).

    Args:
        signals: names of the signals to handle (default SIGTERM, SIGINT and SIGUSR1).
        requeue_signals: the signals after which a SLURM job is requeued (default SIGUSR1).
        requeue: run ``scontrol requeue`` from global rank 0 after a requeue signal inside a SLURM job (when
            ``scontrol`` is on the PATH); ``False`` leaves the requeue to the batch script (``$DPMOT_REQUEUE_MARKER``).
    """

    def __init__(
        self,
        signals: Sequence[str] = ("SIGTERM", "SIGINT", "SIGUSR1"),
        requeue_signals: Sequence[str] = ("SIGUSR1",),
        requeue: bool = True,
    ) -> None:
        super().__init__()
        self.signals = [_signal(name) for name in signals]
        self.requeue_signals = [_signal(name) for name in requeue_signals]
        self.requeue = requeue
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
        """Requeue the SLURM job after a requeue signal (rank 0), then stop: raises ``TrainingInterrupted``."""
        interrupted = TrainingInterrupted(signum, trainer.global_step, path)
        rank_zero_info(f"dpmot: {interrupted}")
        if signum in self.requeue_signals and trainer.is_global_zero:
            done, message = requeue_slurm_job() if self.requeue else (False, "requeue left to the batch script")
            rank_zero_info(f"dpmot: {message}")
            if not done:
                rank_zero_info(f"dpmot: {request_host_requeue()}")
        raise interrupted


def _signal(name: str | int) -> signal.Signals:
    return signal.Signals[name] if isinstance(name, str) else signal.Signals(name)


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array tasks, else ``SLURM_JOB_ID``; ``None``
    outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_slurm_job(timeout: float = 60.0) -> tuple[bool, str]:
    """Run ``scontrol requeue`` for this job: (whether it was requeued, what happened in one line); never raises."""
    job = slurm_job_id()
    if job is None:
        return False, "not a SLURM job: nothing to requeue"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, f"scontrol not found: the batch script must requeue SLURM job {job}"
    try:
        done = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"scontrol requeue {job} failed: {err}"
    if done.returncode < 0:  # the requeue ends this job step at once, scontrol included
        return True, f"scontrol requeue {job} sent; it stopped this job step (signal {-done.returncode}) as it requeued"
    if done.returncode != 0:
        return False, f"scontrol requeue {job} failed ({done.returncode}): {done.stderr.strip()}"
    return True, f"requeued SLURM job {job}; the restarted job resumes with --ckpt_path last"


def request_host_requeue() -> str:
    """Ask the batch script to requeue: write ``$DPMOT_REQUEUE_MARKER`` (atomically); return what was done."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if not marker:
        return f"{REQUEUE_MARKER_ENV} is not set: requeue the job yourself (exit status 138)"
    path = Path(marker)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(f"{slurm_job_id() or ''}\n")
        os.replace(partial, path)
    except OSError as err:
        return f"could not write {path} ({err}): requeue the job yourself (exit status 138)"
    return f"asked the batch script to requeue the job ({path})"
