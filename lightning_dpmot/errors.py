"""Exceptions the ``dpmot`` command turns into one ``dpmot: …`` line and a specific exit status."""

from __future__ import annotations

import signal
from pathlib import Path


class NonFiniteError(RuntimeError):
    """Training or generation produced NaN/inf (loss, weights or samples); ``dpmot`` exits with status 3."""

    exit_code = 3


class TrainingInterrupted(SystemExit):
    """SIGTERM/SIGINT (or another handled signal) stopped the run after checkpointing; exit status 128 + signal.

    Attributes:
        signum: the signal that was acted on.
        step: the global step of the checkpoint.
        checkpoint: the checkpoint written for this step (``None`` outside training).
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: str | Path | None = None) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.step = step
        self.checkpoint = None if checkpoint is None else str(checkpoint)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"interrupted by {self.signal_name}"
        return (
            f"interrupted by {self.signal_name} at step {self.step}; checkpoint {self.checkpoint} "
            f"(resume with --ckpt_path {self.checkpoint})"
        )
