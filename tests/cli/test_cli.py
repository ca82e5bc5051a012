"""Every config parses (--print_config) and runs (fast_dev_run); bad keys and types fail with their name."""

from __future__ import annotations

import copy
import csv
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_edm_checkpoint

from lightning_dpmot.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.relative_to(REPO / "configs").as_posix() for p in (REPO / "configs").rglob("*.yaml"))
# partial configs, composed over a full one, and the subcommand they are for
FRAGMENTS = {
    "loggers/wandb.yaml": ("quickstart.yaml", "fit"),
    "eval/fid_vs_nfe.yaml": ("quickstart.yaml", "test"),
    "eval/aot_sweep.yaml": ("aot_edm/digits.yaml", "test"),
    "eval/solver_sweep.yaml": ("aot_edm/digits.yaml", "test"),
    "eval/ipndm_sweep.yaml": ("aot_edm/digits.yaml", "test"),
    "eval/few_step_sweep.yaml": ("aot_edm/digits.yaml", "test"),
    "eval/dg_sweep.yaml": ("quickstart.yaml", "test"),
    "eval/shapes_text2img.yaml": ("text2img/shapes.yaml", "test"),
    "eval/unibench_gpu.yaml": ("text2img/webdataset_t5.yaml", "test"),
    "text2img/clip_guidance.yaml": ("text2img/shapes.yaml", "predict"),
    "cluster/bf16.yaml": ("quickstart.yaml", "fit"),
    "cluster/slurm.yaml": ("quickstart.yaml", "fit"),
    "cluster/ddp.yaml": ("quickstart.yaml", "fit"),
    "loggers/wandb_slurm.yaml": ("quickstart.yaml", "fit"),
}
# configs run by another subcommand than fit, and what builds their inputs (checkpoints) in tmp_path
SUBCOMMANDS = {"dpm_ot/digits_sample.yaml": "predict"}
TINY_UNET = [
    "--model.init_args.net.init_args.model_channels=8",
    "--model.init_args.net.init_args.num_blocks=1",
    "--model.init_args.net.init_args.channel_mult=[1,1]",
    "--model.init_args.net.init_args.attn_resolutions=[16]",
]


def config_args(name: str) -> list[str]:
    if name in FRAGMENTS:
        return ["--config", str(REPO / "configs" / FRAGMENTS[name][0]), "--config", str(REPO / "configs" / name)]
    return ["--config", str(REPO / "configs" / name)]


def subcommand(name: str) -> str:
    return FRAGMENTS[name][1] if name in FRAGMENTS else SUBCOMMANDS.get(name, "fit")


def dpm_ot_checkpoints(root: Path) -> list[str]:
    """Overrides pointing digits_sample.yaml at a 2-step tiny EDM and a 2-step potential, both made by dpmot fit."""
    tiny_edm_checkpoint(root / "edm")
    ot_args = ["--model.init_args.max_targets=32", "--trainer.max_steps=2", "--trainer.logger=false"]
    main(["fit", *config_args("dpm_ot/digits_fit.yaml"), *ot_args, f"--trainer.default_root_dir={root / 'ot'}"])
    return [
        f"--model.init_args.diffusion_ckpt={root / 'edm' / 'last.ckpt'}",
        f"--model.init_args.ot_ckpt={root / 'ot' / 'checkpoints' / 'last.ckpt'}",
    ]


