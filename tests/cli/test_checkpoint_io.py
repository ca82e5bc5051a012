"""The one checkpoint loader (weights-only, clear errors naming the file) and atomic, finite-only writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_dpmot.errors import NonFiniteError
from lightning_dpmot.utils.checkpoint_io import (
    CheckpointError,
    SafeCheckpointIO,
    atomic_save,
    load_checkpoint,
    load_lightning_module,
    partial_path,
)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    """A torch.save file whose unpickling (weights_only=False) would create ``marker``."""
    torch.save({"state_dict": {}, "payload": _Evil(marker)}, path)
    return path


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 7, "hyper_parameters": {"a": 1}}, path)
    return path


def test_loads_a_good_checkpoint(good: Path) -> None:
    checkpoint = load_checkpoint(good)
    assert checkpoint["global_step"] == 7 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(3))
    assert load_checkpoint(f"file://{good}")["global_step"] == 7


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty (0 bytes)"),
        (os.urandom(4096), "is not a PyTorch checkpoint"),
        ("truncated", "truncated or corrupt"),
    ],
    ids=["empty", "random", "truncated"],
)
def test_broken_files_name_the_file(tmp_path: Path, good: Path, content: bytes | str, expected: str) -> None:
    path = tmp_path / "broken.ckpt"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and expected in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_not_a_dict(tmp_path: Path) -> None:
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="holds a list"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_malicious_pickle_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = evil_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "weights_only=True" in str(err.value) and "posix.system" in str(err.value)
    assert not marker.exists()


def test_remote_urls_are_refused_without_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DPMOT_ALLOW_REMOTE_CKPT", raising=False)
    for url in ("http://127.0.0.1:9/evil.ckpt", "https://example.org/x.ckpt", "s3://bucket/x.ckpt"):
        with pytest.raises(CheckpointError, match="remote URL; refusing") as err:
            load_checkpoint(url)
        assert url in str(err.value) and "DPMOT_ALLOW_REMOTE_CKPT=1" in str(err.value)


def test_atomic_save_replaces_and_leaves_no_partial(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "last.ckpt"
    atomic_save({"v": torch.tensor(1)}, path)
    atomic_save({"v": torch.tensor(2)}, path)
    assert int(load_checkpoint(path)["v"]) == 2
    assert not partial_path(path).exists()


def test_kill_during_save_keeps_the_previous_file(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing the new checkpoint: last.ckpt is still the previous, complete one."""
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(
        f"""
        import io, sys, time, torch
        from lightning_dpmot.utils import checkpoint_io
        checkpoint_io.atomic_save({{"step": 1, "w": torch.ones(1000)}}, {str(path)!r})
        real_save = torch.save
        def slow_save(obj, f):
            buffer = io.BytesIO(); real_save(obj, buffer); data = buffer.getvalue()
            f.write(data[: len(data) // 2]); f.flush()
            print("HALF", flush=True)
            time.sleep(120)
        torch.save = slow_save
        checkpoint_io.atomic_save({{"step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "HALF"
        assert partial_path(path).stat().st_size > 0  # the new file was half written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    checkpoint = load_checkpoint(path)
    assert checkpoint["step"] == 1 and torch.equal(checkpoint["w"], torch.ones(1000))


def test_safe_io_refuses_nonfinite_weights_and_unsafe_loads(tmp_path: Path) -> None:
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, path)
    bad = {"state_dict": {"w": torch.tensor([1.0, float("nan")])}, "global_step": 2}
    with pytest.raises(NonFiniteError, match=r"step 2: 1 weight tensor\(s\) hold NaN/inf \(first: w\)"):
        io.save_checkpoint(bad, path)
    ema_bad = {"state_dict": {"w": torch.ones(2)}, "current_model_state": {"w": torch.tensor([float("inf")])}}
    with pytest.raises(NonFiniteError, match="current_model_state.w"):
        io.save_checkpoint(ema_bad, path)
    assert io.load_checkpoint(path)["global_step"] == 1  # the previous file is untouched
    with pytest.raises(CheckpointError, match="weights_only=False"):
        io.load_checkpoint(path, weights_only=False)


def test_load_lightning_module_roundtrip(tmp_path: Path) -> None:
    from lightning.pytorch.demos.boring_classes import BoringModel

    model = BoringModel()
    path = tmp_path / "boring.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.6", "hyper_parameters": {}}, path)
    loaded = load_lightning_module(path, cls=BoringModel)
    assert torch.equal(loaded.layer.weight, model.layer.weight)
