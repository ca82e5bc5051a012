"""OTCouplingCallback: optimal pairing, per-class blocks, pool mode, the global property under 2-process DDP,
unequal batch sizes across ranks, and training still works."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer, tiny_edm
from torch.utils.data import DataLoader

from lightning_dpmot.callbacks import OTCouplingCallback
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.data.base import TensorDictDataset
from lightning_dpmot.ot import assignment_cost, pairwise_cost, solve_assignment
from lightning_dpmot.ot.coupling import coupling_permutation, coupling_stats


def test_coupling_permutation_is_optimal_and_respects_classes_and_padding() -> None:
    gen = torch.Generator().manual_seed(0)
    x, n = torch.randn(40, 6, generator=gen), torch.randn(40, 6, generator=gen)
    cost = pairwise_cost(x, n)
    perm = coupling_permutation(cost, "exact")
    assert torch.equal(perm.sort().values, torch.arange(40))
    assert assignment_cost(cost, perm) == pytest.approx(float(assignment_cost(cost, solve_assignment(cost, "scipy"))))
    stats = coupling_stats(cost, perm)
    assert stats.cost_after < stats.cost_before and stats.reduction > 0
    labels = torch.arange(40) % 3
    perm_c = coupling_permutation(cost, "exact", labels=labels)
    assert torch.equal(labels[perm_c], labels)  # never across classes
    valid = torch.arange(40) < 31
    perm_v = coupling_permutation(cost, "exact", valid=valid)
    assert torch.equal(perm_v[31:], torch.arange(31, 40)) and bool((perm_v[:31] < 31).all())


class Spy(L.Callback):
    """Listed after the OT callback: sees the batch as training_step will."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        drawn = pl_module.draw_noise(batch["x"], batch_idx)
        self.seen.append({k: v.clone() for k, v in batch.items()} | {"drawn": drawn, "batch_idx": batch_idx})


def fit(tmp_path: Path, callbacks: list[L.Callback], steps: int = 3, **dm_kwargs: object) -> L.LightningModule:
    model = tiny_edm()
    quiet_trainer(
        tmp_path,
        max_steps=steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=callbacks,
    ).fit(model, DigitsDataModule(**({"batch_size": 32} | dm_kwargs)))
    return model


def test_single_process_assignment_is_the_exact_optimum(tmp_path: Path) -> None:
    spy = Spy()
    fit(tmp_path, [OTCouplingCallback(solver="exact"), spy])
    for rec in spy.seen:
        x, drawn, used = rec["x"], rec["drawn"], rec["noise"]
        cost = pairwise_cost(x, drawn)
        perm = solve_assignment(cost, "scipy")
        assert torch.equal(used, drawn[perm])  # the optimal pairing of this rank's own noise
        used_rows = {tuple(r.tolist()) for r in used.flatten(1)}
        assert len(used_rows) == len(x)  # no noise vector twice


def test_per_class_pairs_within_classes(tmp_path: Path) -> None:
    spy = Spy()
    fit(tmp_path, [OTCouplingCallback(per_class=True), spy])
    for rec in spy.seen:
        drawn, used, labels = rec["drawn"], rec["noise"], rec["label"]
        src = [int((drawn.flatten(1) == u).all(1).nonzero()) for u in used.flatten(1)]  # which drawn row each got
        assert torch.equal(labels[torch.tensor(src)], labels)  # noise came from a position of the same class


def test_pool_mode_consumes_each_pooled_pair_once(tmp_path: Path) -> None:
    spy = Spy()
    fit(tmp_path, [OTCouplingCallback(pool_size=128), spy], steps=8)
    first, second = spy.seen[:4], spy.seen[4:]
    for pool in (first, second):
        idx = torch.cat([r["index"] for r in pool])
        assert len(idx.unique()) == 128  # 4 slices of 32 cover the pool, no item twice
        noise = torch.cat([r["noise"] for r in pool])
        assert len({tuple(v.tolist()) for v in noise.flatten(1)}) == 128
        x = torch.cat([r["x"] for r in pool])
        cost = pairwise_cost(x, noise)
        assert torch.equal(solve_assignment(cost, "scipy"), torch.arange(128))  # the slices are the optimal pairs
    assert not set(torch.cat([r["index"] for r in first]).tolist()) == set(
        torch.cat([r["index"] for r in second]).tolist()
    )


