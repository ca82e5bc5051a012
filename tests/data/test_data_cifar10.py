"""CIFAR10DataModule on tiny fake pickle batches: pixel layout, splits, errors, download, safe extraction."""

from __future__ import annotations

import datetime
import hashlib
import io
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_dpmot.data import cifar10
from lightning_dpmot.data.cifar10 import CIFAR10DataModule, read_cifar_batch, safe_extract

BATCH_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _fake_batches(seed: int = 0) -> dict[str, dict[bytes, object]]:
    """Five training batches of 4 images and a test batch of 3, as the official dicts (bytes keys)."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in BATCH_FILES:
        n = 3 if name == "test_batch" else 4
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        batches[name] = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
    # A known pixel: first training image, green channel (1), row 2, column 5 = 255; its red twin = 0.
    batches["data_batch_1"][b"data"][0, 1 * 1024 + 2 * 32 + 5] = 255
    batches["data_batch_1"][b"data"][0, 0 * 1024 + 2 * 32 + 5] = 0
    batches["data_batch_1"][b"data"][0, 2 * 1024 + 31 * 32 + 0] = 51
    return batches


def _write_batches(folder: Path, batches: dict[str, dict[bytes, object]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _fake_archive(path: Path, batches: dict[str, dict[bytes, object]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, batch in batches.items():
            payload = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    _write_batches(tmp_path / "cifar-10-batches-py", _fake_batches())
    return tmp_path


def test_shape_and_classes_are_known_without_file_access(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(root=str(tmp_path / "absent"))
    assert dm.data_shape == (3, 32, 32)
    assert dm.num_classes == 10
    assert dm.name == "cifar10-32px"
    assert CIFAR10DataModule(root=str(tmp_path), subset=6).name == "cifar10-32px-subset6"


def test_pixel_layout_is_channel_row_column(cifar_root: Path) -> None:
    x = CIFAR10DataModule(root=str(cifar_root)).dataset("train")[0]["x"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[1, 2, 5].item() == 1.0
    assert x[0, 2, 5].item() == -1.0
    assert x[2, 31, 0].item() == pytest.approx(51 / 127.5 - 1)
    raw = _fake_batches()["data_batch_1"][b"data"][0]
    for c, h, w in [(0, 0, 0), (1, 7, 30), (2, 31, 31), (2, 16, 3)]:
        assert x[c, h, w].item() == pytest.approx(raw[c * 1024 + h * 32 + w] / 127.5 - 1)


@pytest.mark.parametrize("use_inner_folder", [False, True])
def test_splits_labels_and_root_forms(cifar_root: Path, use_inner_folder: bool) -> None:
    root = cifar_root / "cifar-10-batches-py" if use_inner_folder else cifar_root
    dm = CIFAR10DataModule(root=str(root), batch_size=8)
    batches = _fake_batches()
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 20 and len(val) == 3
    expected = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected
    assert val.labels.tolist() == batches["test_batch"][b"labels"]
    assert [len(b["x"]) for b in dm.train_dataloader()] == [8, 8]  # 20 items: last 4 dropped
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"x", "label", "index"} and batch["label"].dtype == torch.int64
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert batch["x"].min() < -0.95 and batch["x"].max() > 0.95


def test_subset_takes_the_first_training_images(cifar_root: Path) -> None:
    full = CIFAR10DataModule(root=str(cifar_root)).dataset("train")
    sub = CIFAR10DataModule(root=str(cifar_root), subset=6).dataset("train")
    assert len(sub) == 6
    assert torch.equal(sub.x, full.x[:6]) and torch.equal(sub.labels, full.labels[:6])
    with pytest.raises(ValueError, match="subset must be in 1..50000 or null, got 0"):
        CIFAR10DataModule(root=str(cifar_root), subset=0)


def test_reads_batches_that_name_the_numpy_1_module(tmp_path: Path) -> None:
    # The official files were pickled by Python 2 / NumPy 1 and refer to numpy.core.multiarray._reconstruct.
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    payload = pickle.dumps({b"data": data, b"labels": [3, 7]}, protocol=2)
    payload = payload.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert b"numpy.core.multiarray" in payload
    (tmp_path / "test_batch").write_bytes(payload)
    images, labels = read_cifar_batch(tmp_path / "test_batch")
    assert labels.tolist() == [3, 7]
    assert images.shape == (2, 3, 32, 32) and images[1, 2, 31, 31] == data[1, 3071]


def test_missing_data_names_the_directory_files_and_remedy(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(root=str(root)).dataset("train")
    message = str(info.value)
    assert str(root / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "test_batch" in message
    assert "download: true" in message and cifar10.CIFAR10_URL in message


def test_restricted_unpickler_refuses_foreign_globals(tmp_path: Path) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": datetime.date(2020, 1, 1), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"global datetime.date is not allowed"):
        read_cifar_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, protocol=2))
    with pytest.raises(ValueError, match=r"b'data' must be \(N, 3072\) uint8"):
        read_cifar_batch(path)


def _official_digests(monkeypatch: pytest.MonkeyPatch, archive: Path) -> None:
    """Make ``archive`` count as the official one (both digests)."""
    data = archive.read_bytes()
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(data).hexdigest())
    monkeypatch.setattr(cifar10, "CIFAR10_SHA256", hashlib.sha256(data).hexdigest())


def test_download_that_does_not_verify_is_discarded_and_extracts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        _fake_archive(dest, _fake_batches())

    monkeypatch.setattr(cifar10, "download_url", fake_download)
    dm = CIFAR10DataModule(root=str(tmp_path), download=True)
    with pytest.raises(ValueError, match="does not verify") as info:
        dm.prepare_data()
    assert f"(expected {cifar10.CIFAR10_MD5})" in str(info.value)
    assert f"(expected {cifar10.CIFAR10_SHA256})" in str(info.value)
    assert calls == [cifar10.CIFAR10_URL]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # partial download gone, nothing extracted


def test_sha256_is_checked_besides_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "fake.tar.gz"
    _fake_archive(archive, _fake_batches())
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", hashlib.md5(archive.read_bytes()).hexdigest())  # MD5 matches only
    monkeypatch.setattr(cifar10, "download_url", lambda url, dest: dest.write_bytes(archive.read_bytes()))
    with pytest.raises(ValueError, match=f"SHA-256 [0-9a-f]{{64}} \\(expected {cifar10.CIFAR10_SHA256}\\)"):
        CIFAR10DataModule(root=str(tmp_path / "data"), download=True).prepare_data()
    assert cifar10.CIFAR10_SHA256 == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"


def test_verified_download_extracts_once_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "fake.tar.gz"
    _fake_archive(archive, _fake_batches())
    calls = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(cifar10, "download_url", fake_download)
    _official_digests(monkeypatch, archive)
    root = tmp_path / "data"
    dm = CIFAR10DataModule(root=str(root), download=True)
    dm.prepare_data()
    assert (root / "cifar-10-python.tar.gz").is_file()
    assert len(dm.dataset("train")) == 20
    CIFAR10DataModule(root=str(root), download=True).prepare_data()  # already there: no second download
    assert len(calls) == 1


def test_existing_archive_is_reused_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_archive(tmp_path / "cifar-10-python.tar.gz", _fake_batches())
    _official_digests(monkeypatch, tmp_path / "cifar-10-python.tar.gz")

    def no_download(url: str, dest: Path) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr(cifar10, "download_url", no_download)
    assert len(CIFAR10DataModule(root=str(tmp_path), download=True).dataset("val")) == 3


def test_a_corrupt_existing_archive_is_moved_aside_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.tar.gz"
    _fake_archive(good, _fake_batches())
    _official_digests(monkeypatch, good)
    monkeypatch.setattr(cifar10, "download_url", lambda url, dest: dest.write_bytes(good.read_bytes()))
    root = tmp_path / "data"
    root.mkdir()
    (root / "cifar-10-python.tar.gz").write_bytes(b"the user's truncated download")
    (root / "cifar-10-python.tar.gz.corrupt").write_bytes(b"an earlier one")
    with pytest.warns(
        UserWarning, match=r"cifar-10-python.tar.gz: MD5 [0-9a-f]{32} \(expected .*moved it to .*corrupt-1"
    ):
        CIFAR10DataModule(root=str(root), download=True).prepare_data()
    assert (root / "cifar-10-python.tar.gz.corrupt-1").read_bytes() == b"the user's truncated download"
    assert (root / "cifar-10-python.tar.gz.corrupt").read_bytes() == b"an earlier one"
    assert (root / "cifar-10-python.tar.gz").read_bytes() == good.read_bytes()
    assert len(CIFAR10DataModule(root=str(root)).dataset("train")) == 20


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([0, 10], r"1 label\(s\) outside 0..9, the first at row 1 \(10\); not an official CIFAR-10 batch"),
        ([-1, 3], r"1 label\(s\) outside 0..9, the first at row 0 \(-1\)"),
        ([0], r"b'data' must be \(N, 3072\) uint8 with N labels, got \(2, 3072\) uint8 and labels of shape \(1,\)"),
        ([[0], [1]], r"b'data' must be .* and labels of shape \(2, 1\)"),
        (["a", "b"], r"b'labels' must be a list of integers"),
    ],
)
def test_bad_labels_are_rejected_naming_the_batch_file(tmp_path: Path, labels: list[object], message: str) -> None:
    path = tmp_path / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, protocol=2))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {message}"):
        read_cifar_batch(path)


def test_a_bad_batch_fails_the_datamodule_naming_the_file(cifar_root: Path) -> None:
    batches = _fake_batches()
    batches["data_batch_2"][b"labels"][0] = 12
    _write_batches(cifar_root / "cifar-10-batches-py", batches)
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/data_batch_2: 1 label\(s\) outside 0..9"):
        CIFAR10DataModule(root=str(cifar_root)).dataset("train")


@pytest.mark.parametrize("member", ["../evil", "/abs/evil", "a/../../evil"])
def test_safe_extract_rejects_escaping_members(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["ok.txt", member]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ValueError, match="refusing unsafe member path"):
        safe_extract(archive, dest)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "evil").exists()


def test_safe_extract_rejects_links_and_never_overwrites(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ValueError, match="only files and folders allowed"):
        safe_extract(archive, tmp_path)

    archive = tmp_path / "two.tar.gz"
    _fake_archive(archive, {name: {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]} for name in BATCH_FILES[:2]})
    dest = tmp_path / "dest"
    (dest / "cifar-10-batches-py").mkdir(parents=True)
    (dest / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"keep")
    written = safe_extract(archive, dest)
    assert (dest / "cifar-10-batches-py" / "data_batch_1").read_bytes() == b"keep"
    assert written == [dest / "cifar-10-batches-py" / "data_batch_2"]