def webdataset_and_t5(root: Path) -> list[str]:
    """Overrides pointing text2img/webdataset_t5.yaml at two tiny shards and a tiny local T5 directory (CPU)."""
    import io
    import tarfile

    from PIL import Image

    from lightning_dpmot.nets.text_encoder import TextEncoder

    root.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for i in range(8):
                buf = io.BytesIO()
                Image.new("RGB", (20, 16), (30 * i, 200 - 20 * i, 90)).save(buf, "PNG")
                for name, data in ((f"{s}{i:04d}.png", buf.getvalue()), (f"{s}{i:04d}.txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    tiny = TextEncoder.tiny_random(dim=16)
    tiny.hf_model.save_pretrained(root / "t5")
    tiny.tokenizer.save_pretrained(root / "t5")
    return [
        f"--data.init_args.train={root / 'shard-*.tar'}",
        "--data.init_args.resolution=16",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        f"--data.init_args.index_cache_dir={root / 'index'}",
        "--data.init_args.val_fraction=0.25",
        f"--model.init_args.text_encoder.init_args.pretrained={root / 't5'}",
        "--model.init_args.text_encoder.init_args.dtype=float32",
        "--model.init_args.text_encoder.init_args.cache=false",
        "--model.init_args.net.init_args.model_channels=8",
        "--model.init_args.net.init_args.num_blocks=1",
        "--model.init_args.net.init_args.channel_mult=[1,1]",
        "--model.init_args.net.init_args.attn_resolutions=[8]",
        "--model.init_args.net.init_args.cross_attn_resolutions=[8]",
    ]


def unibench_gpu_inputs(root: Path) -> list[str]:
    """eval/unibench_gpu.yaml over text2img/webdataset_t5.yaml: the tiny shards and T5, and its callback with tiny
    guides and scorers on a tiny UniBench-style folder (fast_dev_run evaluates 2 prompts per split, k = 1)."""
    from prompt_eval_inputs import tiny_prompt_dir, unibench_gpu_callbacks

    args = webdataset_and_t5(root)
    return [*args, "--config", str(unibench_gpu_callbacks(root, tiny_prompt_dir(root / "prompts")))]


def shapes_eval_inputs(root: Path) -> list[str]:
    from prompt_eval_inputs import shapes_eval_overrides

    return shapes_eval_overrides(root)


def clip_guidance_inputs(root: Path) -> list[str]:
    """text2img/clip_guidance.yaml over text2img/shapes.yaml: a tiny guide saved as a local CLIP directory, a small
    predict batch and 2 sampler steps (fast_dev_run predicts one batch with CFG + cross-modal guidance)."""
    from lightning_dpmot.nets.matching import MatchingModel

    guide = root / "guide"
    MatchingModel.small(
        image_size=16, width=32, layers=1, heads=2, embed_dim=16, text_width=32, text_layers=1, seed=0
    ).save_pretrained(guide)
    return [
        f"--model.init_args.guidance.cross_modal.guides=[{{source: {guide}, text_key: caption_en}}]",
        "--model.init_args.sampler.num_steps=2",
        "--data.init_args.batch_size=2",
    ]


def dg_fakes(root: Path) -> list[str]:
    """dg/digits_disc.yaml: a small samples.npz of fakes (random images in [-1, 1]) instead of a predict run."""
    root.mkdir(parents=True, exist_ok=True)
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.savez(root / "samples.npz", x=x.numpy())
    return [f"--model.init_args.fake={root / 'samples.npz'}"]


def dg_discriminator(root: Path) -> list[str]:
    """eval/dg_sweep.yaml: a discriminator trained 2 steps by dpmot fit --config configs/dg/digits_disc.yaml."""
    args = [*dg_fakes(root), "--trainer.max_steps=2", "--trainer.logger=false", f"--trainer.default_root_dir={root}"]
    main(["fit", *config_args("dg/digits_disc.yaml"), *args])
    return [f"--model.init_args.guidance.discriminator.checkpoint={root / 'checkpoints' / 'last.ckpt'}"]


INPUTS = {
    "dpm_ot/digits_sample.yaml": dpm_ot_checkpoints,
    "dg/digits_disc.yaml": dg_fakes,
    "eval/dg_sweep.yaml": dg_discriminator,
    "text2img/webdataset_t5.yaml": webdataset_and_t5,
    "eval/unibench_gpu.yaml": unibench_gpu_inputs,
    "eval/shapes_text2img.yaml": shapes_eval_inputs,
    "text2img/clip_guidance.yaml": clip_guidance_inputs,
}


def fast_overrides(name: str, tmp_path: Path, fake_cifar: Path) -> list[str]:
    """Make a config cheap enough for one CPU step without changing what it composes."""
    cfg = yaml.safe_load((REPO / "configs" / (FRAGMENTS[name][0] if name in FRAGMENTS else name)).read_text())
    args = ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    fragment = yaml.safe_load((REPO / "configs" / name).read_text()) if name in FRAGMENTS else {}
    # a fragment's own precision (cluster/bf16.yaml) or strategy (cluster/ddp.yaml: one gloo rank) runs as given
    if "precision" not in (fragment.get("trainer") or {}):
        args.append("--trainer.precision=32")
    if "strategy" not in (fragment.get("trainer") or {}):
        args.append("--trainer.strategy=auto")
    data_cls = cfg.get("data", {}).get("class_path", "")
    if data_cls.endswith("CIFAR10DataModule"):
        args += [
            f"--data.init_args.root={fake_cifar}",
            "--data.init_args.batch_size=4",
            "--data.init_args.num_workers=0",
        ]
    if name.startswith("dpm_ot/") and name.endswith("_fit.yaml"):
        args += ["--model.init_args.max_targets=64"]  # the OT step costs N x M x d; the fake CIFAR has 2,100 images
    net_cls = cfg.get("model", {}).get("init_args", {}).get("net", {}).get("class_path", "")
    if net_cls.endswith("DDPMppUNet") and "cifar" in name:
        args += TINY_UNET
    return args


def test_configs_exist() -> None:
    assert "quickstart.yaml" in CONFIGS and "edm/cifar10_ddpmpp.yaml" in CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_print_config(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([subcommand(name), *config_args(name), "--print_config"])
    assert exc.value.code in (0, None)
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["seed_everything"] is not None and dumped["seed_everything"] is not True, "explicit seed required"
    assert "class_path" in dumped["model"] and "class_path" in dumped["data"]


@pytest.mark.parametrize("name", CONFIGS)
def test_fast_dev_run(name: str, tmp_path: Path, fake_cifar10: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = INPUTS[name](tmp_path / "inputs") if name in INPUTS else []
    cli = main(
        [
            subcommand(name),
            *config_args(name),
            *fast_overrides(name, tmp_path, fake_cifar10),
            *inputs,
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    if subcommand(name) == "fit":
        assert cli.trainer.global_step == 1
        assert cli.trainer.callback_metrics["train/loss"].isfinite()
    elif subcommand(name) == "predict":
        written = [p for p in tmp_path.rglob("samples.npz") if "inputs" not in p.parts]
        assert len(written) == 1 and len(np.load(written[0])["x"]) > 0
    else:
        assert cli.trainer.callback_metrics["test/loss"].isfinite()
    if name.startswith("eval/") and name.endswith(("text2img.yaml", "unibench_gpu.yaml")):  # PromptSetEvaluation
        with open(next(tmp_path.rglob("results.csv")), encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert [(r["split"], r["language"], r["n_images"]) for r in rows] == [
            (s, lang, "2") for s in ("simple_scene", "complex_scene") for lang in ("English", "Chinese")
        ]
        assert all(float(r["clip_score"]) >= 0 for r in rows)


def test_cli_module_copies_without_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer factory jsonargparse builds references the whole CLI; the module must not keep that reference.

    Otherwise EMA's deepcopy of the module copies the trainer and the data (and fails under DDP on the launcher's
    process handles); the factory must still build the configured optimizer.
    """
    monkeypatch.chdir(tmp_path)
    cli = main(
        [
            "fit",
            *config_args("aot_edm/digits.yaml"),
            "--trainer.fast_dev_run=1",
            "--trainer.callbacks=[]",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.init_args.optimizer=torch.optim.AdamW",
            "--model.init_args.optimizer.lr=0.003",
        ]
    )
    model = cli.model
    payload = pickle.dumps(model.optimizer_factory)
    assert b"Trainer" not in payload and b"DigitsDataModule" not in payload
    optimizer = model.optimizer_factory(model.parameters())
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 0.003
    memo: dict[int, object] = {}
    copied = copy.deepcopy(model, memo)
    assert id(cli.trainer) not in memo and id(cli.datamodule) not in memo
    assert all(torch.equal(a, b) for a, b in zip(copied.parameters(), model.parameters(), strict=True))


def test_unknown_key_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--model.init_args.sigma_dataa=0.5"])
    assert exc.value.code != 0
    assert "sigma_dataa" in capsys.readouterr().err


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), "--data.init_args.batch_size=many"])
    assert exc.value.code != 0
    assert "batch_size" in capsys.readouterr().err


def test_bad_value_is_one_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs/edm/cifar10_ddpmpp.yaml"),
                f"--data.init_args.root={tmp_path}/nope",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.strategy=auto",
                "--trainer.fast_dev_run=1",
                *TINY_UNET,
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "dpmot: error: FileNotFoundError" in err and "nope" in err and "data_batch_1" in err


def test_console_script_and_module_entry_point() -> None:
    for cmd in (["dpmot", "--help"], [sys.executable, "-m", "lightning_dpmot", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "fit" in out.stdout and "predict" in out.stdout


def test_console_script_exit_status(tmp_path: Path) -> None:
    """A successful `dpmot fit` exits 0 (shell scripts chain on it); a bad key exits 2 with one error message."""
    base = ["dpmot", "fit", "--config", str(REPO / "configs/quickstart.yaml"), "--trainer.enable_progress_bar=false"]
    ok = subprocess.run([*base, "--trainer.fast_dev_run=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    bad = subprocess.run([*base, "--trainer.max_stepz=1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "max_stepz" in bad.stderr


@pytest.mark.slow
def test_console_script_with_two_process_ddp_on_cpu(tmp_path: Path) -> None:
    """The DDP launcher re-executes the `dpmot` command per rank; gloo must shut down cleanly (exit status 0)."""
    cmd = [
        "dpmot",
        "fit",
        "--config",
        str(REPO / "configs/aot_edm/digits.yaml"),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max_steps=3" in out.stderr + out.stdout
