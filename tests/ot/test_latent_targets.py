"""LatentTargets: keyed noise, bit-identical rebuilds, subsets, generated targets, files and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_edm

from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.data.base import TensorDictDataset
from lightning_dpmot.ot.latent_targets import (
    DATASET_NOISE,
    GENERATED_NOISE,
    LatentTargets,
    targets_from_dataset,
    targets_from_model,
    targets_from_samples,
)
from lightning_dpmot.sampling import SamplerSpec
from lightning_dpmot.utils.random import make_generator


@pytest.fixture(scope="module")
def digits() -> TensorDictDataset:
    return DigitsDataModule().dataset("train")


def small(**overrides: object) -> LatentTargets:
    kwargs = dict(latents=torch.randn(4, 1, 2, 2), ids=torch.arange(4), labels=torch.zeros(4), sigma_s=0.1)
    kwargs.update(overrides)
    return LatentTargets(**kwargs)  # type: ignore[arg-type]


def test_dataset_targets_are_the_images_plus_noise_keyed_by_index_and_draw(digits: TensorDictDataset) -> None:
    sub = torch.utils.data.Subset(digits, range(5))  # items keep their split index
    t = targets_from_dataset(sub, 0.3, num_draws=2, seed=7, provenance={"split": "train"})
    assert t.ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and t.draws.tolist() == [0, 1] * 5
    assert t.labels.tolist() == [int(digits[i]["label"]) for i in t.ids.tolist()]
    for n in range(10):
        image = digits[int(t.ids[n])]["x"]
        noise = torch.randn(image.shape, generator=make_generator(7, DATASET_NOISE, int(t.ids[n]), int(t.draws[n])))
        assert torch.equal(t.clean[n], image)
        assert torch.equal(t.latents[n], image + 0.3 * noise)
    assert not torch.equal(t.latents[0], t.latents[1])  # two draws of one image differ
    assert t.sigma_s == 0.3 and t.data_shape == (1, 8, 8) and t.dim == 64 and t.flat().shape == (10, 64)
    assert t.provenance["split"] == "train" and t.provenance["num_draws"] == 2 and t.provenance["seed"] == 7


def test_rebuilds_are_bit_identical_whatever_the_global_rng_or_batching(digits: TensorDictDataset) -> None:
    torch.manual_seed(1)
    a = targets_from_dataset(digits, 0.5, seed=3, batch_size=1024)
    torch.manual_seed(2)  # another rank's global RNG state: must not matter
    torch.randn(100)
    b = targets_from_dataset(digits, 0.5, seed=3, batch_size=77)
    assert a.fingerprint() == b.fingerprint() and torch.equal(a.latents, b.latents)
    assert a.fingerprint() != targets_from_dataset(digits, 0.5, seed=4).fingerprint()
    assert a.fingerprint() != targets_from_dataset(digits, 0.25, seed=3).fingerprint()


def test_max_targets_is_a_seeded_subset_that_keeps_each_targets_noise(digits: TensorDictDataset) -> None:
    full = targets_from_dataset(digits, 0.5, num_draws=2, seed=3)
    part = targets_from_dataset(digits, 0.5, num_draws=2, seed=3, max_targets=50)
    assert part.num_targets == 50 and part.provenance["max_targets"] == 50
    pairs = part.ids * 2 + part.draws  # position in the full (image-major) order
    assert torch.equal(pairs, pairs.sort().values)
    assert torch.equal(part.latents, full.latents[pairs]) and torch.equal(part.labels, full.labels[pairs])
    other = targets_from_dataset(digits, 0.5, num_draws=2, seed=4, max_targets=50)
    assert not torch.equal(other.ids * 2 + other.draws, pairs)


def test_generated_targets_are_samples_plus_noise_keyed_by_generation_seed() -> None:
    model = tiny_edm(class_conditional=True).eval()
    spec = SamplerSpec("euler", num_steps=2)
    t = targets_from_model(model, 5, 0.2, seed_offset=10, spec=spec, batch_size=2, seed=1)
    samples = model.generate(torch.arange(10, 15), {"label": torch.arange(10, 15) % 10}, spec).x
    assert t.ids.tolist() == [-1] * 5 and t.labels.tolist() == [0, 1, 2, 3, 4]
    assert torch.allclose(t.clean, samples, atol=1e-6)
    for j in range(5):
        noise = torch.randn(1, 8, 8, generator=make_generator(1, GENERATED_NOISE, 10 + j, 0))
        assert torch.equal(t.latents[j], t.clean[j] + 0.2 * noise)
    assert t.provenance["source"] == "generated" and t.provenance["model_class"].endswith("EDMModule")
    # the noise depends on the generation seed, not on the order the samples arrive in
    shuffled = targets_from_samples(t.clean.flip(0), torch.arange(14, 9, -1), None, 0.2, seed=1)
    assert torch.equal(shuffled.latents.flip(0), t.latents)


def test_save_and_load_round_trip_with_weights_only(tmp_path: Path, digits: TensorDictDataset) -> None:
    t = targets_from_dataset(digits, 0.5, max_targets=20, provenance={"split": "train", "dataset": "digits-8px"})
    path = t.save(tmp_path / "sub" / "targets.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["sha256"] == t.fingerprint() and raw["provenance"]["dataset"] == "digits-8px"
    back = LatentTargets.load(path)
    for name in ("latents", "ids", "labels", "draws", "clean"):
        assert torch.equal(getattr(back, name), getattr(t, name)), name
    assert back.sigma_s == 0.5 and back.provenance == t.provenance
    no_clean = LatentTargets.load(LatentTargets(t.latents, t.ids, t.labels, 0.5).save(tmp_path / "lean.pt"))
    assert no_clean.clean is None
    with pytest.raises(ValueError, match="built without their clean samples"):
        no_clean.flat_clean()


def test_missing_corrupt_and_edited_files_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="targets file .*nope.pt' does not exist"):
        LatentTargets.load(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt: not a readable LatentTargets file"):
        LatentTargets.load(tmp_path / "garbage.pt")
    torch.save({"latents": torch.zeros(2, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LatentTargets file \\(format None"):
        LatentTargets.load(tmp_path / "other.pt")
    state = small().to_dict()
    state["latents"] = state["latents"] + 1.0
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(ValueError, match="do not match the stored sha256"):
        LatentTargets.load(tmp_path / "edited.pt")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"latents": torch.tensor([[0.0, float("nan")], [1.0, 2.0]])}, r"NaN or infinite values \(1 non-finite"),
        ({"latents": torch.zeros(0, 3), "ids": torch.zeros(0), "labels": torch.zeros(0)}, "target set is empty"),
        ({"latents": torch.zeros(4)}, r"latents must be a tensor \(N, \*S\) with at least 2 dims, got \(4,\)"),
        ({"ids": torch.arange(3)}, r"ids must have shape \(4,\) to match the 4 latents, got \(3,\)"),
        ({"clean": torch.zeros(4, 4)}, r"clean has shape \(4, 4\) but latents have shape \(4, 1, 2, 2\)"),
        ({"sigma_s": -0.1}, "sigma_s must be finite and >= 0, got -0.1"),
        ({"provenance": {"model": object()}}, "provenance.model must be plain data"),
    ],
)
def test_bad_targets_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_bad_builder_input_is_rejected(digits: TensorDictDataset) -> None:
    with pytest.raises(ValueError, match="the dataset is empty"):
        targets_from_dataset(torch.utils.data.Subset(digits, []), 0.5)
    with pytest.raises(ValueError, match="num_draws must be >= 1, got 0"):
        targets_from_dataset(digits, 0.5, num_draws=0)
    with pytest.raises(ValueError, match="max_targets must be >= 1 or None, got 0"):
        targets_from_dataset(digits, 0.5, max_targets=0)
    nan_images = TensorDictDataset(torch.full((3, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="latents contain NaN or infinite values"):
        targets_from_dataset(nan_images, 0.5)
    with pytest.raises(ValueError, match="sample_seeds must be distinct"):
        targets_from_samples(torch.zeros(2, 3), torch.tensor([1, 1]), None, 0.5)
