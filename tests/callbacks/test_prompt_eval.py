"""PromptSetEvaluation / evaluate_prompt_set: table and files, seed rule, language pairing, scorer != guide, errors."""

from __future__ import annotations

import csv
import re
import threading
from pathlib import Path

import pytest
import torch
from conftest import REPO, quiet_trainer, tiny_text2img

from lightning_dpmot.callbacks.prompt_eval import PromptSetEvaluation
from lightning_dpmot.data.shapes import ShapesCaptionsDataModule
from lightning_dpmot.diffusion.cross_modal import CrossModalSpec, GuideModel
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.metrics.clip_score import ClipScorer
from lightning_dpmot.metrics.prompt_set_eval import RESULT_COLUMNS, SEED_STRIDE, evaluate_prompt_set, sample_seeds
from lightning_dpmot.nets.matching import MatchingModel
from lightning_dpmot.sampling.spec import SamplerSpec

BENCH = REPO / "benchmarks" / "shapes_bench"
FAST = SamplerSpec("euler", num_steps=2)
CJK = re.compile(r"[\u4e00-\u9fff]")


def prompt_dir(root: Path, n: int = 3, labels: bool = True) -> Path:
    """The first n lines of the embedded benchmark's files, laid out like UniBench."""
    folders = ["English", "Chinese"] + (["labels"] if labels else [])
    for folder in folders:
        for split in ("simple_scene", "complex_scene"):
            ext = "jsonl" if folder == "labels" else "txt"
            lines = (BENCH / folder / f"{split}.{ext}").read_text(encoding="utf-8").splitlines()[:n]
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{split}.{ext}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def spy_lm(module) -> list[str]:
    """Record every text the module's LM encodes."""
    encoder = module.text_encoder
    original, seen = encoder.encode, []

    def encode(texts):
        seen.extend(texts)
        return original(texts)

    encoder.encode = encode
    return seen


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scorer") / "clip"
    MatchingModel.small(image_size=16, width=16, text_width=16, embed_dim=8, seed=1).save_pretrained(path)
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_seed_rule() -> None:
    seeds = sample_seeds(3, 2, seed_offset=10)
    assert seeds.tolist() == [10, 10 + SEED_STRIDE, 11, 11 + SEED_STRIDE, 12, 12 + SEED_STRIDE]
    # prompt i's samples keep their seeds when fewer prompts or more samples are evaluated
    assert sample_seeds(2, 3).view(2, 3)[:, :2].tolist() == sample_seeds(3, 2).view(3, 2)[:2].tolist()
    with pytest.raises(ValueError, match="num_prompts"):
        sample_seeds(SEED_STRIDE + 1, 1)


def test_dpmot_test_loop_writes_table_grids_and_prompts(tmp_path: Path, scorer_dir: Path) -> None:
    """Through trainer.test: the eval loss still runs; 2 splits x 2 languages rows with fixed columns; seeds by the
    rule; the LM only ever reads English lines; unguided languages share one generation."""
    torch.manual_seed(0)
    module = tiny_text2img(sampler=FAST)
    seen = spy_lm(module)
    callback = PromptSetEvaluation(
        str(prompt_dir(tmp_path / "prompts")),
        k=2,
        batch_size=4,
        scorer=str(scorer_dir),
        name="unibench",
        cache_dir=str(tmp_path / "cache"),
        classifier_options={"num_train": 64, "epochs": 1},
    )
    dm = ShapesCaptionsDataModule(resolution=16, num_train=8, num_val=4, num_heldout=4, batch_size=4)
    trainer = quiet_trainer(tmp_path, callbacks=[callback], limit_test_batches=1)
    trainer.test(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["test/loss"])

    out = tmp_path / "unibench"
    columns, rows = read_csv(out / "results.csv")
    assert columns == list(RESULT_COLUMNS)
    assert [(r["split"], r["language"]) for r in rows] == [
        ("simple_scene", "English"),
        ("simple_scene", "Chinese"),
        ("complex_scene", "English"),
        ("complex_scene", "Chinese"),
    ]
    for row in rows:
        assert (row["n_prompts"], row["k"], row["n_images"]) == ("3", "2", "6")
        assert row["lm_key"] == "caption_en" and row["images_of"] == "English" and row["guide_key"] == ""
        assert row["memory_kind"] == "cpu_peak_rss" and float(row["peak_memory_mb"]) > 0
        assert (row["fid_n_generated"], row["fid_n_real"]) == ("6", "6")
        for key in ("exact", "shape", "colour", "clip_score", "fid", "seconds_per_image"):
            assert float(row[key]) == pytest.approx(float(row[key])), key  # a finite number
        assert 0 <= float(row["exact"]) <= 1 and 0 <= float(row["clip_score"]) <= 100
        metric = trainer.callback_metrics[f"eval/{row['split']}/{row['language']}/clip_score"]
        assert float(metric) == pytest.approx(float(row["clip_score"]), rel=1e-5)
    assert all(not CJK.search(text) for text in seen) and len(seen) > 0

    _, prompts = read_csv(out / "prompts.csv")
    assert len(prompts) == 4 * 6
    first = [p for p in prompts if (p["split"], p["language"]) == ("complex_scene", "Chinese")]
    assert [int(p["seed"]) for p in first] == sample_seeds(3, 2).tolist()
    assert all(CJK.search(p["prompt"]) and not CJK.search(p["lm_prompt"]) for p in first)
    assert first[0]["file"] == "images/complex_scene_English/i00000_j00.png"
    mean = sum(float(p["clip_score"]) for p in first) / len(first)
    assert mean == pytest.approx(float(rows[3]["clip_score"]), abs=1e-4)
    assert all((out / p["file"]).is_file() for p in prompts)
    assert {p.name for p in out.glob("*.png")} == {
        f"{s}_{lang}.png" for s in ("simple_scene", "complex_scene") for lang in ("English", "Chinese")
    }
    with pytest.raises(FileExistsError, match="results.csv exists"):
        trainer.test(module, datamodule=dm)


