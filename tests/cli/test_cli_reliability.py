"""One clear error line for bad checkpoints, YAML, directories; checkpoint hparams vs flags; output dirs; threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from dpmot_tiny import REPO, error_lines, tiny_config
from lightning.pytorch.callbacks import Callback

from lightning_dpmot.callbacks import GracefulShutdown, NonFiniteGuard
from lightning_dpmot.cli import check_config_files, explicit_model_keys, main
from lightning_dpmot.utils.checkpoint_io import SafeCheckpointIO


class FailAtStep(Callback):
    """Raise in ``on_train_batch_start`` once ``global_step`` reaches ``step`` (a crash inside the training loop)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step >= self.step:
            raise RuntimeError(f"boom at step {trainer.global_step}")


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    """main(args) expected to exit: (exit code, dpmot error lines, whole stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    return int(exc.value.code or 0), error_lines(err), err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """last.ckpt of a 2-step tiny EDM on digits (sigma_data 0.5, model_channels 8)."""
    root = tmp_path_factory.mktemp("tiny")
    main(["fit", "--config", str(tiny_config(root, max_steps=2))])
    return root / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("kind", ["empty", "truncated", "random"])
def test_broken_checkpoint_is_one_line_naming_the_file(
    kind: str, tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / f"{kind}.ckpt"
    data = tiny_ckpt.read_bytes()
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "random": os.urandom(3000)}[kind])
    code, lines, err = run_main(["fit", "--config", str(tiny_config(tmp_path)), f"--ckpt_path={bad}"], capsys)
    assert code == 2 and len(lines) == 1, err
    assert str(bad) in lines[0] and "CheckpointError" in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_weights_only_false_is_refused(tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(tiny_config(tmp_path)), f"--ckpt_path={tiny_ckpt}", "--weights_only=false"]
    code, lines, _ = run_main(args, capsys)
    assert code == 2 and len(lines) == 1 and "weights_only=True" in lines[0]


def test_debug_env_shows_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPMOT_DEBUG", "1")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        main(["fit", "--config", str(tiny_config(tmp_path)), f"--ckpt_path={tmp_path / 'empty.ckpt'}"])


def test_yaml_syntax_error_names_file_line_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    code, lines, err = run_main(
        ["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--config", str(bad)], capsys
    )
    assert code == 2 and len(lines) == 1, err
    assert str(bad) in lines[0] and "line 3, column 1" in lines[0] and "YAML syntax error" in lines[0]
    with pytest.raises(ValueError, match="bad.yaml"):
        check_config_files([f"--config={bad}"])


def test_existing_config_yaml_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["fit", "--config", str(tiny_config(tmp_path, max_steps=1)), "--trainer.logger=false"]
    args += [f"--trainer.default_root_dir={tmp_path / 'out'}"]
    main(args)
    assert (tmp_path / "out" / "config.yaml").is_file()
    code, lines, err = run_main(args, capsys)
    assert code == 2 and len(lines) == 1, err
    assert "FileExistsError" in lines[0] and str(tmp_path / "out" / "config.yaml") in lines[0]


def test_unwritable_default_root_dir_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    args = ["fit", "--config", str(tiny_config(tmp_path)), f"--trainer.default_root_dir={blocker / 'run'}"]
    code, lines, err = run_main(args, capsys)
    assert code == 2 and len(lines) == 1, err
    assert "default_root_dir" in lines[0] and str(blocker) in lines[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only directories")
def test_read_only_default_root_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        args = ["fit", "--config", str(tiny_config(tmp_path)), f"--trainer.default_root_dir={ro / 'run'}"]
        code, lines, _ = run_main(args, capsys)
        assert code == 2 and len(lines) == 1 and "PermissionError" in lines[0] and str(ro) in lines[0]
    finally:
        ro.chmod(0o755)


def test_default_root_dir_moves_relative_logger_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs' CSVLogger `save_dir: runs` is relative to --trainer.default_root_dir when it is set."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    cli = main(
        [
            "fit",
            "--config",
            str(REPO / "configs/quickstart.yaml"),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            "--model.init_args.net.init_args.model_channels=8",
        ]
    )
    assert Path(cli.trainer.log_dir) == root / "runs" / "quickstart" / "version_0"
    assert (root / "runs" / "quickstart" / "version_0" / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()


def test_failed_run_leaves_no_empty_version_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "test_cli_reliability.FailAtStep", "init_args": {"step": 0}})
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="boom at step 0"):
        main(["fit", "--config", str(config)])
    assert not (tmp_path / "runs" / "tiny").exists()  # neither version_0 nor the then empty name folder


def test_crash_keeps_the_run_folder_with_its_checkpoint(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, max_steps=10)
    cfg = yaml.safe_load(config.read_text())
    cfg["trainer"]["callbacks"].append({"class_path": "test_cli_reliability.FailAtStep", "init_args": {"step": 3}})
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="boom at step 3"):
        main(["fit", "--config", str(config)])
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (tmp_path / "runs" / "tiny" / "version_0").is_dir()


def test_explicit_model_keys() -> None:
    argv = [
        "fit",
        "--model.init_args.sigma_data",
        "0.9",
        "--model.init_args.net.init_args.model_channels=16",
        "--model.sampler.num_steps=3",
        "--data.init_args.batch_size=4",
    ]
    assert explicit_model_keys(argv) == {"sigma_data", "net.model_channels", "sampler.num_steps"}


def test_flags_conflicting_with_checkpoint_hparams_fail_in_fit(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["fit", "--config", str(tiny_config(tmp_path)), f"--ckpt_path={tiny_ckpt}"]
    code, lines, err = run_main([*args, "--model.init_args.sigma_data", "0.9"], capsys)
    assert code == 2 and len(lines) == 1, err
    assert "sigma_data=0.9" in lines[0] and "trained with 0.5" in lines[0] and str(tiny_ckpt) in lines[0]
    code, lines, _ = run_main([*args, "--model.init_args.net.init_args.model_channels=16"], capsys)
    assert code == 2 and "net.model_channels=16" in lines[0] and "trained with 8" in lines[0]


def test_matching_flags_resume(tiny_ckpt: Path, tmp_path: Path) -> None:
    args = ["fit", "--config", str(tiny_config(tmp_path, max_steps=3)), f"--ckpt_path={tiny_ckpt}"]
    cli = main([*args, "--model.init_args.sigma_data=0.5"])
    assert cli.trainer.global_step == 3


def test_evaluation_flags_win_with_a_warning(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = main(
        [
            "validate",
            "--config",
            str(tiny_config(tmp_path)),
            "--trainer.limit_val_batches=1",
            f"--ckpt_path={tiny_ckpt}",
            "--model.init_args.sigma_data=0.9",
        ]
    )
    assert cli.model.hparams.sigma_data == 0.9
    err = capsys.readouterr().err
    assert "warning: the command line gives sigma_data=0.9" in err and "0.5" in err


def test_checkpoint_of_another_model_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy = tmp_path / "toy"
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/edm/toy2d.yaml"),
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={toy}",
        ]
    )
    (ckpt,) = toy.rglob("last.ckpt")
    code, lines, err = run_main(
        ["fit", "--config", str(REPO / "configs/quickstart.yaml"), f"--ckpt_path={ckpt}"], capsys
    )
    assert code == 2 and len(lines) == 1, err
    assert "MLPDenoiserNet" in lines[0] and "DDPMppUNet" in lines[0] and "another model" in lines[0]
    assert "data_shape [2]" in lines[0]


def test_checkpoint_for_other_data_says_so(
    tiny_ckpt: Path, tmp_path: Path, fake_cifar10: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"] = {
        "class_path": "lightning_dpmot.data.CIFAR10DataModule",
        "init_args": {"root": str(fake_cifar10), "batch_size": 4, "num_workers": 0},
    }
    config.write_text(yaml.safe_dump(cfg))
    code, lines, err = run_main(["fit", "--config", str(config), f"--ckpt_path={tiny_ckpt}"], capsys)
    assert code == 2 and len(lines) == 1, err
    assert "data_shape [1, 8, 8]" in lines[0] and "[3, 32, 32]" in lines[0] and "CIFAR10DataModule" in lines[0]


def test_every_trainer_gets_the_guards_and_safe_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(tiny_config(tmp_path)), "--trainer.fast_dev_run=1"])
    kinds = [type(c) for c in cli.trainer.callbacks]
    assert kinds.count(GracefulShutdown) == 1 and kinds.count(NonFiniteGuard) == 1
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)


def test_num_threads_is_applied(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = torch.get_num_threads()
    try:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--num_threads=2", "--trainer.fast_dev_run=1"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["num_threads"] == 1


def test_a_resumed_job_may_reuse_its_log_directory_with_the_identical_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A requeued SLURM job restarts in its fixed log directory with ``--ckpt_path last``: same config → resumes;
    another config there is still refused (nothing overwritten)."""
    config = tiny_config(tmp_path, max_steps=2)
    args = ["fit", "--config", str(config), "--trainer.logger=false", "--ckpt_path=last"]
    args += [f"--trainer.default_root_dir={tmp_path / 'out'}"]
    main(args)
    saved = (tmp_path / "out" / "config.yaml").read_text()
    main(args)  # the identical command: resumes from last.ckpt (step 2 = max_steps: nothing left to train)
    assert (tmp_path / "out" / "config.yaml").read_text() == saved
    code, lines, err = run_main([*args, "--trainer.max_steps=3"], capsys)
    assert code == 2 and len(lines) == 1, err
    assert "FileExistsError" in lines[0] and "already exists" in lines[0]
    assert (tmp_path / "out" / "config.yaml").read_text() == saved


def test_abbreviated_flags_are_rejected_and_help_says_dpmot(tmp_path: Path) -> None:
    """``--trainer.max_step`` is not silently taken as ``max_steps`` (argparse prefix matching is off), and
    ``python -m lightning_dpmot --help`` calls the program ``dpmot``."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = str(tiny_config(tmp_path))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_dpmot",
            "fit",
            "--config",
            config,
            "--trainer.max_step",
            "3",
            "--print_config",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 2 and "unrecognized arguments: --trainer.max_step 3" in out.stderr, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-m", "lightning_dpmot", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("usage: dpmot "), out.stdout[:200]


def test_gpu_config_on_a_machine_without_gpu_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["fit", "--config", str(tiny_config(tmp_path)), "--trainer.accelerator=gpu"]
    code, lines, err = run_main(args, capsys)
    assert code == 2 and len(lines) == 1, err
    assert "No supported gpu backend found" in lines[0] and "--trainer.accelerator cpu" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing was created
