"""The whole `dpmot test` path of configs/eval/unibench_gpu.yaml on the real UniBench files, with tiny random models
(tiny T5 directory, tiny CLIP guides and scorers), 2 prompts per split, k = 1, 2 Euler steps, on the CPU."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from prompt_eval_inputs import UNIBENCH, unibench_gpu_callbacks
from test_cli import config_args, webdataset_and_t5

from lightning_dpmot.cli import main
from lightning_dpmot.metrics.prompt_set_eval import RESULT_COLUMNS

pytestmark = pytest.mark.skipif(
    not (UNIBENCH / "English" / "simple_scene.txt").is_file(),
    reason=f"UniBench prompts not found at {UNIBENCH} (../shared/unibench beside the repo root, or set DPMOT_UNIBENCH)",
)


def test_dpmot_test_on_unibench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    cli = main(
        [
            "test",
            *config_args("eval/unibench_gpu.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.precision=32",
            "--trainer.limit_test_batches=1",
            *webdataset_and_t5(inputs),
            "--config",
            str(unibench_gpu_callbacks(inputs, UNIBENCH, max_prompts=2, k=1)),
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    out = next(tmp_path.glob("runs/eval-unibench/version_*/unibench"))
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert list(reader.fieldnames or []) == list(RESULT_COLUMNS)
        rows = list(reader)
    assert [(r["split"], r["language"]) for r in rows] == [
        (s, lang) for s in ("simple_scene", "complex_scene") for lang in ("English", "Chinese")
    ]
    for row in rows:
        assert (row["n_prompts"], row["k"], row["n_images"], row["nfe"]) == ("2", "1", "2", "2")
        assert row["guide_key"] == "caption_en+caption_zh" and row["images_of"] == "English"
        assert row["scorer"].endswith(f"scorer_{row['language']}")
        for key in ("clip_score", "clip_score_std", "seconds_per_image", "peak_memory_mb", "peak_memory_mb_per_image"):
            assert math.isfinite(float(row[key])), key
        assert row["exact"] == "" and row["fid"] == ""  # UniBench has no labels and no real images
        metric = cli.trainer.callback_metrics[f"eval/{row['split']}/{row['language']}/clip_score"]
        assert float(metric) == pytest.approx(float(row["clip_score"]), rel=1e-5)
    assert math.isfinite(float(cli.trainer.callback_metrics["test/loss"]))

    with open(out / "prompts.csv", newline="", encoding="utf-8") as f:
        prompts = list(csv.DictReader(f))
    english = (UNIBENCH / "English" / "complex_scene.txt").read_text(encoding="utf-8").splitlines()
    chinese = (UNIBENCH / "Chinese" / "complex_scene.txt").read_text(encoding="utf-8").splitlines()
    zh_rows = [p for p in prompts if (p["split"], p["language"]) == ("complex_scene", "Chinese")]
    assert [p["prompt"] for p in zh_rows] == [line.strip() for line in chinese[:2]]
    assert [p["lm_prompt"] for p in zh_rows] == [line.strip() for line in english[:2]]
    assert [int(p["seed"]) for p in zh_rows] == [0, 1]
    assert (out / "complex_scene_Chinese.png").is_file() and all((out / p["file"]).is_file() for p in prompts)
