"""DPMModule: L_simple by hand, noise hook, labels, sigma schedules, DDIM/DDPM with an oracle, training, checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_unet
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dpmot.callbacks import EMAHalfLife, SampleWriter
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.diffusion import VPSchedule
from lightning_dpmot.models.base import LABEL_DROP, NOISE
from lightning_dpmot.models.dpm import DPMModule, ddim_spec
from lightning_dpmot.sampling import SamplerSpec, karras_sigmas
from lightning_dpmot.utils.random import make_generator


def trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def linear_abar(T: int = 1000) -> torch.Tensor:
    """DDPM's abar_t = prod_{s<=t} (1 - beta_s), beta = linspace(1e-4, 0.02, T), float64 (T,)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)


class SpyNet(torch.nn.Module):
    """Records (x_t, t, cond["label"]); predicts eps = 0.3 x_t + 1e-3 t + w."""

    def __init__(self, data_shape, num_classes=0):
        super().__init__()
        self.num_classes = num_classes
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def forward(self, x, t, cond=None):
        labels = None if not cond else cond["label"].detach().clone()
        self.inputs.append((x.detach().clone(), t.detach().clone(), labels))
        return 0.3 * x + 1e-3 * t.reshape(-1, *[1] * (x.ndim - 1)) + self.w


class OracleEps(torch.nn.Module):
    """The exact epsilon for per-sample data points y (B, *S): eps = (x_t - sqrt(abar) y) / sqrt(1 - abar), with
    abar recovered from the float timestep t by DPMModule's log-sigma interpolation."""

    def __init__(self, y: torch.Tensor, schedule: VPSchedule) -> None:
        super().__init__()
        self.y, self.log_sigmas = y, schedule.log_sigmas

    def forward(self, x, t, cond=None):
        t = t.double()
        low = t.floor().long().clamp(0, len(self.log_sigmas) - 2)
        w = t - low
        log_sigma = (1 - w) * self.log_sigmas[low].double() + w * self.log_sigmas[low + 1].double()
        abar = (1 / (1 + (2 * log_sigma).exp())).reshape(-1, *[1] * (x.ndim - 1))
        return ((x.double() - abar.sqrt() * self.y) / (1 - abar).sqrt()).float()


def oracle_model(y: torch.Tensor, **kwargs: object) -> DPMModule:
    sched = VPSchedule(kwargs.get("beta_schedule", "linear"), kwargs.get("T", 1000))  # type: ignore[arg-type]
    return DPMModule(lambda shape, **_: OracleEps(y, sched), data_shape=tuple(y.shape[1:]), **kwargs)


