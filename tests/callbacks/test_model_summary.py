"""CompactModelSummary: no FLOPs column or total of zeros when FLOPs were not measured; kept when they were."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning as L
import pytest
import rich
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dpmot.callbacks.model_summary import CompactModelSummary
from lightning_dpmot.cli import main


def _fit(tmp_path: Path, model: L.LightningModule, summary: CompactModelSummary) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        callbacks=[summary],
        default_root_dir=tmp_path,
    )
    trainer.fit(model)


def test_plain_table_drops_the_zero_flops_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.callbacks.model_summary"):
        _fit(tmp_path, BoringModel(), CompactModelSummary(rich=False))
    text = caplog.text
    assert "Total params" in text and "Params" in text
    assert "FLOPs" not in text and "Total Flops" not in text


def test_rich_table_drops_the_zero_flops_column_and_keeps_measured_flops(tmp_path: Path) -> None:
    out = io.StringIO()
    rich.reconfigure(file=out, width=150, force_terminal=False)
    try:
        _fit(tmp_path, BoringModel(), CompactModelSummary(rich=True))
        no_flops = out.getvalue()
        out.truncate(0)
        measured = BoringModel()
        measured.example_input_array = torch.randn(2, 32)  # Lightning measures FLOPs only with an example input
        _fit(tmp_path, measured, CompactModelSummary(rich=True))
        with_flops = out.getvalue()
    finally:
        rich.reconfigure()
    assert "Total params" in no_flops and "layer" in no_flops
    assert "FLOPs" not in no_flops
    assert "FLOPs" in with_flops and "Total FLOPs" in with_flops and "In sizes" in with_flops


def _cli_fit(tmp_path: Path, *extra: str) -> str:
    """``dpmot fit`` of a tiny EDM for one step; returns what rich printed."""
    out = io.StringIO()
    rich.reconfigure(file=out, width=150, force_terminal=False)
    try:
        main(
            ["fit", "--model", "EDMModule", "--data", "DigitsDataModule", "--data.init_args.batch_size=16",
             "--model.init_args.net", "DDPMppUNet", "--model.init_args.net.init_args.model_channels=8",
             "--model.init_args.net.init_args.channel_mult=[1,1]", "--model.init_args.net.init_args.num_blocks=1",
             "--model.init_args.net.init_args.attn_resolutions=[]", "--trainer.accelerator=cpu",
             "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
             "--trainer.enable_checkpointing=false", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
             *extra]
        )  # fmt: skip
    finally:
        rich.reconfigure()
    return out.getvalue()


def test_the_cli_uses_the_compact_summary_unless_summaries_are_off(tmp_path: Path) -> None:
    text = _cli_fit(tmp_path / "on")
    assert "Total params" in text and "FLOPs" not in text
    assert "Total params" not in _cli_fit(tmp_path / "off", "--trainer.enable_model_summary=false")
