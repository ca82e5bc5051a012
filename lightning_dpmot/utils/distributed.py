"""Collective helpers shared by callbacks, modules and solvers (one place; every helper is a no-op on one rank).

- :func:`rank_seeds`: this rank's share of a global range of per-sample seeds (EDM's per-image seeds).
- :func:`gather_rows`: concatenate every rank's rows in rank order, ranks may hold different row counts.
- :func:`all_reduce_sum`: in-place sum over ranks through ``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def rank_seeds(num_samples: int, rank: int, world_size: int, offset: int = 0) -> Tensor:
    """This rank's share of the seeds ``offset .. offset + num_samples - 1`` (every world_size-th one), (n_r,) int64."""
    return torch.arange(offset + rank, offset + num_samples, world_size, dtype=torch.long)


def gather_rows(trainer: Any, rows: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, ...) rows in rank order (collective; ranks may hold different n_r).

    ``trainer`` is a Lightning Trainer (its ``strategy.all_gather`` and ``world_size`` are used).
    """
    if trainer.world_size == 1:
        return rows
    counts = trainer.strategy.all_gather(torch.tensor([len(rows)], device=rows.device)).reshape(-1)
    padded = rows.new_zeros((int(counts.max()), *rows.shape[1:]))
    padded[: len(rows)] = rows
    gathered = trainer.strategy.all_gather(padded)
    return torch.cat([gathered[r, : int(counts[r])] for r in range(trainer.world_size)])


def global_batch_size(trainer: Any) -> int:
    """Images per optimizer step over all ranks: the DataModule's ``batch_size`` (1 if it has none) x world size x
    gradient accumulation."""
    dm = getattr(trainer, "datamodule", None)
    per_device = getattr(dm, "batch_size", None) or 1
    return int(per_device) * trainer.world_size * trainer.accumulate_grad_batches


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (no-op without a multi-rank process group); returns ``t``."""
    if is_distributed():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


__all__ = ["all_reduce_sum", "gather_rows", "global_batch_size", "is_distributed", "rank_seeds"]
