"""Captioned images: the WebDataset shard index (random access, truncation, corrupt data), captions.jsonl, COCO."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_dpmot.data import CaptionedImagesDataModule
from lightning_dpmot.data.loading import EpochSeededRandomSampler, ResumableDataLoader
from lightning_dpmot.data.webdataset_index import WebDatasetIndex, index_shard


def colour(i: int) -> tuple[int, int, int]:
    return (10 * i % 256, 255 - 7 * i % 256, 40 + 3 * i % 200)


def image_bytes(i: int, fmt: str = "PNG", size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour(i)).save(buf, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(i: int, ext: str = "png") -> list[tuple[str, bytes]]:
    data = image_bytes(i, "PNG" if ext == "png" else "JPEG")
    meta = json.dumps({"key": i}).encode()
    return [(f"{i:05d}.{ext}", data), (f"{i:05d}.txt", f"caption {i}".encode()), (f"{i:05d}.json", meta)]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DPMOT_WDS_INDEX_DIR", str(tmp_path / "index_cache"))
    return tmp_path / "index_cache"


def shards(tmp_path: Path, n_shards: int = 2, per_shard: int = 4) -> list[str]:
    out = []
    for s in range(n_shards):
        members = [m for i in range(s * per_shard, (s + 1) * per_shard) for m in sample(i, "png" if i % 2 else "jpg")]
        out.append(str(write_shard(tmp_path / f"shard-{s:03d}.tar", members)))
    return out


def centre_colour(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, x.shape[1] // 2, x.shape[2] // 2] + 1) * 127.5).round()


def test_index_equals_the_members_and_is_cached(tmp_path: Path, cache: Path) -> None:
    (path,) = shards(tmp_path, 1, 3)
    index = index_shard(path)
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert [s[0] for s in index.samples] == ["00000", "00001", "00002"]
    for key, offset, size, caption in index.samples:
        image = members.get(f"{key}.png") or members[f"{key}.jpg"]
        assert (offset, size) == (image.offset_data, image.size)
        assert caption == f"caption {int(key)}"
    assert index.bad == [] and index.truncated is None
    assert len(list(cache.glob("*.json"))) == 1
    assert index_shard(path) == index  # read back from the cache


def test_random_access_returns_the_right_image_and_caption(tmp_path: Path, cache: Path) -> None:
    ds = WebDatasetIndex(shards(tmp_path), resolution=8)
    assert len(ds) == 8
    ds = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    for i in [7, 0, 5, 2]:
        item = ds[i]
        assert item["x"].shape == (3, 8, 8) and item["x"].dtype == torch.float32
        assert item["caption_en"] == f"caption {i}" and int(item["index"]) == i
        tol = 0 if i % 2 else 6  # odd items are PNG (exact), even ones JPEG
        assert (centre_colour(item["x"]) - torch.tensor(colour(i), dtype=torch.float32)).abs().max() <= tol


def test_truncated_shard_is_one_error_naming_it_or_a_counted_skip(tmp_path: Path, cache: Path) -> None:
    good, path = shards(tmp_path, 2, 4)
    data = Path(path).read_bytes()
    with tarfile.open(path) as tar:
        cut = tar.getmember("00006.jpg").offset_data + 100  # inside sample 6's image
    Path(path).write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"shard-001\.tar.*truncated"):
        WebDatasetIndex([good, path], resolution=8)
    ds = WebDatasetIndex([good, path], resolution=8, on_bad_item="skip")
    assert [ds[i]["caption_en"] for i in range(len(ds))] == [f"caption {i}" for i in range(6)]
    assert ds.skipped == {"truncated shard": 1}
    # cut at a header boundary (after sample 4 entirely): tarfile stops silently; the missing end block tells
    with tarfile.open(tmp_path / "shard-000.tar") as tar:
        end = tar.getmember("00003.json").offset_data + 512
    Path(path).write_bytes(Path(good).read_bytes()[:end])
    with pytest.raises(ValueError, match=r"truncated.*end-of-archive"):
        WebDatasetIndex([path], resolution=8)


def test_corrupt_image_names_shard_and_key_or_is_skipped(tmp_path: Path, cache: Path) -> None:
    members = sample(0) + [("00001.png", b"\x89PNG\r\n\x1a\n garbage"), ("00001.txt", b"broken")] + sample(2)
    path = str(write_shard(tmp_path / "bad.tar", members))
    ds = WebDatasetIndex([path], resolution=8)
    assert ds[0]["caption_en"] == "caption 0"
    with pytest.raises(ValueError, match=r"bad\.tar.*'00001'.*does not decode"):
        ds[1]
    skip = WebDatasetIndex([path], resolution=8, on_bad_item="skip")
    assert [skip[i]["caption_en"] for i in range(len(skip))] == ["caption 0", "caption 2"]
    assert skip.skipped == {"image does not decode": 1} and skip.skipped_keys[0][1] == "00001"


def test_missing_caption_or_image(tmp_path: Path, cache: Path) -> None:
    members = sample(0) + [("00001.png", image_bytes(1))] + [("00002.txt", b"no image")] + sample(3)
    path = str(write_shard(tmp_path / "holes.tar", members))
    with pytest.raises(ValueError, match=r"holes\.tar.*'00001'.*no caption"):
        WebDatasetIndex([path], resolution=8)
    ds = WebDatasetIndex([path], resolution=8, on_bad_item="skip")
    assert ds.captions == ["caption 0", "caption 3"]
    assert ds.skipped == {"no caption member (.txt)": 1, "no image member (jpg/jpeg/png/webp)": 1}


def write_folder(root: Path, n: int, extra: list[str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        (root / f"img{i}.png").write_bytes(image_bytes(i, size=(10 + i, 8)))
        lines.append(json.dumps({"file": f"img{i}.png", "caption": f"caption {i}", "caption_zh": f"图 {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines + (extra or [])) + "\n", encoding="utf-8")
    return root


def test_folder_with_captions_jsonl(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "folder", 6)
    dm = CaptionedImagesDataModule("folder", str(root), val=str(root), resolution=8, batch_size=2)
    item = dm.dataset("train")[4]
    assert item["caption_en"] == "caption 4" and item["caption_zh"] == "图 4" and item["x"].shape == (3, 8, 8)
    assert torch.equal(centre_colour(item["x"]), torch.tensor(colour(4), dtype=torch.float32))
    cond = dm.generation_conditions(torch.tensor([0, 7]))
    assert cond["prompt_index"].tolist() == [0, 1]
    assert cond["caption_en"] == ["caption 0", "caption 1"] and cond["caption_zh"] == ["图 0", "图 1"]
    # missing image and missing caption: errors naming the line / file, or counted skips
    bad = write_folder(tmp_path / "bad", 4, [json.dumps({"file": "gone.png", "caption": "x"}), '{"file": "img0.png"}'])
    with pytest.raises(ValueError, match=r"captions\.jsonl:6: no caption"):
        CaptionedImagesDataModule("folder", str(bad), val_fraction=0.25, resolution=8).dataset("train")
    dm = CaptionedImagesDataModule("folder", str(bad), val_fraction=0.25, resolution=8, on_bad_item="skip")
    with pytest.warns(UserWarning, match=r"left out 2 bad item\(s\)"):
        dm.dataset("train")
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 4 and len(dm.skipped["train"]) == 2


def test_coco_captions_json(tmp_path: Path) -> None:
    images = tmp_path / "val2017"
    images.mkdir()
    for i in (3, 1):
        (images / f"{i:012d}.jpg").write_bytes(image_bytes(i, "JPEG"))
    coco = {
        "images": [{"id": 3, "file_name": "000000000003.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}],
        "annotations": [
            {"id": 20, "image_id": 3, "caption": "three b"},
            {"id": 10, "image_id": 3, "caption": "three a"},
            {"id": 30, "image_id": 1, "caption": "one"},
        ],
    }
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps(coco))
    kwargs = {"train_images": str(images), "val_images": str(images), "resolution": 8, "batch_size": 1}
    dm = CaptionedImagesDataModule("coco", str(ann), val=str(ann), **kwargs)
    ds = dm.dataset("val")
    assert [ds[i]["caption_en"] for i in range(3)] == ["one", "three a", "three b"]  # one item per caption
    assert dm.prompts("val") == [{"caption_en": "one"}, {"caption_en": "three a"}, {"caption_en": "three b"}]
    first = CaptionedImagesDataModule("coco", str(ann), val=str(ann), coco_captions="first", **kwargs)
    assert first.dataset("val").captions == ["one", "three a"]  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="needs train_images"):
        CaptionedImagesDataModule("coco", str(ann))


def test_webdataset_module_is_deterministic_and_splits(tmp_path: Path, cache: Path) -> None:
    paths = shards(tmp_path, 2, 5)
    glob = str(tmp_path / "shard-*.tar")
    a = CaptionedImagesDataModule("webdataset", glob, val_fraction=0.2, resolution=8, batch_size=2)
    b = CaptionedImagesDataModule("webdataset", list(paths), val_fraction=0.2, resolution=8, batch_size=2)
    assert a.data_shape == (3, 8, 8) and a.num_classes == 0
    assert len(a.dataset("train")) == 8 and len(a.dataset("val")) == 2
    for split in ("train", "val"):
        da, db = a.dataset(split), b.dataset(split)
        for i in range(len(da)):
            ia, ib = da[i], db[i]
            assert torch.equal(ia["x"], ib["x"]) and ia["caption_en"] == ib["caption_en"] and int(ia["index"]) == i
    prompts = [p["caption_en"] for p in a.prompts("val")]
    assert sorted(prompts + [a.dataset("train")[i]["caption_en"] for i in range(8)]) == sorted(
        f"caption {i}" for i in range(10)
    )
    assert a.generation_conditions(torch.arange(3))["caption_en"] == [prompts[0], prompts[1], prompts[0]]
    with pytest.raises(FileNotFoundError, match="no WebDataset shards"):
        CaptionedImagesDataModule("webdataset", str(tmp_path / "none-*.tar")).dataset("train")


def test_prompt_file_for_generation(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "en.txt").write_text("a cat\na dog\n", encoding="utf-8")
    (tmp_path / "zh.txt").write_text("猫\n狗\n", encoding="utf-8")
    dm = CaptionedImagesDataModule(
        "webdataset", shards(tmp_path, 1, 4), val_fraction=0.25, resolution=8,
        predict_prompts=str(tmp_path / "en.txt"), predict_prompts_zh=str(tmp_path / "zh.txt"),
    )  # fmt: skip
    cond = dm.generation_conditions(torch.tensor([1, 2]))
    assert cond == {"prompt_index": cond["prompt_index"], "caption_en": ["a dog", "a cat"], "caption_zh": ["狗", "猫"]}
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        CaptionedImagesDataModule("webdataset", "x", predict_prompts=str(tmp_path / "missing.txt"))


def test_resumable_loader_state_save_and_restore(tmp_path: Path, cache: Path) -> None:
    ds = WebDatasetIndex(shards(tmp_path, 2, 6), resolution=8)

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(ds, batch_size=2, sampler=EpochSeededRandomSampler(ds, seed=3), drop_last=True)

    full = [b["index"].tolist() for b in loader()]
    first = loader()
    it = iter(first)
    seen = [next(it)["index"].tolist() for _ in range(2)]
    resumed = loader()
    resumed.load_state_dict(first.state_dict())
    rest = [b["index"].tolist() for b in resumed]
    assert seen + rest == full and len(full) == 6
    assert [b["caption_en"] for b in resumed][0] == [f"caption {i}" for i in full[0]]


def test_train_loader_trains_a_tiny_text_to_image_model(tmp_path: Path, cache: Path) -> None:
    pytest.importorskip("transformers")
    from functools import partial

    from conftest import quiet_trainer

    from lightning_dpmot.models import TextToImageModule
    from lightning_dpmot.nets import DDPMppUNet
    from lightning_dpmot.nets.text_encoder import TextEncoder

    dm = CaptionedImagesDataModule("webdataset", shards(tmp_path, 2, 4), val_fraction=0.25, resolution=8, batch_size=2)
    net = partial(DDPMppUNet, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.0,
                  cross_attn_resolutions=[4])  # fmt: skip
    torch.manual_seed(0)
    model = TextToImageModule(net, text_encoder=TextEncoder.tiny_random(dim=16), data_shape=dm.data_shape)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
