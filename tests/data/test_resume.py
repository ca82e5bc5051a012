"""Exact mid-epoch resume: the seeded sampler's rank split and skip, the stateful loader, and a Trainer run resumed
from a mid-epoch checkpoint that ends bit-identical to the uninterrupted run (num_workers 0 and 2)."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, tiny_edm
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dpmot.data import DigitsDataModule, EpochSeededRandomSampler, ResumableDataLoader, TensorDictDataset


def _indices(loader: ResumableDataLoader, n: int | None = None) -> list[list[int]]:
    """The (B,) index lists of the first ``n`` batches of a pass (all without ``n``)."""
    return [batch["index"].tolist() for batch in itertools.islice(loader, n)]


def _ramp(n: int) -> TensorDictDataset:
    return TensorDictDataset(torch.arange(n, dtype=torch.float32).reshape(n, 1))


def test_sampler_order_with_one_rank_is_the_seeded_permutation() -> None:
    from lightning_dpmot.utils.random import make_generator

    s = EpochSeededRandomSampler(range(50), seed=1)
    s.set_epoch(3)
    assert list(s) == torch.randperm(50, generator=make_generator(1, 3, 11)).tolist()  # the pre-resume order


def test_sampler_ranks_partition_the_epoch_like_a_distributed_sampler() -> None:
    n, world = 11, 3
    shares = [list(EpochSeededRandomSampler(range(n), seed=2, num_replicas=world, rank=r)) for r in range(world)]
    full = list(EpochSeededRandomSampler(range(n), seed=2))
    assert [len(s) for s in shares] == [4, 4, 4]  # padded to 12, as DistributedSampler pads
    padded = full + full[:1]
    assert [padded[r::world] for r in range(world)] == shares
    assert sorted(set(sum(shares, []))) == list(range(n))
    with pytest.raises(ValueError, match="need num_replicas >= 1 and 0 <= rank < num_replicas, got 2 and 2"):
        EpochSeededRandomSampler(range(n), num_replicas=2, rank=2)


def test_sampler_start_skips_once() -> None:
    s = EpochSeededRandomSampler(range(20), seed=0)
    full = list(s)
    s.start = 7
    assert list(s) == full[7:]
    assert list(s) == full  # consumed by the pass


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_at_the_same_batch(num_workers: int) -> None:
    data = _ramp(40)
    kwargs = {"batch_size": 6, "drop_last": True, "num_workers": num_workers, "persistent_workers": num_workers > 0}
    first = ResumableDataLoader(data, sampler=EpochSeededRandomSampler(data, seed=5), **kwargs)
    first.sampler.set_epoch(2)
    full = _indices(first)
    assert len(full) == 6 and first.state_dict()["position"] == 6
    seen = _indices(first, 4)  # a second pass of epoch 2, abandoned after 4 batches
    state = first.state_dict()
    assert state == {"epoch": 2, "position": 4, "batch_size": 6, "num_replicas": 1}

    resumed = ResumableDataLoader(data, sampler=EpochSeededRandomSampler(data, seed=5), **kwargs)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the epoch after iter() and before the first batch
    iterator = iter(resumed)
    assert seen + _indices_from(iterator) == full
    assert resumed.state_dict()["position"] == 6
    resumed.sampler.set_epoch(3)
    assert len(_indices(resumed)) == 6  # the next epoch is whole again


def _indices_from(iterator) -> list[list[int]]:
    return [batch["index"].tolist() for batch in iterator]


def test_loader_state_of_another_epoch_or_sampler_and_bad_states() -> None:
    data = _ramp(30)
    loader = ResumableDataLoader(data, batch_size=5, sampler=EpochSeededRandomSampler(data, seed=0), drop_last=True)
    full = _indices(loader)
    loader.load_state_dict({"epoch": 1, "position": 2})  # an epoch that is not the next pass's
    assert _indices(loader) == full
    plain = ResumableDataLoader(data, batch_size=5)  # any sampler: skipped batches are drawn and dropped
    plain.load_state_dict({"epoch": 0, "position": 4})
    assert _indices(plain) == [list(range(20, 25)), list(range(25, 30))]
    with pytest.raises(ValueError, match=r"dataloader state lacks \['position'\]"):
        loader.load_state_dict({"epoch": 0})
    with pytest.warns(UserWarning, match="batch_size=5 and 1 rank.*written with batch_size=10"):
        loader.load_state_dict({"epoch": 0, "position": 1, "batch_size": 10, "num_replicas": 1})
    assert _indices(loader) == full[2:]  # the 10 items seen are skipped


def test_datamodule_splits_by_rank_without_a_process_group() -> None:
    from types import SimpleNamespace

    dm = DigitsDataModule(batch_size=64)
    per_rank = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)  # so Lightning keeps it under DDP
        per_rank.append(torch.cat([b["index"] for b in loader]))
    assert len(per_rank[0]) == len(per_rank[1]) == 11 * 64  # 764 items per rank: 11 full batches
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 32, "rank": 0})
    with pytest.raises(ValueError, match=r"batch_size=64 is larger than the training split of 1528 items \(48 per"):
        dm.setup("fit")


def _train(
    root: Path,
    max_steps: int,
    num_workers: int,
    ckpt_path: str | None = None,
    every: int = 0,
    batch_size: int = 128,
    **trainer_kwargs: object,
):
    torch.manual_seed(0)
    model = tiny_edm()
    callbacks = []
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = quiet_trainer(
        root,
        max_steps=max_steps,
        limit_val_batches=0,
        enable_checkpointing=bool(every),
        callbacks=callbacks,
        **trainer_kwargs,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, DigitsDataModule(batch_size=batch_size, num_workers=num_workers), ckpt_path=ckpt_path)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    return model


@pytest.mark.parametrize("num_workers", [0, 2])
def test_mid_epoch_resume_is_bit_identical(tmp_path: Path, num_workers: int) -> None:
    # 1,528 digits / 128 = 11 steps per epoch: checkpoint at step 5 (mid-epoch 0), train on into epoch 1.
    steps, stop = 14, 5
    reference = _train(tmp_path / "a", steps, num_workers, every=stop)  # leaves the checkpoint a killed run would
    ckpt = tmp_path / "a" / f"step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 0, "position": stop, "batch_size": 128, "num_replicas": 1}]
    resumed = _train(tmp_path / "c", steps, num_workers, ckpt_path=str(ckpt))
    ref, res = reference.state_dict(), resumed.state_dict()
    assert ref.keys() == res.keys()
    different = [k for k in ref if not torch.equal(ref[k], res[k])]
    assert not different, f"{len(different)} of {len(ref)} tensors differ after resume, e.g. {different[:3]}"


@pytest.mark.slow
def test_mid_epoch_resume_under_two_process_ddp_is_bit_identical(tmp_path: Path) -> None:
    # 2 ranks x 32 of 764 items each: each rank resumes at its own position of its own share.
    ddp = {"devices": 2, "strategy": "ddp_spawn", "batch_size": 32}
    steps, stop = 6, 3
    reference = _train(tmp_path / "a", steps, 0, every=stop, **ddp)
    ckpt = tmp_path / "a" / f"step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert state == [{"epoch": 0, "position": stop, "batch_size": 32, "num_replicas": 2}]
    resumed = _train(tmp_path / "c", steps, 0, ckpt_path=str(ckpt), **ddp)
    ref, res = reference.state_dict(), resumed.state_dict()
    different = [k for k in ref if not torch.equal(ref[k], res[k])]
    assert not different, f"{len(different)} of {len(ref)} tensors differ after resume, e.g. {different[:3]}"
