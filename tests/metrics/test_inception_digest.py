"""The Inception weights are checked by their full SHA-256, not by the 8 hex digits in the file name."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from lightning_dpmot.metrics import inception
from lightning_dpmot.metrics.inception import WEIGHTS_FILENAME, WEIGHTS_SHA256, load_inception_state_dict


def test_the_pinned_digest_is_a_full_sha256_matching_the_file_name() -> None:
    assert re.fullmatch(r"[0-9a-f]{64}", WEIGHTS_SHA256)
    assert WEIGHTS_SHA256 == "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    assert WEIGHTS_FILENAME.endswith(f"-{WEIGHTS_SHA256[:8]}.pth")


def test_a_file_sharing_only_the_first_8_hex_digits_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / WEIGHTS_FILENAME
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # Pin a digest with this file's first 8 hex digits but another tail: a prefix check would accept the file.
    other = digest[:8] + ("0" if digest[8] != "0" else "1") + digest[9:]
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", other)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", digest[:8])
    with pytest.raises(ValueError, match=f"sha256 of {re.escape(str(path))} is {digest}, expected {other} "):
        load_inception_state_dict(path)
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", digest)
    assert set(load_inception_state_dict(path)) == {"fc.weight"}
