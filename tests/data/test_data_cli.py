"""DataModules through LightningCLI: the base owns the loader arguments (``data.init_args.batch_size`` works for
every subclass), and a batch larger than the training split fails in ``setup`` before the sanity check."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml
from conftest import quiet_trainer, tiny_edm

from lightning_dpmot.cli import main
from lightning_dpmot.data import Toy2DDataModule

LOADER_ARGS = {
    "batch_size": 7,
    "val_batch_size": 5,
    "num_workers": 1,
    "x_flip": True,
    "predict_num_samples": 3,
    "predict_batch_size": 2,
    "predict_seed_offset": 9,
}


def _config(tmp_path: Path, data: dict[str, object]) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "logger": False, "default_root_dir": str(tmp_path)},
        "model": {
            "class_path": "lightning_dpmot.models.EDMModule",
            "init_args": {
                "net": {
                    "class_path": "lightning_dpmot.nets.DDPMppUNet",
                    "init_args": {"model_channels": 8, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": []},
                }
            },
        },
        "data": data,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_loader_arguments_reach_the_base_of_a_subclass(tmp_path: Path) -> None:
    data = {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"resolution": 8, **LOADER_ARGS}}
    cli = main(["--config", str(_config(tmp_path, data))], run=False)
    dm = cli.datamodule
    assert {key: getattr(dm, key) for key in LOADER_ARGS} == LOADER_ARGS
    assert dm.resolution == 8


def test_print_config_lists_the_base_arguments_with_subclass_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"class_path": "lightning_dpmot.data.Toy2DDataModule", "init_args": {"num_workers": 2}}
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(_config(tmp_path, data)), "--print_config"])
    init_args = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert init_args["num_workers"] == 2
    assert (init_args["batch_size"], init_args["predict_num_samples"]) == (256, 2000)  # Toy2D's own defaults
    assert init_args["val_batch_size"] is None and init_args["predict_seed_offset"] == 0  # the base's
    with pytest.raises(ValueError, match="x_flip flips images left-right and is meaningless for 2-D points"):
        Toy2DDataModule(x_flip=True)


class SanityCount(L.Callback):
    def __init__(self) -> None:
        self.sanity_checks = 0

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sanity_checks += 1


def test_batch_larger_than_the_split_fails_before_the_sanity_check(tmp_path: Path) -> None:
    counter = SanityCount()
    trainer = quiet_trainer(tmp_path, max_steps=1, enable_checkpointing=False, callbacks=[counter])
    dm = Toy2DDataModule(num_train=10, num_val=4, batch_size=16)
    message = r"toy2d-8gaussians-std0.05-scale1-seed0: batch_size=16 is larger than the training split of 10 items"
    with pytest.raises(ValueError, match=message):
        trainer.fit(tiny_edm(data_shape=(2,), num_classes=8, net=_mlp()), dm)
    assert counter.sanity_checks == 0


def _mlp():
    from functools import partial

    from lightning_dpmot.nets import MLPDenoiserNet

    return partial(MLPDenoiserNet, hidden=16, num_layers=1)


def test_batch_larger_than_the_split_is_one_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"class_path": "lightning_dpmot.data.DigitsDataModule", "init_args": {"batch_size": 2000}}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(_config(tmp_path, data)), "--trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dpmot: error: ValueError: digits-8px: batch_size=2000 is larger than the training split of 1528" in err
