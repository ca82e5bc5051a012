"""A malicious checkpoint served over HTTP never runs: refused as a URL, and refused by weights_only when allowed."""

from __future__ import annotations

import functools
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dpmot_tiny import REPO, dpmot, error_lines, tiny_config

from lightning_dpmot.cli import main


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 - pickle protocol: unpickling runs os.system
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A loopback HTTP server on a random port serving ``tmp_path/www``: (base URL, folder, requested paths)."""
    www = tmp_path / "www"
    www.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            requested.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", www, requested
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_evil_checkpoint_url_never_executes(server: tuple[str, Path, list[str]], tmp_path: Path) -> None:
    base, www, requested = server
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": _Payload(marker)}, www / "evil.ckpt")
    url = f"{base}/evil.ckpt"
    quickstart = str(REPO / "configs/quickstart.yaml")
    env = {"DPMOT_ALLOW_REMOTE_CKPT": ""}

    for sub in ("fit", "predict"):
        out = dpmot(sub, "--config", quickstart, "--ckpt_path", url, cwd=tmp_path, env=env)
        lines = error_lines(out.stderr)
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
        assert url in lines[0] and "remote URL; refusing" in lines[0]
        assert "Traceback" not in out.stderr
    assert requested == [] and not marker.exists()

    allowed = {"DPMOT_ALLOW_REMOTE_CKPT": "1"}
    for sub in ("fit", "predict"):
        out = dpmot(sub, "--config", quickstart, "--ckpt_path", url, cwd=tmp_path, env=allowed)
        lines = error_lines(out.stderr)
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
        assert url in lines[0] and "refused by the safe loader (weights_only=True)" in lines[0]
    assert requested == ["/evil.ckpt", "/evil.ckpt"]  # downloaded, then refused
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_allowed_remote_checkpoint_loads_weights_only(
    server: tuple[str, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, www, _ = server
    main(["fit", "--config", str(tiny_config(tmp_path / "train", max_steps=2))])
    (www / "tiny.ckpt").write_bytes((tmp_path / "train" / "ckpt" / "last.ckpt").read_bytes())
    monkeypatch.setenv("DPMOT_ALLOW_REMOTE_CKPT", "1")
    config = tiny_config(tmp_path / "eval")
    cli = main(
        ["validate", "--config", str(config), "--trainer.limit_val_batches=1", "--ckpt_path", f"{base}/tiny.ckpt"]
    )
    assert "val/loss" in cli.trainer.callback_metrics
