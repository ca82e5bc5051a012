"""ImageFolder decoding of every Pillow mode (16-bit, float, alpha, palette) and the bad-file policy
(``on_bad_item``: an error naming the file, or skipped files counted in a warning)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_dpmot.data.image_folder import ImageFolderDataModule, load_image, to_8bit


def _save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def test_16bit_grayscale_png_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]] * 4, dtype=np.uint16)  # 65535 / 255 = 257
    path = _save(tmp_path / "g16.png", Image.fromarray(values))
    with Image.open(path) as img:
        assert img.mode == "I;16"
    gray = load_image(path, resolution=4, channels=1)
    assert gray.dtype == torch.uint8 and gray[0, 0].tolist() == [0, 1, 128, 255]
    rgb = load_image(path, resolution=4, channels=3)
    assert torch.equal(rgb, gray.expand(3, 4, 4))


def test_32bit_integer_and_float_grayscale_are_scaled() -> None:
    as_int = Image.fromarray(np.array([[0, 257, 65535, 70000, -5]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(to_8bit(as_int, 1)).tolist() == [[0, 1, 255, 255, 0]]  # 0..65535, clipped outside
    as_float = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, np.nan]], dtype=np.float32))
    assert as_float.mode == "F"
    assert np.asarray(to_8bit(as_float, 1)).tolist() == [[0, 128, 255, 255, 0]]  # 0..1, NaN -> 0
    assert np.asarray(to_8bit(as_float, 3))[0, 1].tolist() == [128, 128, 128]


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent: white, whatever the colour under it
    rgba[0, 1] = (200, 10, 10, 255)  # opaque: its colour
    rgba[1, 0] = (0, 0, 0, 128)  # half black over white
    rgba[1, 1] = (0, 0, 255, 255)
    x = load_image(_save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), 2, 3)
    assert x[:, 0, 0].tolist() == [255, 255, 255]
    assert x[:, 0, 1].tolist() == [200, 10, 10]
    assert all(abs(v - 127) <= 1 for v in x[:, 1, 0].tolist())
    assert x[:, 1, 1].tolist() == [0, 0, 255]
    la = np.array([[[50, 0], [50, 255]]], dtype=np.uint8)  # (1, 2, 2): gray 50, transparent then opaque
    with Image.open(_save(tmp_path / "la.png", Image.fromarray(la, "LA"))) as img:
        assert np.asarray(to_8bit(img, 1)).tolist() == [[255, 50]]


def test_palette_images_with_and_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    img.putdata([0, 1, 2])
    x = load_image(_save(tmp_path / "p.png", img), 1, 3)  # 3x1 -> shorter side 1: the centre pixel, green
    assert x.flatten().tolist() == [0, 255, 0]
    with Image.open(_save(tmp_path / "pt.png", img, transparency=0)) as transparent:
        assert transparent.mode == "P" and "transparency" in transparent.info
        assert np.asarray(to_8bit(transparent, 3)).tolist() == [[[255, 255, 255], [0, 255, 0], [0, 0, 255]]]
    with Image.open(tmp_path / "p.png") as opaque:
        assert np.asarray(to_8bit(opaque, 1)).tolist() == [[76, 150, 29]]  # ITU-R 601 luma of red, green, blue


def _png_bytes(seed: int, size: int = 16) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(10):
        (root / f"{i:02d}.png").write_bytes(_png_bytes(i))
    jpeg = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(jpeg, format="JPEG")
    bad = [root / "03.png", root / "07.jpg", root / "zz.png"]
    bad[0].write_bytes(_png_bytes(3)[:200])  # truncated PNG
    bad[1].write_bytes(jpeg.getvalue()[:300])  # truncated JPEG
    bad[2].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # garbage after a PNG signature
    return root, bad


def test_error_policy_names_the_unreadable_file_when_read(folder_with_bad_files: tuple[Path, list[Path]]) -> None:
    root, bad = folder_with_bad_files
    dm = ImageFolderDataModule(root=str(root), resolution=8, val_fraction=0.25)
    datasets = [dm.dataset("train"), dm.dataset("val")]
    assert sum(len(d) for d in datasets) == 12  # nothing is decoded when the dataset is built
    for path in bad:
        dataset = next(d for d in datasets if path in d.paths)
        with pytest.raises(ValueError, match=f"cannot read image {path}: .*on_bad_item: skip"):
            dataset[dataset.paths.index(path)]


def test_skip_policy_leaves_unreadable_files_out_and_counts_them(
    folder_with_bad_files: tuple[Path, list[Path]],
) -> None:
    root, bad = folder_with_bad_files
    dm = ImageFolderDataModule(root=str(root), resolution=8, val_fraction=0.25, on_bad_item="skip", batch_size=2)
    with pytest.warns(UserWarning, match=r"left out 3 unreadable image file\(s\) of 12 \(on_bad_item='skip'\)"):
        train = dm.dataset("train")
    assert dm.skipped == bad
    paths = train.paths + dm.dataset("val").paths
    assert len(paths) == 9 and not set(paths) & set(bad)
    assert sum(len(b["x"]) for b in dm.train_dataloader()) == len(train) // 2 * 2  # every item decodes


def test_skip_policy_with_nothing_readable_and_a_bad_policy_name(tmp_path: Path) -> None:
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "a" / "x.png").write_bytes(b"not an image")
    (tmp_path / "cls" / "b").mkdir()
    (tmp_path / "cls" / "b" / "y.png").write_bytes(_png_bytes(0))
    dm = ImageFolderDataModule(root=str(tmp_path / "cls"), class_subfolders=True, on_bad_item="skip")
    with pytest.raises(FileNotFoundError, match=r"class folder .*cls/a has no readable images"):
        dm.dataset("train")
    with pytest.raises(ValueError, match="on_bad_item must be 'error' or 'skip', got 'ignore'"):
        ImageFolderDataModule(root=str(tmp_path / "cls"), on_bad_item="ignore")  # type: ignore[arg-type]
