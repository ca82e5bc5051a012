"""Toy2DDataModule: mixture geometry, clustering around the stated centres, balance, determinism, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dpmot.data.toy2d import Toy2DDataModule, toy2d_centers


def test_stated_geometry() -> None:
    eight = toy2d_centers("8gaussians")
    assert eight.shape == (8, 2)
    assert torch.allclose(eight.norm(dim=1), torch.ones(8))
    assert torch.allclose(eight[2], torch.tensor([0.0, 1.0]), atol=1e-6)
    grid = toy2d_centers("grid25", scale=2.0)
    assert grid.shape == (25, 2)
    assert torch.equal(grid[0], torch.tensor([-2.0, -2.0])) and torch.equal(grid[7], torch.tensor([0.0, -1.0]))
    moons = toy2d_centers("moons")
    expected_y = 2 / 3 * (2 / math.pi - 0.25)
    assert torch.allclose(moons, torch.tensor([[-1 / 3, expected_y], [1 / 3, -expected_y]]), atol=1e-6)


@pytest.mark.parametrize(("dataset", "modes"), [("8gaussians", 8), ("grid25", 25)])
def test_gaussian_modes_cluster_around_their_centres(dataset: str, modes: int) -> None:
    dm = Toy2DDataModule(dataset=dataset, num_train=5000, num_val=500)
    assert dm.num_classes == modes and dm.data_shape == (2,) and dm.mode_std == 0.05
    assert dm.centers.shape == (modes, 2)
    data = dm.dataset("train")
    x, labels = data.x, data.labels
    assert x.shape == (5000, 2) and x.dtype == torch.float32 and labels.dtype == torch.int64
    distance = (x - dm.centers[labels]).norm(dim=1)
    assert (distance < 4 * dm.std).float().mean().item() > 0.99
    counts = torch.bincount(labels, minlength=modes)
    assert counts.max() - counts.min() <= 1
    pairwise = torch.cdist(dm.centers, dm.centers) + torch.eye(modes) * 10
    assert pairwise.min().item() > 8 * dm.std  # well separated
    for k in range(modes):
        assert torch.allclose(x[labels == k].mean(0), dm.centers[k], atol=0.015)
        assert x[labels == k].std(0).sub(dm.std).abs().max().item() < 0.015
    assert x.abs().max().item() < 1.5  # roughly image scale


def test_moons_lie_on_their_arcs() -> None:
    dm = Toy2DDataModule(dataset="moons", num_train=4000, num_val=100)
    assert dm.num_classes == 2 and dm.mode_std is None
    data = dm.dataset("train")
    x, labels = data.x, data.labels
    assert torch.bincount(labels).tolist() == [2000, 2000]
    # Arcs after the (-0.5, -0.25) shift and the 2/3 scale: radius 2/3 around (-1/3, -1/6) and (1/3, 1/6).
    arc_centres = torch.tensor([[-1 / 3, -1 / 6], [1 / 3, 1 / 6]])
    radial = (x - arc_centres[labels]).norm(dim=1) - 2 / 3
    assert (radial.abs() < 4 * dm.std).float().mean().item() > 0.99
    assert (x[labels == 0, 1].mean() > 0.2) and (x[labels == 1, 1].mean() < -0.2)
    assert torch.allclose(x[labels == 0].mean(0), dm.centers[0], atol=0.03)
    assert x[:, 0].abs().max().item() < 1.25 and x[:, 1].abs().max().item() < 0.75


def test_scale_moves_centres_but_not_std() -> None:
    dm = Toy2DDataModule(dataset="8gaussians", num_train=2000, num_val=10, scale=3.0, std=0.1)
    x, labels = dm.dataset("train").x, dm.dataset("train").labels
    assert torch.allclose(dm.centers.norm(dim=1), torch.full((8,), 3.0))
    assert (x - dm.centers[labels]).std().item() == pytest.approx(0.1, rel=0.1)


def test_data_is_deterministic_and_splits_independent() -> None:
    a = Toy2DDataModule(num_train=300, num_val=50, seed=4)
    b = Toy2DDataModule(num_train=300, num_val=50, seed=4)
    assert torch.equal(a.dataset("train").x, b.dataset("train").x)
    assert torch.equal(a.dataset("val").labels, b.dataset("val").labels)
    assert len(a.dataset("val")) == 50
    assert not torch.equal(a.dataset("train").x[:50], a.dataset("val").x)
    assert not torch.equal(a.dataset("train").x, Toy2DDataModule(num_train=300, num_val=50, seed=5).dataset("train").x)
    assert a.name == "toy2d-8gaussians-std0.05-scale1-seed4"


def test_batches_drop_last_and_predict_seeds() -> None:
    dm = Toy2DDataModule(
        dataset="grid25",
        num_train=110,
        num_val=30,
        batch_size=25,
        predict_num_samples=7,
        predict_batch_size=3,
        predict_seed_offset=50,
    )
    train = list(dm.train_dataloader())
    assert [len(b["x"]) for b in train] == [25, 25, 25, 25]
    assert set(train[0]) == {"x", "label", "index"} and train[0]["x"].shape == (25, 2)
    seeds = torch.cat([b["seed"] for b in dm.predict_dataloader()])
    assert seeds.tolist() == list(range(50, 57))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x_flip": True}, "x_flip flips images left-right and is meaningless for 2-D points"),
        ({"dataset": "swissroll"}, "dataset must be one of .*'moons'.*, got 'swissroll'"),
        ({"std": 0.0}, "std and scale must be positive and finite, got std=0.0"),
        ({"num_val": 0}, "num_train and num_val must be >= 1"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Toy2DDataModule(**kwargs)
