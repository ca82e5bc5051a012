"""A documented command sequence (fit, resume, predict, test) raises none of issue 15's false-alarm warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from lightning_dpmot.cli import main
from lightning_dpmot.utils.quiet import install_tip_filter, install_warning_filters, is_filtered, subcommand_of

#: the messages issue 15 listed (and ModelCheckpoint's on a resume into the run's own folder)
FALSE_ALARMS = (
    "Please add the following callbacks",
    "WeightAveraging state cannot be restored",
    "The dirpath has changed",
    "LeafSpec",
    "exists and is not empty",
)

TINY = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "limit_val_batches": 1,
        "check_val_every_n_epoch": None,
        "val_check_interval": 2,
        "enable_progress_bar": False,
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "q"}}
        ],
        "callbacks": [
            {"class_path": "lightning_dpmot.callbacks.EMAHalfLife", "init_args": {"halflife_images": 2000}},
            {"class_path": "lightning_dpmot.callbacks.SampleGrid", "init_args": {"num_samples": 4}},
            {"class_path": "lightning_dpmot.callbacks.SampleWriter"},
            {
                "class_path": "lightning_dpmot.callbacks.LastCheckpoint",
                "init_args": {"save_last": True, "monitor": "val/loss", "mode": "min", "save_top_k": 1},
            },
        ],
    },
    "model": {
        "class_path": "lightning_dpmot.models.EDMModule",
        "init_args": {
            "net": {
                "class_path": "lightning_dpmot.nets.DDPMppUNet",
                "init_args": {"model_channels": 8, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": []},
            },
            "sampler": {"name": "euler", "num_steps": 2},
        },
    },
    "data": {
        "class_path": "lightning_dpmot.data.DigitsDataModule",
        "init_args": {"resolution": 8, "batch_size": 16, "predict_num_samples": 4},
    },
}


def _run(args: list[str]) -> list[warnings.WarningMessage]:
    """``main(args)`` with every warning recorded except those the project's own filters silence."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # no pytest filters: main() installs the project's, anything else is recorded
        main(args)
    return list(caught)


def test_fit_resume_predict_and_test_raise_no_false_alarms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    eval_only = tmp_path / "eval.yaml"  # an evaluation config that replaces the training callbacks
    eval_only.write_text(yaml.safe_dump({**TINY, "trainer": {**TINY["trainer"], "callbacks": []}}))
    caught = _run(["fit", "--config", str(config)])
    last = next(tmp_path.glob("runs/q/version_*/checkpoints/last.ckpt"))
    caught += _run(["fit", "--config", str(config), "--trainer.max_steps=4", f"--ckpt_path={last}"])
    caught += _run(["predict", "--config", str(config), f"--ckpt_path={last}"])
    caught += _run(["test", "--config", str(eval_only), f"--ckpt_path={last}", "--trainer.limit_test_batches=1"])
    messages = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in caught]
    assert not [m for m in messages if any(alarm in m for alarm in FALSE_ALARMS)], messages
    assert not [m for m in messages if "/lightning_dpmot/" in m], messages  # nothing raised from the project


def test_filters_are_narrow_and_per_subcommand() -> None:
    assert subcommand_of(["--config", "x.yaml"]) is None and subcommand_of(["predict", "--config", "x"]) == "predict"
    assert subcommand_of({"subcommand": "test"}) == "test"
    please = "Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be provided"
    assert is_filtered(please, UserWarning, "lightning.pytorch.trainer.call", "predict")
    assert not is_filtered(please, UserWarning, "lightning.pytorch.trainer.call", "fit")  # a resume needs its EMA
    leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`"
    assert is_filtered(leaf, FutureWarning, "lightning.pytorch.utilities._pytree", "fit")
    assert not is_filtered(leaf, FutureWarning, "my_code", "fit")  # only Lightning's own use
    assert not is_filtered("The dirpath has changed", UserWarning, "lightning.pytorch", "fit")  # fixed at source
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("error")  # a user's -W error stays in front of the project's filters
        install_warning_filters(["fit"])
        with pytest.raises(FutureWarning):
            warnings.warn_explicit(leaf, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")


def test_lightning_product_tips_are_dropped_and_other_info_kept(caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    install_tip_filter()
    install_tip_filter()  # idempotent
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("`Trainer.fit` stopped: `max_steps=3` reached.")
    assert [r.getMessage() for r in caplog.records] == ["`Trainer.fit` stopped: `max_steps=3` reached."]
