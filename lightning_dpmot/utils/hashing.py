"""File digests shared by every place that verifies bundled or user-supplied weights."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in full every time (no memo that a same-size rewrite could fool)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
