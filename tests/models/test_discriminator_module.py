"""DiscriminatorModule: learns a trivially separable fake set, OT-coupled noise, sample files, checkpoint round trip."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_edm

from lightning_dpmot.data.digits import DigitsDataModule
from lightning_dpmot.data.sample_files import load_samples
from lightning_dpmot.diffusion.discriminator_guidance import DGDenoiser, load_discriminator
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.models.discriminator import DiscriminatorModule, ot_coupled_noise
from lightning_dpmot.nets.discriminator import InceptionTrunk, TimeDiscriminator
from lightning_dpmot.utils.images import save_png


def blank_fakes(path: Path, n: int = 200) -> Path:
    """Fakes that are trivially separable from digits: empty canvases (-1) with a faint random speckle."""
    g = torch.Generator().manual_seed(0)
    x = (-1 + 0.05 * torch.rand(n, 1, 8, 8, generator=g)).numpy()
    np.savez(path, x=x)
    return path


def fit(tmp_path: Path, steps: int, **kwargs: object) -> tuple[L.Trainer, DiscriminatorModule]:
    module = DiscriminatorModule(fake=str(blank_fakes(tmp_path / "fake.npz")), feature="none", lr=3e-3, **kwargs)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        check_val_every_n_epoch=1000,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, DigitsDataModule(batch_size=64))
    return trainer, module


def test_accuracy_beats_chance_on_separable_fakes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer, module = fit(tmp_path, 80)
    real = torch.cat([b["x"] for b in trainer.datamodule.val_dataloader()])
    fake = module.fake_val
    sigma = torch.full((len(real) + len(fake),), 0.1)
    x0 = torch.cat([real, fake])
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = module.net.eval()(x, sigma)
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).bool()
    assert ((logits > 0) == labels).float().mean() > 0.95
    assert trainer.callback_metrics["train/acc"] > 0.7
    # at a noise level that drowns every image the discriminator cannot do better than its prior
    with torch.no_grad():
        far = module.net(x0 + 80 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)), sigma * 800)
    assert far.std() < logits.std() / 5


def brute_force_optimum(cost: torch.Tensor) -> float:
    n = cost.shape[0]
    return min(float(sum(cost[i, p[i]] for i in range(n))) for p in itertools.permutations(range(n)))


def test_ot_coupled_noise_is_the_optimal_permutation() -> None:
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.randn(6, 1, 4, 4, generator=g)
    coupled, (before, after) = ot_coupled_noise(x0, noise, "sqeuclidean")
    # a permutation of the drawn noise: every coupled row is one of the original rows, each used once
    matches = (coupled.flatten(1)[:, None] == noise.flatten(1)[None]).all(-1)
    assert torch.equal(matches.sum(0), torch.ones(6, dtype=torch.long)) and torch.equal(matches.sum(1), matches.sum(0))
    cost = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()) ** 2
    assert float(after) * 6 == pytest.approx(brute_force_optimum(cost), rel=1e-5)
    assert float(after) < float(before) == pytest.approx(float(cost.diagonal().mean()), rel=1e-5)


def test_ot_noise_coupling_lowers_the_logged_pair_cost(tmp_path: Path) -> None:
    trainer, _ = fit(tmp_path, 3, noise_coupling="ot")
    m = trainer.callback_metrics
    assert m["train/ot_cost_after"] < m["train/ot_cost_before"]


def test_checkpoint_round_trip_and_guided_generation(tmp_path: Path) -> None:
    trainer, module = fit(tmp_path, 2)
    ckpt = tmp_path / "disc.ckpt"
    trainer.save_checkpoint(ckpt)
    net = load_discriminator(ckpt)
    x, sigma = torch.randn(5, 1, 8, 8), torch.rand(5) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), module.net.eval()(x, sigma))
    assert not any(p.requires_grad for p in net.parameters())
    # a guided EDM generates under inference mode (Lightning's predict/test), and DG changes its samples
    edm = tiny_edm()
    guided = GuidanceSpec(discriminator={"checkpoint": str(ckpt), "weight": 2.0})
    assert isinstance(guided.wrap(edm.denoiser, None), DGDenoiser)
    with torch.inference_mode():
        plain = edm.generate(torch.arange(4)).x
        with_dg = edm.generate(torch.arange(4), guidance=guided).x
    assert with_dg.shape == plain.shape and torch.isfinite(with_dg).all()
    assert not torch.allclose(with_dg, plain)


def test_load_samples_formats_and_errors(tmp_path: Path) -> None:
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    np.savez(tmp_path / "s.npz", x=x.numpy())
    torch.save({"x": x}, tmp_path / "s.pt")
    pngs = tmp_path / "pngs"
    for i, img in enumerate(x):
        save_png(img, pngs / f"{i:06d}.png")
    torch.testing.assert_close(load_samples(tmp_path / "s.npz", (1, 8, 8)), x)
    torch.testing.assert_close(load_samples(tmp_path / "s.pt"), x)
    torch.testing.assert_close(load_samples(pngs, (1, 8, 8)), x, atol=1 / 127.5, rtol=0)
    with pytest.raises(FileNotFoundError, match="samples not found"):
        load_samples(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\) per sample, the data's is \(3, 8, 8\)"):
        load_samples(tmp_path / "s.npz", (3, 8, 8))
    np.savez(tmp_path / "big.npz", x=(x * 3).numpy())
    with pytest.raises(ValueError, match="expected images in"):
        load_samples(tmp_path / "big.npz")
    with pytest.raises(ValueError, match="expected a samples.npz"):
        load_samples(tmp_path / "s.txt" if (tmp_path / "s.txt").write_text("0") else "")


def test_frozen_trunks_pass_gradients_to_the_input() -> None:
    for net in (TimeDiscriminator((1, 8, 8), "classifier"), TimeDiscriminator((3, 32, 32), "none")):
        assert not any(p.requires_grad for p in net.features.parameters())
        x = torch.randn(2, *net.data_shape, requires_grad=True)
        net(x, torch.tensor([0.5, 2.0])).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    trunk = InceptionTrunk(pretrained=False)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    trunk(x).sum().backward()
    assert trunk(x).shape == (1, 2048) and x.grad.abs().sum() > 0


def test_freeze_features_switch() -> None:
    frozen = TimeDiscriminator((1, 8, 8), "classifier")
    tuned = TimeDiscriminator((1, 8, 8), "classifier", freeze_features=False)
    assert not any(p.requires_grad for p in frozen.features.parameters())
    assert all(p.requires_grad for p in tuned.features.parameters())
    assert not frozen.train().features.training and tuned.train().features.training
    assert all(p.requires_grad for p in frozen.head.parameters())


def test_sigma_sampling_distributions(tmp_path: Path) -> None:
    fake = str(blank_fakes(tmp_path / "fake.npz"))
    g = torch.Generator().manual_seed(0)
    log_sigma = DiscriminatorModule(fake=fake, feature="none").draw_sigma(200_000, g).log()
    assert abs(float(log_sigma.mean()) + 1.2) < 0.01 and abs(float(log_sigma.std()) - 1.2) < 0.01
    uniform = DiscriminatorModule(fake=fake, feature="none", sigma_sampling="loguniform", sigma_min=0.01, sigma_max=100)
    u = (uniform.draw_sigma(200_000, g).log() - math.log(0.01)) / math.log(1e4)  # U(0, 1)
    assert 0 <= float(u.min()) and float(u.max()) <= 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    with pytest.raises(ValueError, match="sigma_sampling"):
        DiscriminatorModule(fake=fake, sigma_sampling="uniform")  # type: ignore[arg-type]
