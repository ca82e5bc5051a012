"""Shared DataModule plumbing: seeded splits, uint8 storage, drop_last, predict seeds, argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from lightning_dpmot.data.base import (
    DiffusionDataModule,
    EpochSeededRandomSampler,
    Split,
    TensorDictDataset,
    apply_x_flip,
    generation_conditions,
    split_indices,
    x_flip_mask,
)


class _Ramp(DiffusionDataModule):
    """Ten 1x2x2 images whose pixels all equal their index / 10 (train) or 20 items (val)."""

    def __init__(self, batch_size: int = 4, **kwargs: object) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.data_shape = (1, 2, 2)
        self.num_classes = 3

    def build_dataset(self, split: Split) -> Dataset:
        n = 10 if split == "train" else 20
        x = torch.arange(n, dtype=torch.float32).div(n).view(n, 1, 1, 1).expand(n, 1, 2, 2)
        return TensorDictDataset(x.clone(), torch.arange(n) % 3)


def test_split_indices_pins_the_frozen_randomstate_stream() -> None:
    # RandomState(0).permutation(10) = [2, 8, 4, 9, ...]: the first 3 go to val on every machine.
    train, val = split_indices(np.zeros(10, dtype=np.int64), 0.3, seed=0)
    assert val.tolist() == [2, 4, 8]
    assert train.tolist() == [0, 1, 3, 5, 6, 7, 9]
    assert train.dtype == val.dtype == np.int64


def test_split_indices_is_stratified_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 30, 41])
    train, val = split_indices(labels, 0.2, seed=5)
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    assert np.bincount(labels[val]).tolist() == [2, 4, 6, 8]  # round(0.2 * n) per class
    assert np.all(np.diff(val) > 0) and np.all(np.diff(train) > 0)
    other_train, _ = split_indices(labels, 0.2, seed=6)
    assert not np.array_equal(train, other_train)


def test_split_indices_rejects_bad_fractions_and_empty_splits() -> None:
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        split_indices(np.zeros(5), 1.0, 0)
    with pytest.raises(ValueError, match="gives 3 train and 0 val items"):
        split_indices(np.zeros(3), 0.1, 0)


def test_uint8_storage_is_converted_per_item() -> None:
    x = torch.tensor([0, 51, 255, 128], dtype=torch.uint8).view(1, 1, 2, 2)
    item = TensorDictDataset(x)[0]
    assert item["x"].dtype == torch.float32
    assert torch.allclose(item["x"].flatten(), torch.tensor([-1.0, -0.6, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    assert x.flatten().tolist() == [0, 51, 255, 128]  # storage untouched


def test_tensor_dict_dataset_rejects_other_dtypes_and_flipping_points() -> None:
    with pytest.raises(ValueError, match="got dtype torch.float64"):
        TensorDictDataset(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="labels has 1 entries but x has 2"):
        TensorDictDataset(torch.zeros(2, 3), torch.zeros(1, dtype=torch.long))


def test_train_loader_drops_the_last_partial_batch_and_val_keeps_it() -> None:
    dm = _Ramp(batch_size=4, val_batch_size=6)
    train = list(dm.train_dataloader())
    assert [len(b["x"]) for b in train] == [4, 4]  # 10 items: the last 2 are dropped
    assert set(train[0]) == {"x", "label", "index"}
    val = list(dm.val_dataloader())
    assert [len(b["x"]) for b in val] == [6, 6, 6, 2]
    assert torch.cat([b["index"] for b in val]).tolist() == list(range(20))


def test_train_loader_needs_a_full_batch() -> None:
    message = r"_Ramp: batch_size=11 is larger than the training split of 10 items; lower data.init_args.batch_size"
    with pytest.raises(ValueError, match=message):
        _Ramp(batch_size=11).train_dataloader()
    with pytest.raises(ValueError, match=message):
        _Ramp(batch_size=11).setup("fit")


def test_predict_loader_yields_consecutive_seeds_from_the_offset() -> None:
    dm = _Ramp(predict_num_samples=10, predict_batch_size=4, predict_seed_offset=100)
    batches = list(dm.predict_dataloader())
    assert [len(b["seed"]) for b in batches] == [4, 4, 2]
    seeds = torch.cat([b["seed"] for b in batches])
    assert seeds.tolist() == list(range(100, 110))
    assert torch.cat([b["label"] for b in batches]).tolist() == [s % 3 for s in range(100, 110)]
    assert set(batches[0]) == {"seed", "label"}


def test_unlabelled_predict_batches_carry_seeds_only() -> None:
    dm = _Ramp(predict_num_samples=5, predict_batch_size=5)
    dm.num_classes = 0
    (batch,) = list(dm.predict_dataloader())
    assert set(batch) == {"seed"} and batch["seed"].tolist() == [0, 1, 2, 3, 4]


def test_generation_conditions_are_the_one_label_rule() -> None:
    seeds = torch.tensor([0, 7, 10, 23, -1])
    conditions = generation_conditions(seeds, 10)
    assert set(conditions) == {"label"}
    assert conditions["label"].tolist() == [0, 7, 0, 3, 9] and conditions["label"].dtype == torch.long
    assert conditions["label"].device == seeds.device
    assert generation_conditions(seeds.to(torch.int32), 4)["label"].dtype == torch.long
    assert generation_conditions(seeds, 0) == {}
    with pytest.raises(ValueError, match="num_classes must be >= 0, got -2"):
        generation_conditions(seeds, -2)
    dm = _Ramp()
    assert dm.generation_conditions(seeds)["label"].tolist() == [0, 1, 1, 2, 2]  # num_classes = 3


def test_draw_pool_is_the_counter_seeded_subset_the_ot_callback_drew() -> None:
    from lightning_dpmot.data import DigitsDataModule
    from lightning_dpmot.utils.random import make_generator

    dm = DigitsDataModule(batch_size=32, x_flip=True)
    dataset = dm.dataset("train")
    pool = dm.draw_pool(64, rank=1, pool_index=3)
    # The OT callback's former rule: randperm keyed by (seed, rank, pool, 21), coins of "epoch" 1_000_000 + pool.
    idx = torch.randperm(len(dataset), generator=make_generator(0, 1, 3, 21))[:64]
    assert torch.equal(pool["index"], idx)
    assert torch.equal(pool["label"], torch.stack([dataset[int(i)]["label"] for i in idx]))
    x = torch.stack([dataset[int(i)]["x"] for i in idx])
    flip = x_flip_mask(idx, len(dataset), 0, 1_000_000 + 3).reshape(-1, 1, 1, 1)
    assert torch.equal(pool["x"], torch.where(flip, x.flip(-1), x)) and 0 < int(flip.sum()) < 64
    assert not torch.equal(dm.draw_pool(64, rank=0, pool_index=3)["index"], idx)  # ranks draw different pools
    with pytest.raises(ValueError, match=r"pool_size=5000 exceeds the training split \(1528 items\)"):
        dm.draw_pool(5000, rank=0, pool_index=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"val_batch_size": 0}, "val_batch_size must be >= 1 or null, got 0"),
        ({"num_workers": -1}, "num_workers must be >= 0, got -1"),
        ({"predict_num_samples": 0}, "predict_num_samples and predict_batch_size must be >= 1"),
    ],
)
def test_base_arguments_are_validated(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _Ramp(**kwargs)


def test_x_flip_mask_is_a_fixed_coin_per_seed_epoch_and_item() -> None:
    index = torch.arange(1000)
    m0 = x_flip_mask(index, 1000, seed=3, epoch=0)
    assert torch.equal(m0, x_flip_mask(index, 1000, seed=3, epoch=0))  # reproducible (resume, every rank)
    assert 400 < int(m0.sum()) < 600  # a fair coin
    assert not torch.equal(m0, x_flip_mask(index, 1000, seed=3, epoch=1))  # new coins every epoch
    assert not torch.equal(m0, x_flip_mask(index, 1000, seed=4, epoch=0))
    assert torch.equal(x_flip_mask(index[[5, 7]], 1000, 3, 0), m0[[5, 7]])  # depends on the index only


def test_apply_x_flip_flips_exactly_the_masked_images() -> None:
    x = torch.randn(6, 1, 4, 4)
    batch = {"x": x.clone(), "index": torch.tensor([0, 1, 2, 3, 4, 5])}
    mask = x_flip_mask(batch["index"], 10, 0, 2)
    apply_x_flip(batch, 10, 0, 2)
    for i in range(6):
        assert torch.equal(batch["x"][i], x[i].flip(-1) if mask[i] else x[i])
    with pytest.raises(ValueError, match="x_flip needs images"):
        apply_x_flip({"x": torch.zeros(2, 3), "index": torch.tensor([0, 1])}, 2, 0, 0)


def test_datamodule_flips_only_training_batches() -> None:
    from types import SimpleNamespace

    from lightning_dpmot.data import DigitsDataModule

    dm = DigitsDataModule(resolution=8, x_flip=True, batch_size=32)
    batch = next(iter(dm.val_dataloader()))
    x = batch["x"].clone()
    dm.trainer = SimpleNamespace(training=False, current_epoch=0)
    assert torch.equal(dm.on_after_batch_transfer(dict(batch), 0)["x"], x)
    dm.trainer = SimpleNamespace(training=True, current_epoch=0)
    flipped = dm.on_after_batch_transfer(dict(batch), 0)["x"]
    n_train = len(dm.dataset("train"))
    mask = x_flip_mask(batch["index"], n_train, 0, 0)
    assert torch.equal(flipped[mask], x[mask].flip(-1)) and torch.equal(flipped[~mask], x[~mask])
    assert 0 < int(mask.sum()) < len(mask)


def test_epoch_seeded_sampler_replays_the_same_order() -> None:
    data = torch.arange(50)
    s = EpochSeededRandomSampler(data, seed=1)
    first = list(s)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert list(EpochSeededRandomSampler(data, seed=1)) == first
    s.set_epoch(1)
    assert list(s) != first


class _Captioned(_Ramp):
    def build_dataset(self, split: Split) -> Dataset:
        ramp = super().build_dataset(split)

        class WithCaptions(Dataset):
            def __len__(self) -> int:
                return len(ramp)

            def __getitem__(self, i: int) -> dict[str, object]:
                return {**ramp[i], "caption": f"item {i}"}

        return WithCaptions()


def test_draw_pool_keeps_non_tensor_entries_as_lists() -> None:
    pool = _Captioned().draw_pool(4, rank=0, pool_index=0)
    assert pool["caption"] == [f"item {int(i)}" for i in pool["index"]]
    assert pool["x"].shape == (4, 1, 2, 2)