def test_every_n_steps_and_bad_configuration(tmp_path: Path) -> None:
    spy = Spy()
    fit(tmp_path, [OTCouplingCallback(every_n_steps=2), spy], steps=4)
    assert ["noise" in r for r in spy.seen] == [True, False, True, False]
    with pytest.raises(ValueError, match="scope must be"):
        OTCouplingCallback(scope="world")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the batch size"):
        fit(tmp_path, [OTCouplingCallback(pool_size=100)], steps=1)


@pytest.mark.slow
def test_training_with_the_callback_reduces_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_edm(optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    dm = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=80,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1000,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[OTCouplingCallback()],
    )
    before = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    trainer.fit(model, dm)
    assert trainer.callback_metrics["ot/reduction"] > 0  # the coupling shortened the pairs
    after = trainer.validate(model, dm, verbose=False)[0]["val/loss"]
    assert after < 0.6 * before, (before, after)


class GlobalCheck(L.Callback):
    """After the OT callback: the rank's noise equals the single-process assignment of the global batch."""

    def __init__(self, per_class: bool) -> None:
        self.per_class = per_class

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        drawn = pl_module.draw_noise(batch["x"], batch_idx)
        x_all = pl_module.all_gather(batch["x"]).flatten(0, 1)
        drawn_all = pl_module.all_gather(drawn).flatten(0, 1)
        used_all = pl_module.all_gather(batch["noise"]).flatten(0, 1)
        labels = pl_module.all_gather(batch["label"]).flatten() if self.per_class else None
        perm = coupling_permutation(pairwise_cost(x_all, drawn_all), "exact", labels)
        assert torch.allclose(used_all, drawn_all[perm]), "rank noise differs from the global assignment"
        assert len({tuple(v.tolist()) for v in used_all.flatten(1)}) == len(used_all)
        assert not torch.equal(drawn_all[: len(drawn)], drawn_all[len(drawn) :])  # ranks drew different noise
        if labels is not None:
            assert torch.equal(labels[perm], labels)
        pl_module.log("global_checked", 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("per_class", [False, True])
def test_global_assignment_over_two_processes(tmp_path: Path, per_class: bool) -> None:
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[OTCouplingCallback(per_class=per_class), GlobalCheck(per_class)],
    )
    trainer.fit(tiny_edm(), DigitsDataModule(batch_size=16))
    assert trainer.callback_metrics["global_checked"].item() == 1.0


class UnevenData(DigitsDataModule):
    """Rank 0 gets batches of 8, rank 1 batches of 5 (no distributed sampler): the coupling must pad, not hang."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        x = self.dataset("train")
        data = TensorDictDataset(torch.stack([x[i]["x"] for i in range(40)]), torch.arange(40) % 10)
        return DataLoader(data, batch_size=8 if rank == 0 else 5, drop_last=True)


class UnevenCheck(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        b = batch["x"].shape[0]
        assert batch["noise"].shape == batch["x"].shape and b == (8 if trainer.global_rank == 0 else 5)
        drawn = pl_module.draw_noise(batch["x"], batch_idx)
        sizes = pl_module.all_gather(torch.tensor(b))
        pad = lambda t: torch.cat([t, t.new_zeros((8 - len(t), *t.shape[1:]))])  # noqa: E731
        drawn_all = pl_module.all_gather(pad(drawn))
        used_all = pl_module.all_gather(pad(batch["noise"]))
        valid_drawn = torch.cat([drawn_all[r, : sizes[r]] for r in range(2)]).flatten(1)
        valid_used = torch.cat([used_all[r, : sizes[r]] for r in range(2)]).flatten(1)
        rows = {tuple(v.tolist()) for v in valid_drawn}
        assert all(tuple(v.tolist()) in rows for v in valid_used)  # only real noise is handed out ...
        assert len({tuple(v.tolist()) for v in valid_used}) == 13  # ... each once
        pl_module.log("uneven_checked", 1.0)


@pytest.mark.slow
def test_unequal_batch_sizes_across_ranks_do_not_hang(tmp_path: Path) -> None:
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=2,
        limit_val_batches=0,
        use_distributed_sampler=False,
        enable_checkpointing=False,
        callbacks=[OTCouplingCallback(), UnevenCheck()],
    )
    trainer.fit(tiny_edm(), UnevenData(batch_size=8))
    assert trainer.callback_metrics["uneven_checked"].item() == 1.0
