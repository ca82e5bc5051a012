"""Training loaders that resume mid-epoch exactly: an (seed, epoch)-seeded sampler and a stateful DataLoader.

A run killed at step k of epoch e and resumed from a checkpoint of that step must see the batches k+1, k+2, ...
that the uninterrupted run saw. Two pieces make that hold:

* :class:`EpochSeededRandomSampler` derives its permutation from (seed, epoch) only and takes this rank's share
  itself (so Lightning keeps it under DDP instead of swapping in a ``DistributedSampler``); it can start
  ``start`` indices into the epoch without touching the skipped items.
* :class:`ResumableDataLoader` counts the batches it has handed out in the current pass. Lightning 2.6 saves
  ``state_dict()`` of every training loader that has one (``fit_loop.state_dict["combined_loader"]``) and calls
  ``load_state_dict`` before the resumed run's first ``iter()``; the next pass of the saved epoch then skips the
  batches already trained on. The count is taken where batches leave the loader, so worker prefetching does not
  shift it (Lightning's fetcher does not prefetch loaders of known length).

Checkpoints written between training steps (``ModelCheckpoint``, ``LastCheckpoint``, Lightning's own
end-of-step saves) resume exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dpmot.utils.random import global_seed, make_generator

_SHUFFLE = 11  # generator purpose tag (fixed: the quickstart's data order depends on it)


class EpochSeededRandomSampler(DistributedSampler):
    """Shuffles with a permutation derived from (seed, epoch) only; yields this rank's share; can start part-way.

    Order of epoch e: ``perm = randperm(N, generator(seed, e))``; with W ranks, ``perm`` is padded with its own head
    to a multiple of W (as ``DistributedSampler`` pads) and rank r takes ``perm[r::W]``. With one rank the order is
    ``perm`` itself. Being a ``DistributedSampler``, Lightning does not replace it under DDP.

    Args:
        data_source: the dataset (only its length is used).
        seed: shuffle seed; ``None``: the run's seed (``PL_GLOBAL_SEED``) when iteration starts.
        num_replicas: number of ranks W sharing the data.
        rank: this rank r, in ``0 .. W-1``.
    """

    def __init__(self, data_source: Sized, seed: int | None = None, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas} and {rank}")
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=False)  # type: ignore[arg-type]
        self.seed: int | None = seed  # type: ignore[assignment]
        self.start = 0  # indices of this rank's order to skip in the next pass (consumed when the pass starts)

    def order(self, epoch: int) -> list[int]:
        """This rank's (N_rank,) index order of ``epoch``, from its first item."""
        seed = self.seed if self.seed is not None else global_seed()
        perm = torch.randperm(len(self.dataset), generator=make_generator(seed, epoch, _SHUFFLE))  # type: ignore[arg-type]
        if self.num_replicas == 1:
            return perm.tolist()
        pad = self.total_size - len(perm)
        perm = torch.cat([perm, perm.repeat(pad // len(perm) + 1)[:pad]]) if pad > 0 else perm
        return perm[self.rank : self.total_size : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        yield from self.order(self.epoch)[start:]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch is saved in and restored from checkpoints.

    Takes ``DataLoader``'s arguments. ``state_dict()`` is ``{"epoch", "position", "batch_size", "num_replicas"}``:
    the epoch of the current pass (the sampler's ``epoch``) and how many batches it has handed out.
    ``load_state_dict`` makes the next pass of that epoch skip those batches: without loading them when the
    sampler is an :class:`EpochSeededRandomSampler`, else by drawing and discarding them. A pass of another epoch
    (the checkpoint ended its epoch) starts from the beginning.
    """

    def __init__(self, dataset: Any, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.position = 0  # batches handed out in the current pass
        self.pass_epoch = 0  # epoch of the current pass
        self._pending: dict[str, int] | None = None

    def _sampler_epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _num_replicas(self) -> int:
        return int(getattr(self.sampler, "num_replicas", 1))

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position", "batch_size", "num_replicas"}`` of the current pass."""
        return {
            "epoch": self.pass_epoch,
            "position": self.position,
            "batch_size": int(self.batch_size or 1),
            "num_replicas": self._num_replicas(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at ``state_dict["position"]`` batches into epoch ``state_dict["epoch"]`` (on the next pass)."""
        missing = {"epoch", "position"} - set(state_dict)
        if missing:
            raise ValueError(f"dataloader state lacks {sorted(missing)}: got keys {sorted(state_dict)}")
        state = {k: int(v) for k, v in state_dict.items() if k in ("epoch", "position", "batch_size", "num_replicas")}
        saved_bs, bs = state.get("batch_size", int(self.batch_size or 1)), int(self.batch_size or 1)
        saved_w, w = state.get("num_replicas", 1), self._num_replicas()
        if (saved_bs, saved_w) != (bs, w) and state["position"] > 0:
            warnings.warn(
                f"resuming mid-epoch with batch_size={bs} and {w} rank(s), but the checkpoint was written with "
                f"batch_size={saved_bs} and {saved_w} rank(s): the rest of epoch {state['epoch']} skips the "
                f"{state['position'] * saved_bs} items per rank already seen and is not the order of the original run",
                stacklevel=2,
            )
        self._pending = state

    def _skip_items(self) -> int:
        """Items of this rank to skip in the pass now starting (consumes a pending resume)."""
        pending, self._pending = self._pending, None
        if pending is None or pending["epoch"] != self._sampler_epoch():
            return 0
        return pending["position"] * pending.get("batch_size", int(self.batch_size or 1))

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: nothing (not even worker prefetching) starts before the first batch is requested, which is
        # after Lightning's ``set_epoch`` for the epoch.
        self.pass_epoch = self._sampler_epoch()
        skip = self._skip_items()
        bs = int(self.batch_size or 1)
        fast = isinstance(self.sampler, EpochSeededRandomSampler) and self.batch_sampler is not None
        if fast:
            self.sampler.start = skip  # type: ignore[union-attr]
        self.position = skip // bs
        iterator = super().__iter__()
        if not fast:
            for _ in range(skip // bs):
                next(iterator, None)
        for batch in iterator:
            self.position += 1
            yield batch
