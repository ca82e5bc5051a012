"""The semi-discrete OT fit reports through utils.progress: off a terminal one line when it ends, no tqdm spam."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT

SQUARE = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def test_fit_progress_prints_one_line_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    solver = SemiDiscreteOT(SQUARE, torch.full((4,), 0.25), lr=0.05, num_mc_samples=4096, chunk_size=4096)
    result = solver.fit(12, tol=1e-9 + 0.5, progress=True)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.startswith("semi-discrete OT")]
    assert len(lines) == 1 and "\r" not in out.out + out.err
    assert f"{result['iterations']} steps, last rel_rms_err" in lines[0]
    solver.fit(3, progress=False)
    assert "semi-discrete OT" not in capsys.readouterr().err
