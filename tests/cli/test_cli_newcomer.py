"""The newcomer's hour (issue 15): help that teaches, a closing summary, one experiment in one folder."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dpmot_tiny import REPO, dpmot, error_lines, tiny_config
from jsonargparse import Namespace

from lightning_dpmot.callbacks.summary import RunSummary, new_files
from lightning_dpmot.cli import main
from lightning_dpmot.cli_help import SUBCOMMAND_HELP, describe_config, did_you_mean, shipped_configs
from lightning_dpmot.run_dirs import name_wandb_loggers, redirect_to_training_run, training_run_dir

QUICKSTART = str(REPO / "configs/quickstart.yaml")


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code in (0, None)
    return capsys.readouterr().out


def _squash(text: str) -> str:
    return " ".join(text.split())


# ---- help --------------------------------------------------------------------------------------------------------
def test_main_help_names_subcommands_configs_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    assert out.startswith("usage: dpmot ")
    flat = _squash(out)
    for text in SUBCOMMAND_HELP.values():  # whole, not cut off mid-sentence
        assert _squash(text) in flat
    for folder in ("edm", "aot_edm", "dpm", "dpm_ot", "text2img", "eval", "matching", "cluster", "loggers"):
        assert f"  {folder}:\n" in out
    lines = out.splitlines()
    for files in shipped_configs(REPO / "configs").values():
        for path, description in files:
            shown = (str(path.relative_to(REPO)), str(path))
            line = next(line for line in lines if line.strip().split(" ", 1)[0] in shown)
            assert description and line.rstrip().endswith(description)
    assert "dpmot fit --config configs/quickstart.yaml" in out
    assert re.search(r"dpmot predict --config \S+ --ckpt_path \S+\.ckpt", out)
    assert re.search(r"dpmot test --config \S+ --config configs/eval/\S+\.yaml --ckpt_path", out)
    assert "EDMModule" in out and "DigitsDataModule" in out


def test_fit_help_lists_the_projects_classes(capsys: pytest.CaptureFixture[str]) -> None:
    flat = _squash(_help(["fit", "--help"], capsys)).replace("lightning_ dpmot", "lightning_dpmot")
    for name in ("models.EDMModule", "models.DPMOTModule", "data.DigitsDataModule", "data.CIFAR10DataModule"):
        assert f"lightning_dpmot.{name}" in flat


def test_short_class_names_resolve(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(
        ["fit", "--config", QUICKSTART, "--model", "DPMModule", "--data", "Toy2DDataModule", "--print_config"], capsys
    )
    config = yaml.safe_load(out)
    assert config["model"]["class_path"] == "lightning_dpmot.models.DPMModule"
    assert config["data"]["class_path"] == "lightning_dpmot.data.Toy2DDataModule"
    assert "--model.sigma_data" in _help(["fit", "--model.help", "EDMModule"], capsys)


def test_abbreviated_flag_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", QUICKSTART, "--trainer.max_step", "10", "--print_config"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert error_lines(err) == [
        "dpmot: error: unrecognized arguments: --trainer.max_step 10 (did you mean --trainer.max_steps?)"
    ]
    assert len(err.strip().splitlines()) == 2 and "dpmot fit --help" in err


def test_did_you_mean_and_config_descriptions(tmp_path: Path) -> None:
    options = ["--trainer.max_steps", "--trainer.max_epochs"]
    assert (
        did_you_mean("unrecognized arguments: --trainer.max_epoch=3", options)
        == " (did you mean --trainer.max_epochs?)"
    )
    assert did_you_mean("unrecognized arguments: --zzz 3", options) == ""
    (tmp_path / "b").mkdir()
    (tmp_path / "top.yaml").write_text("# Top config.\n# more\na: 1\n")
    (tmp_path / "b" / "long.yaml").write_text("# " + "word " * 40 + "\n")
    (tmp_path / "b" / "bare.yaml").write_text("a: 1\n")
    assert describe_config(tmp_path / "top.yaml") == "Top config."
    long = describe_config(tmp_path / "b" / "long.yaml")
    assert long.endswith("…") and len(long) <= 80
    assert describe_config(tmp_path / "b" / "bare.yaml") == ""
    groups = shipped_configs(tmp_path)
    assert list(groups) == ["", "b"] and [p.name for p, _ in groups["b"]] == ["bare.yaml", "long.yaml"]


# ---- one folder per experiment, and the closing summary -------------------------------------------------------------
def _run_config(root: Path) -> Path:
    """The tiny config with logs at runs/tiny/version_N (relative) and checkpoints in the run's checkpoints/."""
    path = tiny_config(root, max_steps=2)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["logger"][0]["init_args"]["save_dir"] = "runs"
    config["trainer"]["callbacks"][0]["init_args"].pop("dirpath")
    config["trainer"]["limit_test_batches"] = 1
    config["trainer"]["limit_predict_batches"] = 1
    config["model"]["init_args"]["sampler"] = {"name": "euler", "num_steps": 2}
    config["trainer"]["callbacks"].append({"class_path": "lightning_dpmot.callbacks.SampleWriter"})
    path.write_text(yaml.safe_dump(config))
    return path


