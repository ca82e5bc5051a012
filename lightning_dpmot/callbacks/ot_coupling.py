"""One OT callback for every model: re-assign the training noise to the data on every step, over all GPUs.

Before each training step the callback takes the rank's unit noise from the module's noise hook
(``pl_module.draw_noise``, per-rank generators), gathers data and noise from every rank, solves ONE assignment over the
global batch on rank 0, broadcasts the permutation, and hands each rank the noise assigned to its own data as
``batch["noise"]`` — which :class:`~lightning_dpmot.models.base.DiffusionModule` uses instead of drawing its own. It
knows nothing about the model: EDM (= AOT), DDPM and text-conditioned modules all go through the same hook.

Global data flow (W ranks, B samples each)::

    noise_all = all_gather(noise)                       (W*B, D)
    C_rows    = cost(x_local, noise_all)                (B, W*B), on each rank's device
    C         = all_gather(C_rows)                      (W*B, W*B)
    perm      = assignment(C) on rank 0, broadcast      (W*B,)
    noise     = noise_all[perm[rank*B : (rank+1)*B]]

Unequal batch sizes across ranks are padded and masked (padding is never assigned), so a short last batch cannot
hang the gather. ``scope="local"`` solves per rank (AOT's and torchcfm's behaviour) for comparison.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from einops import rearrange
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.ot.costs import pairwise_cost
from lightning_dpmot.ot.coupling import CouplingStats, coupling_permutation, coupling_stats
from lightning_dpmot.utils.random import global_seed, make_generator

_POOL_NOISE = 22  # generator purpose (21: the pool's items, drawn by the DataModule)


class OTCouplingCallback(L.Callback):
    """Minibatch OT coupling of noise and data (AOT / Immiscible Diffusion), global across GPUs.

    Args:
        solver: assignment method: "exact" (lapjv), "scipy", "sinkhorn" or "auction" (see
            ``lightning_dpmot.ot.solve_assignment``).
        cost: "l2" (Euclidean, AOT's choice) or "sqeuclidean" (torchcfm's).
        per_class: assign within each class label only (AOT's class-conditional model).
        pool_size: AOT's 2024 variant: per rank, draw a pool of this many training items and noises, assign once
            (globally: W * pool_size pairs), and consume the pool over pool_size / batch_size steps. None: couple
            each batch as it comes.
        scope: "global" (one assignment over all ranks) or "local" (one per rank).
        every_n_steps: couple on every n-th optimizer step only (other steps keep independent noise).
        solver_options: extra options of the solver (e.g. {"reg": 0.05} for sinkhorn).
        cost_dtype: "float32" or "float64" for the cost matrix.
    """

    def __init__(
        self,
        solver: str = "exact",
        cost: Literal["l2", "sqeuclidean"] = "l2",
        per_class: bool = False,
        pool_size: int | None = None,
        scope: Literal["global", "local"] = "global",
        every_n_steps: int = 1,
        solver_options: dict[str, Any] | None = None,
        cost_dtype: Literal["float32", "float64"] = "float32",
    ) -> None:
        super().__init__()
        if scope not in ("global", "local"):
            raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if pool_size is not None and pool_size < 2:
            raise ValueError(f"pool_size must be >= 2 or null, got {pool_size}")
        self.solver, self.cost, self.per_class, self.pool_size = solver, cost, per_class, pool_size
        self.scope, self.every_n_steps = scope, every_n_steps
        self.solver_options = dict(solver_options or {})
        self.cost_dtype = getattr(torch, cost_dtype)
        self.pools_drawn = 0  # pool mode: pools started so far (saved in checkpoints)
        self._pool: dict[str, Tensor] | None = None
        self._pool_pos = 0
        self._resume_pos = 0

    # ------------------------------------------------------------------------------------------------ the hook
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, dict) or "x" not in batch:
            raise ValueError("OTCouplingCallback needs dict batches with an 'x' entry (the project's DataModules)")
        if self.per_class and "label" not in batch:
            raise ValueError("OTCouplingCallback(per_class=True) needs batches with a 'label' entry")
        if trainer.global_step % self.every_n_steps:
            return  # the module draws independent noise itself
        if self.pool_size:
            self._pool_batch(trainer, pl_module, batch, batch_idx)
            return
        noise = pl_module.draw_noise(batch["x"], batch_idx)
        labels = batch.get("label") if self.per_class else None
        batch["noise"], stats, timing = self.couple(trainer, batch["x"], noise, labels)
        self._log(pl_module, stats, timing, batch["x"].shape[0])

    # ------------------------------------------------------------------------------------------------ the math
    def couple(
        self, trainer: L.Trainer, x: Tensor, noise: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, CouplingStats, dict[str, float]]:
        """Assign ``noise`` (B, *S) to ``x`` (B, *S) over the global batch (collective in global scope).

        Returns the noise this rank's data gets, the coupling statistics (global) and timings in ms.
        """
        world = trainer.world_size if self.scope == "global" else 1
        if world == 1:
            start = time.perf_counter()
            cost = pairwise_cost(x, noise, self.cost, dtype=self.cost_dtype)
            cost_ms = 1e3 * (time.perf_counter() - start)
            start = time.perf_counter()
            perm = coupling_permutation(cost, self.solver, labels, **self.solver_options)
            solve_ms = 1e3 * (time.perf_counter() - start)
            return noise[perm], coupling_stats(cost, perm), {"cost_ms": cost_ms, "solve_ms": solve_ms, "gather_ms": 0.0}
        return self._couple_global(trainer, x, noise, labels)

    def _couple_global(
        self, trainer: L.Trainer, x: Tensor, noise: Tensor, labels: Tensor | None
    ) -> tuple[Tensor, CouplingStats, dict[str, float]]:
        strategy, rank, world = trainer.strategy, trainer.global_rank, trainer.world_size
        start = time.perf_counter()
        b = x.shape[0]
        sizes = strategy.all_gather(torch.tensor([b], device=x.device)).reshape(world)
        b_max = int(sizes.max())
        x, noise = _pad(x, b_max), _pad(noise, b_max)
        noise_all = rearrange(strategy.all_gather(noise), "w b ... -> (w b) ...")
        labels_all = None
        if labels is not None:
            labels_all = rearrange(strategy.all_gather(_pad(labels, b_max)), "w b -> (w b)")
        gather_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        cost_rows = pairwise_cost(x, noise_all, self.cost, dtype=self.cost_dtype)  # (b_max, W * b_max)
        cost_ms = 1e3 * (time.perf_counter() - start)
        start = time.perf_counter()
        cost = rearrange(strategy.all_gather(cost_rows), "w b n -> (w b) n")
        gather_ms += 1e3 * (time.perf_counter() - start)
        valid = rearrange(torch.arange(b_max, device=x.device) < sizes.reshape(world, 1), "w b -> (w b)")
        payload: tuple[Tensor, CouplingStats, float] | None = None
        if rank == 0:
            start = time.perf_counter()
            perm = coupling_permutation(cost, self.solver, labels_all, valid, **self.solver_options)
            solve_ms = 1e3 * (time.perf_counter() - start)
            payload = (perm.cpu(), coupling_stats(cost, perm, valid), solve_ms)
        perm, stats, solve_ms = strategy.broadcast(payload, src=0)
        mine = perm.to(x.device)[rank * b_max : rank * b_max + b]
        timing = {"cost_ms": cost_ms, "solve_ms": solve_ms, "gather_ms": gather_ms}
        return noise_all[mine], stats, timing

    # ----------------------------------------------------------------------------------------------- pool mode
    def _pool_batch(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor], batch_idx: int
    ) -> None:
        """AOT 2024: replace the batch by the next slice of an assigned pool of (data, noise) pairs."""
        b = batch["x"].shape[0]
        if self.pool_size % b:
            raise ValueError(f"pool_size={self.pool_size} must be a multiple of the batch size {b}")
        if self._pool is None or self._pool_pos >= self.pool_size:
            self._pool = self._draw_pool(trainer, pl_module)
            self._pool_pos, self._resume_pos = self._resume_pos, 0
            self.pools_drawn += 1
        sl = slice(self._pool_pos, self._pool_pos + b)
        for key, value in self._pool.items():
            if key in batch or key == "noise":
                batch[key] = value[sl]
        self._pool_pos += b

    def _draw_pool(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """The next pool: training items from the DataModule (``draw_pool``), this rank's noise, coupled."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "draw_pool"):
            raise ValueError("OTCouplingCallback(pool_size=...) needs a DataModule with draw_pool (the project's)")
        seed, device = global_seed(), pl_module.device
        pool = dm.draw_pool(self.pool_size, trainer.global_rank, self.pools_drawn, device)
        noise_gen = make_generator(seed, trainer.global_rank, self.pools_drawn, _POOL_NOISE, device=device)
        noise = torch.randn(pool["x"].shape, generator=noise_gen, device=device)
        labels = pool.get("label") if self.per_class else None
        pool["noise"], stats, timing = self.couple(trainer, pool["x"], noise, labels)
        self._log(pl_module, stats, timing, self.pool_size)
        return pool

    # ----------------------------------------------------------------------------------------------- bookkeeping
    def _log(self, pl_module: L.LightningModule, stats: CouplingStats, timing: dict[str, float], n: int) -> None:
        values = {
            "ot/cost_before": stats.cost_before,
            "ot/cost_after": stats.cost_after,
            "ot/reduction": stats.reduction,
            **{f"ot/{k}": v for k, v in timing.items()},
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=n)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pools_drawn": self.pools_drawn, "pool_pos": self._pool_pos}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Pools come from counter-based generators: redraw the pool in use and continue at its position.
        drawn, pos = int(state_dict.get("pools_drawn", 0)), int(state_dict.get("pool_pos", 0))
        mid_pool = self.pool_size is not None and 0 < pos < self.pool_size
        self.pools_drawn = drawn - 1 if mid_pool else drawn
        self._resume_pos = pos if mid_pool else 0
        self._pool, self._pool_pos = None, 0


def _pad(t: Tensor, n: int) -> Tensor:
    """Zero-pad the first dimension of ``t`` to ``n`` rows."""
    if t.shape[0] == n:
        return t
    return torch.cat([t, t.new_zeros((n - t.shape[0], *t.shape[1:]))])
