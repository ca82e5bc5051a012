"""DigitsDataModule: bundled sklearn digits, scaling to [-1, 1], resizing, seeded stratified split, x_flip."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightning_dpmot.data import digits as digits_module
from lightning_dpmot.data.digits import DigitsDataModule, load_digits_arrays


def test_bundled_file_matches_sklearn_load_digits() -> None:
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    reference = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert np.array_equal(images, reference.images.astype(np.float32))
    assert np.array_equal(labels, reference.target)


def test_shape_and_classes_are_known_without_reading_data(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise AssertionError("__init__ must not load data")

    monkeypatch.setattr(digits_module, "load_digits_arrays", fail)
    dm = DigitsDataModule(resolution=16)
    assert dm.data_shape == (1, 16, 16)
    assert dm.num_classes == 10
    assert dm.name == "digits-16px"
    assert DigitsDataModule(val_fraction=0.2, split_seed=3).name == "digits-8px-val0.2-seed3"


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_images_have_the_stated_shape_dtype_and_range(resolution: int) -> None:
    x = DigitsDataModule(resolution=resolution).dataset("train").x
    assert x.shape == (1528, 1, resolution, resolution)
    assert x.dtype == torch.float32
    assert x.min().item() == -1.0  # background 0 -> -1
    assert x.max().item() >= 0.99  # ink 16 -> +1 (upsampling overshoot is clamped)
    assert x.max().item() <= 1.0


def test_native_resolution_is_an_exact_affine_map() -> None:
    dm = DigitsDataModule(resolution=8)
    images, _ = load_digits_arrays()
    idx = dm.indices("val")
    assert torch.equal(dm.dataset("val").x[:, 0], torch.from_numpy(images[idx] / 8.0 - 1.0).float())


def test_upsampling_preserves_the_image() -> None:
    x8 = DigitsDataModule(resolution=8).dataset("val").x
    x32 = DigitsDataModule(resolution=32).dataset("val").x
    pooled = torch.nn.functional.avg_pool2d(x32, 4)  # back to 8x8
    assert (pooled - x8).abs().mean().item() < 0.1


def test_split_is_stratified_disjoint_complete_and_deterministic() -> None:
    a, b = DigitsDataModule(), DigitsDataModule()
    train, val = a.indices("train"), a.indices("val")
    assert len(train) + len(val) == 1797
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(train, b.indices("train")) and np.array_equal(val, b.indices("val"))
    assert torch.equal(a.dataset("val").x, b.dataset("val").x)
    _, labels = load_digits_arrays()
    expected = np.floor(0.15 * np.bincount(labels) + 0.5).astype(int)
    assert np.array_equal(np.bincount(labels[val], minlength=10), expected)
    assert not np.array_equal(val, DigitsDataModule(split_seed=1).indices("val"))


def test_loaders_yield_labelled_dict_batches_and_drop_the_last_partial_batch() -> None:
    dm = DigitsDataModule(batch_size=500, val_batch_size=100)
    train = list(dm.train_dataloader())
    assert [len(b["x"]) for b in train] == [500, 500, 500]  # 1528 items: 28 dropped
    batch = train[0]
    assert set(batch) == {"x", "label", "index"}
    assert batch["label"].dtype == torch.int64 and 0 <= batch["label"].min() and batch["label"].max() <= 9
    val = list(dm.val_dataloader())
    assert sum(len(b["x"]) for b in val) == 269
    _, labels = load_digits_arrays()
    assert torch.equal(torch.cat([b["label"] for b in val]), torch.from_numpy(labels[dm.indices("val")]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resolution": 12}, r"resolution must be one of \(8, 16, 32\), got 12"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


class _Recorder(L.LightningModule):
    """Linear model that records the batches Lightning hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, 10)
        self.seen: list[tuple[str, tuple[int, ...], int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(("train", tuple(batch["x"].shape), len(batch["label"])))
        return torch.nn.functional.cross_entropy(self.net(batch["x"].flatten(1)), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.seen.append(("val", tuple(batch["x"].shape), len(batch["label"])))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_on_the_datamodule_and_it_pickles(tmp_path: Path) -> None:
    dm = pickle.loads(pickle.dumps(DigitsDataModule(batch_size=32)))  # ddp_spawn pickles the DataModule
    model = _Recorder()
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)
    assert model.seen == [("train", (32, 1, 8, 8), 32)] * 2 + [("val", (32, 1, 8, 8), 32)] * 2