def test_chinese_rows_guide_reads_chinese_lm_reads_english(tmp_path: Path, scorer_dir: Path) -> None:
    """With cross-modal guidance and match_language, the guide reads the evaluated language's line and each
    language gets its own generation; the LM still reads the English line."""
    torch.manual_seed(0)
    module = tiny_text2img(sampler=FAST)
    seen_lm = spy_lm(module)
    guide = MatchingModel.small(image_size=16, width=16, text_width=16, embed_dim=8, seed=2)
    original, seen_guide = guide.encode_text, []
    guide.encode_text = lambda texts: (seen_guide.append(list(texts)), original(texts))[1]
    guidance = GuidanceSpec(
        scale=2.0, cross_modal=CrossModalSpec(guides=[GuideModel(source="tiny-guide", model=guide)], scale=5.0)
    )
    scorer = ClipScorer(MatchingModel.from_pretrained(scorer_dir), name="tiny-scorer")
    rows = evaluate_prompt_set(
        module,
        prompt_dir(tmp_path, n=1, labels=False),
        splits=["simple_scene"],
        guidance=guidance,
        scorer=scorer,
        out_dir=tmp_path / "out",
        extra={"setting": "cfg2+clip5"},
    )
    columns, written = read_csv(tmp_path / "out" / "results.csv")
    assert columns == ["setting", *RESULT_COLUMNS] and written[1]["setting"] == "cfg2+clip5"
    assert [(r["language"], r["guide_key"], r["images_of"]) for r in rows] == [
        ("English", "caption_en", "English"),
        ("Chinese", "caption_zh", "Chinese"),
    ]
    assert [bool(CJK.search(texts[0])) for texts in seen_guide] == [False, True]
    english = (tmp_path / "English" / "simple_scene.txt").read_text(encoding="utf-8").strip()
    assert set(seen_lm) == {english} and len(seen_lm) >= 2  # the Chinese row's own generation also read English
    assert all(r["exact"] is None and r["fid"] is None for r in rows)  # no labels: no accuracy, no FID

    with pytest.raises(ValueError, match="also a guide"):
        evaluate_prompt_set(module, tmp_path, guidance=guidance, scorer=ClipScorer(guide))


def test_scorer_equal_to_a_guide_is_refused(tmp_path: Path, scorer_dir: Path) -> None:
    guidance = GuidanceSpec(cross_modal=CrossModalSpec(guides=[GuideModel(source=str(scorer_dir))]))
    same_path = f"{scorer_dir}/../{scorer_dir.name}/"
    with pytest.raises(ValueError, match="is also a guide of the cross-modal guidance"):
        PromptSetEvaluation(str(prompt_dir(tmp_path)), guidance=guidance, scorer=same_path)
    with pytest.raises(ValueError, match="is also a guide"):
        PromptSetEvaluation(str(prompt_dir(tmp_path)), guidance=guidance, scorer={"Chinese": str(scorer_dir)})


