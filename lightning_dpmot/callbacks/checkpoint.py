"""``last.ckpt`` that is really the end of training.

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` with ``save_last=True`` refreshes ``last.ckpt``
only when it saves a checkpoint anyway (after a validation run, or at a train-epoch end when there is no validation);
its ``on_train_end`` writes one only if none was ever written. When ``max_steps`` ends training between two
validations — the quickstart validates every 20 epochs (220 steps) and stops at step 1,000 — ``last.ckpt`` is left at
the last validation (step 880), and ``dpmot predict/test --ckpt_path .../last.ckpt`` silently evaluates a model 120
steps short of the one the run trained. :class:`LastCheckpoint` writes ``last.ckpt`` at the end of training whenever
the final step has not been saved yet.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` holds the final training step.

    Takes ModelCheckpoint's arguments (set ``save_last: true``). Runs in ``on_train_end``, before
    :class:`~lightning_dpmot.callbacks.EMAHalfLife` copies the average into the module (``on_fit_end``), so the
    checkpoint holds the raw weights as the current ones and the EMA weights as the exported ``state_dict``.
    """

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final_step_unsaved = self._last_global_step_saved != trainer.global_step
        if self.save_last and final_step_unsaved and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)
