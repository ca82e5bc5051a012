"""ClassifierFeatures: digits accuracy, FID ordering corruptions correctly, determinism, caching, errors."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from lightning_dpmot.metrics.classifier import ClassifierFeatures
from lightning_dpmot.metrics.frechet import feature_statistics, frechet_distance


@pytest.fixture(scope="module")
def digits16() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits at 16x16 in [-1, 1], split 1500 train / 297 val by a seeded permutation."""
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    x = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
    y = torch.tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1500], perm[1500:]
    return x[tr], y[tr], x[va], y[va]


@pytest.fixture(scope="module")
def trained(digits16: tuple[Tensor, ...]) -> ClassifierFeatures:
    x_tr, y_tr, _, _ = digits16
    return ClassifierFeatures.fit(x_tr, y_tr)  # default hyperparameters


@pytest.fixture(scope="module")
def fid_to_train(digits16: tuple[Tensor, ...], trained: ClassifierFeatures):
    with torch.no_grad():
        mu, sigma = feature_statistics(trained((digits16[0] + 1) / 2))

    def fid(images01: Tensor) -> float:
        with torch.no_grad():
            return frechet_distance(mu, sigma, *feature_statistics(trained(images01)))

    return fid


def gaussian_blur(images: Tensor, std: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding."""
    radius = int(3 * std + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * std**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def test_contract_and_val_accuracy(digits16: tuple[Tensor, ...], trained: ClassifierFeatures) -> None:
    _, _, x_va, y_va = digits16
    x01 = (x_va + 1) / 2
    assert trained.accuracy(x01, y_va) >= 0.95
    with torch.no_grad():
        feats, probs = trained(x01[:10]), trained.predict_proba(x01[:10])
    assert feats.shape == (10, trained.num_features) and feats.dtype == torch.float32
    assert 64 <= trained.num_features <= 128
    assert trained.name.startswith("classifier-image-") and len(trained.name) == len("classifier-image-") + 12
    torch.testing.assert_close(probs.sum(1), torch.ones(10))
    assert not trained.training


def test_fid_val_far_below_noise(digits16: tuple[Tensor, ...], fid_to_train) -> None:
    x_va = (digits16[2] + 1) / 2
    noise = torch.rand(x_va.shape, generator=torch.Generator().manual_seed(1))
    assert fid_to_train(x_va) < fid_to_train(noise) / 10


def test_fid_rises_with_blur(digits16: tuple[Tensor, ...], fid_to_train) -> None:
    x_va = (digits16[2] + 1) / 2
    fids = [fid_to_train(x_va)] + [fid_to_train(gaussian_blur(x_va, s)) for s in (0.5, 1.0, 1.5, 2.0)]
    assert all(a < b for a, b in pairwise(fids)), fids


def test_fid_rises_with_additive_noise(digits16: tuple[Tensor, ...], fid_to_train) -> None:
    x_va = (digits16[2] + 1) / 2
    n = torch.randn(x_va.shape, generator=torch.Generator().manual_seed(2))
    fids = [fid_to_train(x_va)] + [fid_to_train((x_va + s * n).clamp(0, 1)) for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in pairwise(fids)), fids


def test_torchmetrics_fid_accepts_the_extractor(digits16: tuple[Tensor, ...], trained: ClassifierFeatures) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = (digits16[0][:200] + 1) / 2, (digits16[2][:200] + 1) / 2
    metric = FrechetInceptionDistance(feature=trained, normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.no_grad():
        expected = frechet_distance(*feature_statistics(trained(real)), *feature_statistics(trained(fake)))
    assert metric.compute().item() == pytest.approx(expected, rel=1e-3)


def _small_digits() -> tuple[Tensor, Tensor]:
    bunch = load_digits()
    x = torch.tensor(bunch.images[:200], dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    return x, torch.tensor(bunch.target[:200], dtype=torch.long)


def test_fit_is_deterministic() -> None:
    x, y = _small_digits()
    a = ClassifierFeatures.fit(x, y, epochs=2, seed=3)
    b = ClassifierFeatures.fit(x, y, epochs=2, seed=3)
    c = ClassifierFeatures.fit(x, y, epochs=2, seed=4)
    assert a.name == b.name != c.name
    sb = b.state_dict()
    for k, va in a.state_dict().items():
        assert torch.equal(va, sb[k]), k
    assert not torch.equal(a.head.weight, c.head.weight)


def test_cached_trains_once_then_loads(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _small_digits()
    first = ClassifierFeatures.cached(x, y, tmp_path, epochs=2, seed=5)
    path = tmp_path / f"{first.name}.pt"
    assert path.is_file() and first.name == ClassifierFeatures.fit(x, y, epochs=2, seed=5).name
    payload = torch.load(path, weights_only=True)
    assert payload["name"] == first.name

    def no_training(*args, **kwargs):
        raise AssertionError("cached() retrained although the weights are on disk")

    monkeypatch.setattr(ClassifierFeatures, "fit", no_training)
    second = ClassifierFeatures.cached(x, y, tmp_path, epochs=2, seed=5)
    probe = (x[:8] + 1) / 2
    with torch.no_grad():
        assert torch.equal(first(probe), second(probe))
    assert second.name == first.name
    # different data -> different key (and a retrain, which the patched fit refuses)
    with pytest.raises(AssertionError, match="retrained"):
        ClassifierFeatures.cached(x.flip(-1), y, tmp_path, epochs=2, seed=5)


def test_points_classifier_on_raw_coordinates() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-4.0, -4.0], [-4.0, 4.0], [4.0, -4.0], [4.0, 4.0]]) + 10.0
    labels = torch.arange(4).repeat_interleave(100)
    x = centers[labels] + 0.5 * torch.randn(400, 2, generator=g)
    model = ClassifierFeatures.fit(x, labels, epochs=5, batch_size=32)
    assert model.kind == "points" and model.name.startswith("classifier-points-")
    torch.testing.assert_close(model.shift, x.mean(0))
    assert model.accuracy(x, labels) >= 0.99
    with torch.no_grad():
        assert model(x[:5]).shape == (5, model.num_features)


def test_bad_inputs_raise_clear_errors(trained: ClassifierFeatures) -> None:
    with pytest.raises(ValueError, match=r"takes images in \[0, 1\]"):
        trained(torch.rand(2, 1, 16, 16) * 2 - 1)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, 16, 16\), got \(2, 1, 8, 8\)"):
        trained(torch.rand(2, 1, 8, 8))
    x, y = _small_digits()
    with pytest.raises(ValueError, match=r"unknown classifier hyperparameter\(s\) \['epoch'\]"):
        ClassifierFeatures.cached(x, y, "unused", epoch=3)
    with pytest.raises(ValueError, match=r"labels must be integer class ids of shape \(200,\)"):
        ClassifierFeatures.fit(x, y[:10])
    with pytest.raises(ValueError, match="x_train must be images"):
        ClassifierFeatures.fit(x[:, 0], y)