def test_missing_split_and_misaligned_languages_are_clear_errors(tmp_path: Path) -> None:
    root = prompt_dir(tmp_path / "p", labels=False)
    with pytest.raises(FileNotFoundError, match=r"English/medium_scene.txt' does not exist"):
        PromptSetEvaluation(str(root), splits=["simple_scene", "medium_scene"])
    (root / "Chinese" / "simple_scene.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"Chinese/simple_scene.txt' does not exist"):
        PromptSetEvaluation(str(root))
    (root / "Chinese" / "complex_scene.txt").write_text("一个红色圆形\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not aligned: .*complex_scene.txt' has 3 prompts, .* has 1"):
        PromptSetEvaluation(str(root), splits=["complex_scene"])
    with pytest.raises(FileNotFoundError, match="prompt set folder"):
        PromptSetEvaluation(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="LM reads 'caption_en'"):
        evaluate_prompt_set(tiny_text2img(), root, languages={"Chinese": "caption_zh"}, splits=["complex_scene"])


def test_two_ranks_shard_and_gather_to_the_single_rank_result(tmp_path: Path) -> None:
    """Rank r generates items r, r + 2, ...; gathered and reordered they equal the one-process images."""
    torch.manual_seed(0)
    module = tiny_text2img(sampler=FAST)
    root = prompt_dir(tmp_path / "p", n=3, labels=False)
    common = dict(splits=["complex_scene"], languages={"English": "caption_en"}, k=1, batch_size=2)
    single = evaluate_prompt_set(module, root, out_dir=tmp_path / "one", **common)

    barrier, slots = threading.Barrier(2), [None, None]

    def make_gather(rank: int):
        def gather(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t
            barrier.wait()
            out = torch.cat([slots[0], slots[1]])
            barrier.wait()
            return out

        return gather

    results: dict[int, list] = {}

    def run(rank: int) -> None:
        results[rank] = evaluate_prompt_set(
            module, root, rank=rank, world_size=2, gather=make_gather(rank), out_dir=tmp_path / "two", **common
        )

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0][0]["n_images"] == 3 and single[0]["n_images"] == 3
    for i in range(3):
        name = f"images/complex_scene_English/i{i:05d}_j00.png"
        one, two = (tmp_path / "one" / name).read_bytes(), (tmp_path / "two" / name).read_bytes()
        assert one == two, name


def test_metrics_grids_and_table_reach_the_loggers(tmp_path: Path) -> None:
    """Numeric finite columns go through pl_module.log as eval/<split>/<language>/<column>; a WandbLogger also
    gets each grid as an image and the table."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:  # no wandb run
            self.images: list[tuple[str, list[str]]] = []
            self.tables: list[tuple[str, list[str], list[list]]] = []

        def log_image(self, key: str, images: list, step: int | None = None, **kwargs) -> None:
            self.images.append((key, images))

        def log_table(self, key: str, columns: list[str], data: list[list], **kwargs) -> None:
            self.tables.append((key, columns, data))

    callback = PromptSetEvaluation(str(prompt_dir(tmp_path / "p", n=1, labels=False)), name="ev")
    row = dict.fromkeys(RESULT_COLUMNS)
    row.update(split="simple_scene", language="Chinese", n_images=3, clip_score=12.5, fid=float("nan"))
    callback.rows = [row]
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "simple_scene_Chinese.png").write_bytes(b"png")
    logged: dict[str, float] = {}
    module = SimpleNamespace(log=lambda name, value, **kw: logged.__setitem__(name, (value, kw["rank_zero_only"])))
    wandb = FakeWandb()
    callback.log_results(SimpleNamespace(loggers=[wandb], global_step=7), module, tmp_path / "ev")
    assert logged == {
        "eval/simple_scene/Chinese/n_images": (3.0, True),
        "eval/simple_scene/Chinese/clip_score": (12.5, True),
    }
    assert wandb.images == [("eval/simple_scene/Chinese/grid", [str(tmp_path / "ev" / "simple_scene_Chinese.png")])]
    assert wandb.tables[0][0] == "eval/ev" and wandb.tables[0][1] == list(RESULT_COLUMNS)
