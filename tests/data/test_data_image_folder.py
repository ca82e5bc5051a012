"""ImageFolderDataModule on small PNG/JPEG files written by the tests: crop, grayscale, classes, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dpmot.data.image_folder import ImageFolderDataModule, load_image


def _rgb(seed: int, width: int = 12, height: int = 8) -> np.ndarray:
    """(H, W, 3) uint8 with 0 and 255 present."""
    array = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    array[0, 0] = 0
    array[-1, -1] = 255
    return array


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def flat_root(tmp_path: Path) -> Path:
    for i in range(8):
        _write(tmp_path / "imgs" / f"{i:02d}.png", _rgb(i))
    return tmp_path / "imgs"


@pytest.fixture
def class_root(tmp_path: Path) -> Path:
    # Three classes (listed out of order on purpose), four 8x8 images each, filled with 40 * class + 10.
    for k, cls in enumerate(["apple", "banana", "cherry"]):
        for i in range(4):
            _write(tmp_path / "cls" / cls / f"img{i}.png", np.full((8, 8, 3), 40 * k + 10, np.uint8))
    return tmp_path / "cls"


def _signed(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).float() / 127.5 - 1


def test_shorter_side_resize_then_centre_crop(flat_root: Path) -> None:
    # 12x8 image at resolution 8: the shorter side already fits, so the output is exactly columns 2..9.
    x = load_image(flat_root / "00.png", resolution=8, channels=3)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(_rgb(0)[:, 2:10]).permute(2, 0, 1))
    tall = flat_root / "tall.png"
    _write(tall, np.full((40, 20, 3), 77, np.uint8))  # 20 wide, 40 high -> 8x16 -> crop rows 4..11
    assert torch.equal(load_image(tall, 8, 3), torch.full((3, 8, 8), 77, dtype=torch.uint8))


def test_flat_folder_batches_range_and_no_labels(flat_root: Path) -> None:
    dm = ImageFolderDataModule(root=str(flat_root), resolution=8, val_fraction=0.25, batch_size=4)
    assert dm.data_shape == (3, 8, 8) and dm.num_classes == 0
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 6 and len(val) == 2
    assert not set(train.paths) & set(val.paths)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "index"}
    assert batch["x"].shape == (4, 3, 8, 8) and batch["x"].dtype == torch.float32
    assert [len(b["x"]) for b in dm.train_dataloader()] == [4]  # 6 items: the last 2 are dropped
    x = torch.stack([train[i]["x"] for i in range(len(train))])
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    first = train.paths[0]
    assert torch.equal(train[0]["x"], _signed(_rgb(int(first.stem))[:, 2:10]).permute(2, 0, 1))


def test_split_is_deterministic_and_sorted_by_path(flat_root: Path) -> None:
    a = ImageFolderDataModule(root=str(flat_root), resolution=8, val_fraction=0.25)
    b = ImageFolderDataModule(root=str(flat_root), resolution=8, val_fraction=0.25)
    assert a.dataset("val").paths == b.dataset("val").paths
    assert a.files()[0] == sorted(flat_root.glob("*.png"))
    assert a.name == b.name and a.name.startswith("folder-imgs-") and a.name.endswith("-8px-val0.25-seed0")


def test_grayscale_and_jpeg_extensions(tmp_path: Path) -> None:
    gray = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
    _write(tmp_path / "g" / "a.png", gray)
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "g" / "b.JPG", quality=95)
    (tmp_path / "g" / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(root=str(tmp_path / "g"), resolution=16, channels=1, val_fraction=0.5)
    assert dm.data_shape == (1, 16, 16)
    paths, _ = dm.files()
    assert [p.name for p in paths] == ["a.png", "b.JPG"]
    items = {}
    for split in ("train", "val"):
        dataset = dm.dataset(split)
        items.update({path.name: dataset[i]["x"] for i, path in enumerate(dataset.paths)})
    assert items["a.png"].shape == (1, 16, 16)
    assert torch.equal(items["a.png"][0], _signed(gray))
    assert (items["b.JPG"] - (200 / 127.5 - 1)).abs().max().item() < 0.05


def test_class_subfolders_give_sorted_labels_and_stratified_split(class_root: Path) -> None:
    (class_root / "banana" / "broken.png").write_bytes(b"garbage")  # __init__ must not decode anything
    dm = ImageFolderDataModule(
        root=str(class_root), resolution=8, class_subfolders=True, val_fraction=0.25, batch_size=3
    )
    assert dm.num_classes == 3 and dm.classes == ["apple", "banana", "cherry"]
    (class_root / "banana" / "broken.png").unlink()
    val = dm.dataset("val")
    assert sorted(val.labels.tolist()) == [0, 1, 2]
    for split in ("train", "val"):
        dataset = dm.dataset(split)
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["x"][0, 0, 0].item() == pytest.approx((40 * item["label"].item() + 10) / 127.5 - 1)
            assert dataset.paths[i].parent.name == dm.classes[item["label"]]
    batch = next(iter(dm.train_dataloader()))
    assert batch["label"].dtype == torch.int64 and set(batch) == {"x", "label", "index"}


def test_missing_root_and_empty_folders_raise_clear_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=f"image folder {missing} does not exist"):
        ImageFolderDataModule(root=str(missing)).dataset("train")
    with pytest.raises(FileNotFoundError, match=f"image folder {missing} does not exist"):
        ImageFolderDataModule(root=str(missing), class_subfolders=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images \(.png, .jpg, .jpeg\) found under .*empty"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).dataset("train")
    with pytest.raises(FileNotFoundError, match="class_subfolders=True but .*empty has no subfolders"):
        ImageFolderDataModule(root=str(tmp_path / "empty"), class_subfolders=True)
    (tmp_path / "empty" / "dogs").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder .*dogs has no images"):
        ImageFolderDataModule(root=str(tmp_path / "empty"), class_subfolders=True).dataset("train")


def test_unreadable_image_names_the_file(flat_root: Path) -> None:
    bad = flat_root / "zz_bad.png"
    bad.write_bytes(b"definitely not a png")
    dm = ImageFolderDataModule(root=str(flat_root), resolution=8, val_fraction=0.25)
    dataset = dm.dataset("train") if bad in dm.dataset("train").paths else dm.dataset("val")
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        dataset[dataset.paths.index(bad)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 2}, "channels must be 1 \\(grayscale\\) or 3 \\(RGB\\), got 2"),
        ({"resolution": 0}, "resolution must be >= 1, got 0"),
        ({"val_fraction": 1.5}, "val_fraction must be in \\(0, 1\\), got 1.5"),
    ],
)
def test_bad_arguments_raise_clear_errors(flat_root: Path, kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageFolderDataModule(root=str(flat_root), **kwargs)
