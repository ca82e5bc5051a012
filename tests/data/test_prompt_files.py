"""Prompt files: aligned bilingual lines, clear errors, and dpmot predict writing a per-prompt CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_dpmot.data import ShapesCaptionsDataModule
from lightning_dpmot.data.prompts import read_prompt_files


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_aligned_prompt_files(tmp_path: Path) -> None:
    en = write(tmp_path / "en.txt", "a red circle\na small blue square above a green cross\n\n")
    zh = write(tmp_path / "zh.txt", "一个红色圆形\n一个小的蓝色正方形在一个绿色十字的上面\n")
    assert read_prompt_files(en, zh) == [
        {"caption_en": "a red circle", "caption_zh": "一个红色圆形"},
        {
            "caption_en": "a small blue square above a green cross",
            "caption_zh": "一个小的蓝色正方形在一个绿色十字的上面",
        },
    ]
    assert read_prompt_files(en) == [
        {"caption_en": "a red circle"},
        {"caption_en": "a small blue square above a green cross"},
    ]


@pytest.mark.parametrize(
    ("en_text", "zh_text", "error", "match"),
    [
        ("", None, ValueError, r"en.txt' holds no prompt"),
        ("\n\n", None, ValueError, r"holds no prompt"),
        ("a\n\nb\n", None, ValueError, r"empty lines at \[2\]"),
        ("a\nb\n", "一\n", ValueError, r"not aligned: .*en.txt' has 2 prompts, .*zh.txt' has 1"),
    ],
)
def test_bad_prompt_files_fail_clearly(
    tmp_path: Path, en_text: str, zh_text: str | None, error: type, match: str
) -> None:
    en = write(tmp_path / "en.txt", en_text)
    zh = write(tmp_path / "zh.txt", zh_text) if zh_text is not None else None
    with pytest.raises(error, match=match):
        read_prompt_files(en, zh)
    with pytest.raises(error, match=match):
        ShapesCaptionsDataModule(resolution=16, predict_prompts=str(en), predict_prompts_zh=str(zh) if zh else None)


def test_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt' does not exist"):
        read_prompt_files(tmp_path / "nope.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_prompt_files(tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="predict_prompts_zh goes with a prompt file"):
        ShapesCaptionsDataModule(resolution=16, predict_prompts_zh=str(tmp_path / "x.txt"))


def test_prompt_file_drives_generation_conditions(tmp_path: Path) -> None:
    en = write(tmp_path / "en.txt", "a red circle\na blue square\na green cross\n")
    zh = write(tmp_path / "zh.txt", "一个红色圆形\n一个蓝色正方形\n一个绿色十字\n")
    dm = ShapesCaptionsDataModule(
        resolution=16, predict_prompts=str(en), predict_prompts_zh=str(zh), predict_num_samples=5
    )
    cond = dm.generation_conditions(torch.arange(5))
    assert cond["prompt_index"].tolist() == [0, 1, 2, 0, 1]
    assert cond["caption_en"][4] == "a blue square" and cond["caption_zh"][2] == "一个绿色十字"
    batch = next(iter(dm.predict_dataloader()))
    assert batch["caption_en"] == ["a red circle", "a blue square", "a green cross", "a red circle", "a blue square"]


def test_predict_writes_a_per_prompt_csv(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from conftest import quiet_trainer, tiny_text2img

    from lightning_dpmot.callbacks import SampleWriter
    from lightning_dpmot.sampling import SamplerSpec

    en = write(tmp_path / "en.txt", "a red circle\na blue square\n")
    zh = write(tmp_path / "zh.txt", "一个红色圆形\n一个蓝色正方形\n")
    dm = ShapesCaptionsDataModule(
        resolution=16, predict_prompts=str(en), predict_prompts_zh=str(zh), predict_num_samples=4, predict_batch_size=3
    )
    model = tiny_text2img(sampler=SamplerSpec("euler", num_steps=2))
    out = tmp_path / "pred"
    quiet_trainer(tmp_path, callbacks=[SampleWriter(str(out))]).predict(model, dm, return_predictions=False)
    rows = list(csv.DictReader(open(out / "prompts.csv", encoding="utf-8")))
    assert [r["seed"] for r in rows] == ["0", "1", "2", "3"] and rows[3]["png"] == "000003.png"
    assert [r["caption_en"] for r in rows] == ["a red circle", "a blue square"] * 2
    assert rows[1]["caption_zh"] == "一个蓝色正方形" and all((out / r["png"]).is_file() for r in rows)