class ZeroNoise(L.Callback):
    """Supplies batch['noise'] = 0, as a coupling callback would supply assigned noise."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        batch["noise"] = torch.zeros_like(batch["x"])
        self.x = batch["x"].clone()


class RecordBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = {k: v.clone() for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------------ loss
def test_loss_equals_l_simple_by_hand() -> None:
    model = DPMModule(SpyNet)
    x, noise = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randn(6, 1, 8, 8)
    loss = model.loss(x, noise, None, torch.Generator().manual_seed(3))
    t = torch.randint(1000, (6,), generator=torch.Generator().manual_seed(3))  # the generator-equivalent t
    abar = linear_abar()[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x.double() + (1 - abar).sqrt() * noise.double()
    eps = 0.3 * x_t + 1e-3 * t.double().reshape(-1, 1, 1, 1)
    expected = ((eps - noise.double()) ** 2).mean(dim=(1, 2, 3))
    assert loss.shape == (6,)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    net_x, net_t, net_labels = model.denoiser.raw_net.inputs[0]
    assert torch.allclose(net_x.double(), x_t, atol=1e-6)  # x_t = sqrt(abar) x + sqrt(1 - abar) eps
    assert net_t.dtype == torch.float32 and torch.equal(net_t, t.float()) and net_labels is None


def test_timesteps_cover_zero_to_T_minus_one_uniformly() -> None:
    t = DPMModule(SpyNet, T=10).sample_timesteps(20_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    counts = torch.bincount(t, minlength=10)
    assert len(counts) == 10 and counts.min() > 1800 and counts.max() < 2200


def test_training_step_uses_noise_supplied_in_the_batch(tmp_path: Path) -> None:
    model, cb = DPMModule(SpyNet), ZeroNoise()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, DigitsDataModule(batch_size=16))
    net_x, net_t, _ = model.denoiser.raw_net.inputs[0]
    abar = linear_abar()[net_t.long()].reshape(-1, 1, 1, 1)
    assert torch.allclose(net_x.double(), abar.sqrt() * cb.x.double(), atol=1e-6)  # x_t = sqrt(abar) x + 0


def test_training_step_draws_noise_from_the_hook(tmp_path: Path) -> None:
    model, cb = DPMModule(SpyNet, seed=7), RecordBatch()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, DigitsDataModule(batch_size=16))
    x = cb.batch["x"]
    noise = torch.randn(x.shape, generator=make_generator(7, 0, 0, 0, NOISE, 0))  # rank 0, epoch 0, batch 0
    net_x, net_t, _ = model.denoiser.raw_net.inputs[0]
    abar = linear_abar()[net_t.long()].reshape(-1, 1, 1, 1)
    assert torch.allclose(net_x.double(), abar.sqrt() * x + (1 - abar).sqrt() * noise, atol=1e-6)


def test_class_labels_and_dropout_reach_the_network(tmp_path: Path) -> None:
    model, cb = DPMModule(SpyNet, num_classes=10, class_conditional=True, label_dropout=0.5, seed=11), RecordBatch()
    assert model.denoiser.raw_net.num_classes == 10
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[cb]).fit(model, DigitsDataModule(batch_size=64))
    labels = model.denoiser.raw_net.inputs[0][2]
    drop = torch.rand(64, generator=make_generator(11, 0, 0, 0, LABEL_DROP, 0)) < 0.5
    assert torch.equal(labels, torch.where(drop, -1, cb.batch["label"])) and 0 < drop.sum() < 64
    uncond = DPMModule(SpyNet, num_classes=10)
    assert (
        uncond.denoiser.raw_net.num_classes == 0 and uncond.conditioner.from_batch({"label": torch.arange(3)}) is None
    )


# ------------------------------------------------------------------------------------------------------ schedules
def test_default_sampler_is_ddim50_on_timesteps_and_ddpm_spec() -> None:
    model = DPMModule(SpyNet, T=200)
    assert model.sampler == SamplerSpec("ddim", 50, schedule="timesteps", eta=0.0) == ddim_spec()
    assert model.ddpm_spec() == SamplerSpec("ddpm", num_steps=200, schedule="timesteps")


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_timestep_sigmas(beta_schedule: str) -> None:
    model = DPMModule(SpyNet, beta_schedule=beta_schedule)
    sig = model.schedule.sigmas.double()
    ddim = model.sigmas_for(SamplerSpec("ddim", 4, schedule="timesteps"))
    assert torch.allclose(ddim, torch.cat([sig[[999, 666, 333, 0]], torch.zeros(1, dtype=torch.float64)]))
    ddpm = model.sigmas_for(model.ddpm_spec())
    assert len(ddpm) == 1001 and torch.equal(ddpm[:-1], sig.flip(0)) and ddpm[-1] == 0
    assert bool((ddpm[1:] < ddpm[:-1]).all())
    # the expressway: start at the largest discrete level <= sigma_max
    start = model.sigmas_for(SamplerSpec("ddim", 10, schedule="timesteps", sigma_max=1.0))
    k = int((sig <= 1.0).nonzero().max())
    assert start[0] == sig[k] and sig[k + 1] > 1.0 and start[-2] == sig[0] and start[-1] == 0
    assert len(start) == 11 and bool((start[1:] < start[:-1]).all())
    assert model.sigmas_for(SamplerSpec("ddim", 3, schedule="timesteps", sigma_max=float(sig[k])))[0] == sig[k]


def test_karras_sigmas_are_clipped_to_the_discrete_range() -> None:
    model = DPMModule(SpyNet)
    lo, hi = model.schedule.sigma_min, model.schedule.sigma_max
    assert lo == pytest.approx(0.0100005, rel=1e-5) and hi == pytest.approx(157.407, rel=1e-4)
    assert torch.equal(model.sigmas_for(SamplerSpec("heun", 8)), karras_sigmas(8, lo, hi, 7.0))
    edm_range = model.sigmas_for(SamplerSpec("euler", 8, sigma_min=0.002, sigma_max=80.0, rho=90.0))
    assert torch.equal(edm_range, karras_sigmas(8, lo, 80.0, 90.0))  # sigma_min 0.002 -> sigma_0
    assert model.sigmas_for(SamplerSpec("euler", 8, sigma_max=1e4))[0] == hi


def test_bad_schedules_are_one_clear_error() -> None:
    model = DPMModule(SpyNet)
    with pytest.raises(ValueError, match="always ends at timestep 0; sigma_min is not supported"):
        model.sigmas_for(SamplerSpec("ddim", 5, schedule="timesteps", sigma_min=0.1))
    with pytest.raises(ValueError, match=r"sigma_max=0.001 is below the model's smallest level sigma_min=0.0100"):
        model.sigmas_for(SamplerSpec("ddim", 5, schedule="timesteps", sigma_max=0.001))
    with pytest.raises(ValueError, match="num_steps=1001 exceeds the 1000 discrete timesteps"):
        model.sigmas_for(SamplerSpec("ddpm", 1001, schedule="timesteps"))
    with pytest.raises(ValueError, match="T must be >= 2 discrete diffusion steps, got 1"):
        DPMModule(SpyNet, T=1)
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        DPMModule(SpyNet, beta_schedule="quadratic")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_ddim_with_oracle_eps_reproduces_the_data(beta_schedule: str) -> None:
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 1.8 - 0.9
    model = oracle_model(y, beta_schedule=beta_schedule)
    out = model.generate(torch.arange(3), spec=ddim_spec(10))
    assert out.nfe == 10 and torch.allclose(out.x.double(), y, atol=1e-4)
    # from an intermediate level (the DPM-OT expressway), in sigma space: x = y + sigma * n
    sigmas = model.sigmas_for(SamplerSpec("ddim", 5, schedule="timesteps", sigma_max=2.0))
    x = y + sigmas[0] * torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = model.sample_from(x, sigmas, spec=SamplerSpec("ddim", 5, schedule="timesteps"))
    assert res.nfe == 5 and torch.allclose(res.x, y, atol=1e-5)


def test_ddpm_ancestral_uses_T_evaluations_and_reaches_the_data() -> None:
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 1.8 - 0.9
    model = oracle_model(y)
    seen: list[float] = []
    out = model.generate(torch.arange(2), spec=model.ddpm_spec(), callback=lambda info: seen.append(info["sigma"]))
    assert out.nfe == 1000 and len(seen) == 1000
    assert torch.allclose(out.x.double(), y, atol=1e-4)
    assert seen[0] == pytest.approx(model.schedule.sigma_max) and seen[-1] == pytest.approx(model.schedule.sigma_min)


def test_predict_writes_ddim_samples(tmp_path: Path) -> None:
    model = DPMModule(tiny_unet(), num_classes=10, class_conditional=True, sampler=ddim_spec(3))
    dm = DigitsDataModule(predict_num_samples=6, predict_batch_size=4)
    out = tmp_path / "samples"
    trainer(tmp_path, callbacks=[SampleWriter(str(out))]).predict(model, dm, return_predictions=False)
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (6, 1, 8, 8) and int(data["nfe"]) == 3
    assert data["labels"].tolist() == [s % 10 for s in range(6)]


# ------------------------------------------------------------------------------------------ training, checkpoints
def test_validation_loss_falls_on_digits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DPMModule(tiny_unet(), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    dm = DigitsDataModule(batch_size=64)
    t = trainer(tmp_path, max_steps=80, limit_val_batches=2, num_sanity_val_steps=0, check_val_every_n_epoch=1000)
    before = t.validate(model, dm, verbose=False)[0]["val/loss"]
    t.fit(model, dm)
    after = t.validate(model, dm, verbose=False)[0]["val/loss"]
    assert after < 0.3 * before, (before, after)


def test_checkpoint_round_trip_rebuilds_the_schedule(tmp_path: Path) -> None:
    model = DPMModule(tiny_unet(), beta_schedule="cosine", T=200)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    ema = EMAHalfLife(halflife_images=32, rampup_ratio=None)
    trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[ckpt, ema], enable_checkpointing=True).fit(
        model, DigitsDataModule(batch_size=16)
    )
    fresh = VPSchedule("cosine", 200)
    for name in ("alphas_cumprod", "sigmas", "log_sigmas"):  # EMA never averages or replaces the schedule
        assert torch.equal(getattr(model.schedule, name), getattr(fresh, name))
        assert torch.equal(getattr(ema._average_model.module.schedule, name), getattr(fresh, name))
    data = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert data["hyper_parameters"]["beta_schedule"] == "cosine" and data["hyper_parameters"]["T"] == 200
    assert not [k for k in data["state_dict"] if "schedule" in k or "alphas" in k]
    loaded = DPMModule.load_from_checkpoint(tmp_path / "last.ckpt", net=tiny_unet())
    assert loaded.T == 200 and torch.equal(loaded.schedule.alphas_cumprod, fresh.alphas_cumprod)
    for key, value in data["state_dict"].items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.eval().denoiser(x, torch.tensor(1.0)), model.eval().denoiser(x, torch.tensor(1.0)))