def _summary_paths(out: str, subcommand: str) -> list[Path]:
    """The paths printed in the summary block of ``subcommand``."""
    block = out[out.index(f"dpmot {subcommand} finished") :].splitlines()[1:]
    paths = []
    for line in block:
        if not line.startswith("  "):
            break
        if "=" in line or line.strip().endswith(":") or line.strip().startswith("..."):
            continue
        text = line.split(": ", 1)[1] if ": " in line else line.strip()
        paths.append(Path(text.split("/ (")[0]))
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding tiny.yaml and runs/tiny/version_0 of a 2-step fit (checkpoints/last.ckpt inside)."""
    root = tmp_path_factory.mktemp("newcomer")
    config = _run_config(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "--config", str(config)])
    assert (root / "runs/tiny/version_0/checkpoints/last.ckpt").is_file()
    return root


def test_fit_summary_names_files_that_exist(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(trained)
    capsys.readouterr()
    main(["fit", "--config", "tiny.yaml", "--trainer.logger.init_args.name=summary"])
    out = capsys.readouterr().err
    paths = _summary_paths(out, "fit")
    assert Path("runs/summary/version_0") in paths and Path("runs/summary/version_0/checkpoints/last.ckpt") in paths
    assert Path("runs/summary/version_0/metrics.csv") in paths
    assert all(p.exists() for p in paths), paths
    assert re.search(r"^    train/loss = \d", out, re.M)


def test_summary_is_silent_off_rank_zero_and_groups_folders(tmp_path: Path) -> None:
    stream = io.StringIO()
    RunSummary(stream=stream).teardown(SimpleNamespace(is_global_zero=False, log_dir="x"), None, "fit")  # type: ignore[arg-type]
    assert stream.getvalue() == ""
    (tmp_path / "grid").mkdir()
    for i in range(5):
        (tmp_path / "grid" / f"{i}.png").write_bytes(b"x")
    (tmp_path / "a.csv").write_text("x")
    assert new_files(tmp_path, 0.0) == [(tmp_path / "a.csv", 1), (tmp_path / "grid", 5)]
    assert new_files(tmp_path, 4e9) == []


def test_predict_and_test_from_a_checkpoint_write_into_the_training_run(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(trained)
    ckpt = "runs/tiny/version_0/checkpoints/last.ckpt"
    for subcommand in ("predict", "test"):
        capsys.readouterr()
        main([subcommand, "--config", "tiny.yaml", "--ckpt_path", ckpt])
        out = capsys.readouterr().err
        folders = sorted((trained / "runs/tiny/version_0").glob(f"{subcommand}-*"))
        assert len(folders) == 1 and (folders[0] / "config.yaml").is_file()
        assert all(p.exists() for p in _summary_paths(out, subcommand))
        assert "warning: the config gives model" not in out  # linked num_classes, default optimizer: no false alarm
        assert f"writing to runs/tiny/version_0/{folders[0].name}" in out
    assert sorted(p.name for p in (trained / "runs/tiny").iterdir()) == ["version_0"]  # no version_1
    assert list((trained / "runs/tiny/version_0").glob("predict-*/predictions/*.png"))
    assert "test/loss" in out


def test_explicit_output_flags_keep_lightnings_versions(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    ckpt = str(trained / "runs/tiny/version_0/checkpoints/last.ckpt")
    main(["predict", "--config", "tiny.yaml", "--ckpt_path", ckpt, "--trainer.default_root_dir", "elsewhere"])
    assert (trained / "elsewhere/runs/tiny/version_0/predictions").is_dir()
    assert training_run_dir(ckpt) == trained / "runs/tiny/version_0"
    assert training_run_dir(trained / "tiny.yaml") is None


def test_resume_continues_in_its_own_version_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(_run_config(tmp_path))
    main(["fit", "--config", config])
    run = tmp_path / "runs/tiny/version_0"
    main(["fit", "--config", config, "--trainer.max_steps=4", "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no last-v1.ckpt
    assert len(list(run.glob("config-resume-*.yaml"))) == 1 and (run / "config.yaml").is_file()
    with (run / "metrics.csv").open() as f:
        steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")})
    assert steps == [0, 1, 2, 3]  # the first start's rows are kept, the resume's appended
    failing = yaml.safe_load(Path(config).read_text())
    failing["trainer"]["callbacks"].append({"class_path": "test_cli_reliability.FailAtStep", "init_args": {"step": 0}})
    failing["trainer"]["callbacks"][0]["init_args"]["save_last_on_exception"] = False  # nothing saved by the failure
    Path(config).write_text(yaml.safe_dump(failing))
    with pytest.raises(RuntimeError, match="boom"):
        main(["fit", "--config", config, "--trainer.max_steps=6", "--ckpt_path", str(run / "checkpoints/last.ckpt")])
    assert len(list(run.glob("config-resume-*.yaml"))) == 1  # the failed resume left no record of itself
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "metrics.csv").is_file()


def test_wandb_fragment_keeps_the_run_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    config = str(_run_config(tmp_path))
    wandb = pytest.importorskip("wandb")
    try:
        cli = main(["fit", "--config", config, "--config", str(REPO / "configs/loggers/wandb.yaml")])
    finally:
        wandb.finish()  # a process ends here: no open run and no cached "disabled" settings for the next test
        wandb.teardown()
    loggers = cli.config["fit"]["trainer"]["logger"]
    assert [lg["class_path"].rsplit(".", 1)[-1] for lg in loggers] == ["CSVLogger", "ResumableWandbLogger"]
    assert loggers[1]["init_args"]["name"] == "tiny" and loggers[1]["init_args"]["save_dir"] == "runs/tiny"
    assert (tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt").is_file()
    assert not (tmp_path / "runs/lightning_logs").exists()


def test_name_wandb_loggers_leaves_named_runs_alone() -> None:
    csv_logger = Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs", name="exp", version=None)
    )
    named = Namespace(
        class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(name="job", save_dir="runs")
    )
    trainer = Namespace(logger=[csv_logger, named])
    name_wandb_loggers(trainer)
    assert named.init_args.name == "job" and named.init_args.save_dir == "runs"


def _csv(name: str) -> Namespace:
    return Namespace(
        class_path="lightning.pytorch.loggers.CSVLogger", init_args=Namespace(save_dir="runs", name=name, version=None)
    )


def test_redirect_names_the_evaluation_and_never_reuses_a_folder(tmp_path: Path) -> None:
    run = tmp_path / "runs/quickstart/version_3"
    run.mkdir(parents=True)
    trainer = Namespace(logger=[_csv("eval")])  # configs/eval/fid_vs_nfe.yaml renames the logger
    folder = redirect_to_training_run(trainer, "test", run, "20260101-000000")
    assert folder == run / "test-eval-20260101-000000"
    args = trainer.logger[0].init_args
    assert (Path(args.save_dir) / args.name / args.version) == folder
    folder.mkdir()
    again = redirect_to_training_run(Namespace(logger=[_csv("quickstart")]), "predict", run, "20260101-000000")
    assert again == run / "predict-20260101-000000"
    folder2 = redirect_to_training_run(Namespace(logger=[_csv("eval")]), "test", run, "20260101-000000")
    assert folder2 == run / "test-eval-20260101-000000-2"
    default = Namespace(logger=None)  # Lightning's default logger would write runs/lightning_logs/version_N
    assert redirect_to_training_run(default, "validate", run, "x").parent == run
    resumed = Namespace(logger=[_csv("quickstart")])
    assert redirect_to_training_run(resumed, "fit", run, "x") == run
    assert resumed.logger[0].class_path == "lightning_dpmot.loggers.ResumableCSVLogger"
    assert Path(resumed.logger[0].init_args.save_dir) / resumed.logger[0].init_args.version == run


@pytest.mark.slow
def test_two_process_ddp_prints_one_summary_and_uses_one_folder(tmp_path: Path) -> None:
    """Under DDP (the launcher re-executes the command per rank) only rank 0 prints, and every rank agrees on the
    evaluation folder (no hang in the summary's collective, one predict-<time>/ folder)."""
    config = str(_run_config(tmp_path))
    ddp = ["--trainer.devices=2", "--trainer.strategy=ddp"]
    fit = dpmot("fit", "--config", config, *ddp, cwd=tmp_path, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert fit.stderr.count("dpmot fit finished") == 1
    ckpt = "runs/tiny/version_0/checkpoints/last.ckpt"
    pred = dpmot("predict", "--config", config, "--ckpt_path", ckpt, *ddp, cwd=tmp_path, timeout=600)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert pred.stderr.count("dpmot predict finished") == 1
    assert len(list((tmp_path / "runs/tiny/version_0").glob("predict-*"))) == 1
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == ["version_0"]
