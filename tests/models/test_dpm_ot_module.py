"""DPMOTModule end to end on a tiny EDM model: start level, NFE, labels, per-seed noise, copying, predict, errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_edm_checkpoint

from lightning_dpmot.callbacks import SampleWriter
from lightning_dpmot.cli import main
from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.metrics.copy_rate import copy_rate, nearest_neighbors
from lightning_dpmot.models.dpm_ot import DPMOTModule, load_diffusion_module
from lightning_dpmot.models.semidiscrete import SemiDiscreteOTModule
from lightning_dpmot.ot.latent_targets import GENERATED_NOISE, LatentTargets
from lightning_dpmot.sampling import SamplerSpec
from lightning_dpmot.utils.random import make_generator

REPO = Path(__file__).resolve().parents[2]


def edm_checkpoint(root: Path) -> Path:
    """A class-conditional tiny EDM trained 2 steps through ``dpmot fit``."""
    return tiny_edm_checkpoint(root, class_conditional=True)


def ot_checkpoint(root: Path, sigma_s: float, steps: int = 4, *extra: str) -> Path:
    """A potential fitted a few steps by ``dpmot fit --config configs/dpm_ot/digits_fit.yaml`` on 64 targets."""
    main(
        [
            "fit",
            "--config",
            str(REPO / "configs/dpm_ot/digits_fit.yaml"),
            f"--model.init_args.sigma_s={sigma_s}",
            "--model.init_args.max_targets=64",
            "--model.init_args.solver.num_mc_samples=2048",
            "--model.init_args.solver.chunk_size=512",
            f"--trainer.max_steps={steps}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}",
            *extra,
        ]
    )
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dpm_ot")
    torch.set_num_threads(1)
    return {
        "edm": edm_checkpoint(root / "edm"),
        "ot": ot_checkpoint(root / "ot", 0.5),
        "ot_small": ot_checkpoint(root / "ot_small", 0.01),
    }


def module(ckpts: dict[str, Path], ot: str = "ot", **kwargs: object) -> DPMOTModule:
    kwargs.setdefault("sampler", SamplerSpec("heun", num_steps=3))
    return DPMOTModule(str(ckpts["edm"]), str(ckpts[ot]), **kwargs)  # type: ignore[arg-type]


def targets_of(ckpts: dict[str, Path], ot: str = "ot") -> LatentTargets:
    return LatentTargets.load(ckpts[ot].parents[1] / "ot_targets.pt")


def test_expressway_starts_at_sigma_s_from_the_stored_latent_and_counts_only_network_calls(
    ckpts: dict[str, Path],
) -> None:
    m = module(ckpts)
    targets = targets_of(ckpts)
    first: list[dict[str, object]] = []
    calls: list[int] = []
    hook = m.inner.denoiser.register_forward_hook(lambda *args: calls.append(1))
    result = m.expressway(torch.arange(6), callback=lambda step: first.append(step) if step["i"] == 0 else None)
    hook.remove()
    assert result.x.shape == (6, 1, 8, 8) and result.x.abs().max() <= 1
    assert result.nfe == 5 == len(calls)  # heun, 3 levels below sigma_s: 2 * 3 - 1; the map calls no network
    assert first[0]["sigma"] == pytest.approx(0.5) and m.sigmas_for(m.sampler)[0].item() == pytest.approx(0.5)
    assert torch.equal(result.latents.flatten(1), targets.flat()[result.index])  # hard map: a stored latent
    assert torch.equal(result.labels, targets.labels[result.index])  # conditioned on the mapped target's label
    assert result.map_seconds >= 0
    apart = m.generate(torch.tensor([4]))
    assert torch.allclose(apart.x[0], result.x[4], atol=1e-5) and apart.nfe == 5


def test_hard_map_at_small_sigma_s_copies_its_target_images(ckpts: dict[str, Path]) -> None:
    m = module(ckpts, ot="ot_small", sampler=SamplerSpec("euler", num_steps=1))
    targets = targets_of(ckpts, "ot_small")
    result = m.expressway(torch.arange(32))
    clean = targets.clean[result.index]
    assert (result.x - clean).abs().max() < 0.05  # a copy of the mapped target's clean image
    train = torch.stack([item["x"] for item in DigitsDataModule().dataset("train")])
    _, nearest = nearest_neighbors(result.x, train)
    assert torch.equal(nearest[:, 0], targets.ids[result.index])  # ... whose dataset index is recorded
    assert copy_rate(result.x, train, 1.0 / 3.0).rate == 1.0


@pytest.mark.parametrize("name", ["renoise", "soft", "aeot"])
def test_other_maps_generate_per_seed(ckpts: dict[str, Path], name: str) -> None:
    m = module(ckpts, ot_map=name, sampler=SamplerSpec("euler", num_steps=2))
    together = m.expressway(torch.arange(5))
    alone = m.expressway(torch.tensor([3]))
    assert together.x.shape == (5, 1, 8, 8) and together.nfe == 2
    assert torch.allclose(together.latents[3], alone.latents[0], atol=1e-5)  # batching changes only rounding
    if name == "renoise":  # the cell's clean image plus fresh noise at sigma_s
        residual = (together.latents.flatten(1) - targets_of(ckpts).flat_clean()[together.index]) / 0.5
        assert residual.std().item() == pytest.approx(1.0, abs=0.2)


def test_predict_writes_samples_with_the_labels_used(ckpts: dict[str, Path], tmp_path: Path) -> None:
    m = module(ckpts, sampler=SamplerSpec("euler", num_steps=2))
    dm = DigitsDataModule(predict_num_samples=6, predict_batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[SampleWriter(str(tmp_path / "samples"))],
    )
    trainer.predict(m, dm, return_predictions=False)
    data = np.load(tmp_path / "samples" / "samples.npz")
    expected = m.expressway(torch.arange(6))
    assert data["x"].shape == (6, 1, 8, 8) and int(data["nfe"]) == 2
    assert np.allclose(data["x"], expected.x.numpy(), atol=1e-5)
    assert data["labels"].tolist() == expected.labels.tolist()
    assert data["target_index"].tolist() == expected.index.tolist()  # leakage analysis can name the cell
    assert data["target_id"].shape == (6,) and data["map_seconds"].shape == (2,)  # one timing per batch
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 6 and (tmp_path / "samples" / "grid.png").is_file()


def test_generated_targets_fit_from_a_diffusion_checkpoint(ckpts: dict[str, Path], tmp_path: Path) -> None:
    spec = SamplerSpec("euler", num_steps=2)
    ot = SemiDiscreteOTModule(sigma_s=0.3, diffusion_ckpt=str(ckpts["edm"]), num_generated=8, generate_sampler=spec)
    L.Trainer(
        accelerator="cpu",
        max_steps=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    ).fit(ot, DigitsDataModule(batch_size=16))
    t = ot.targets
    samples = load_diffusion_module(ckpts["edm"]).generate(torch.arange(8), {"label": torch.arange(8)}, spec).x
    assert t.ids.tolist() == [-1] * 8 and t.labels.tolist() == list(range(8))
    assert torch.allclose(t.clean, samples, atol=1e-6)
    noise = torch.randn(1, 8, 8, generator=make_generator(0, GENERATED_NOISE, 5, 0))
    assert torch.equal(t.latents[5], t.clean[5] + 0.3 * noise)
    assert t.provenance["checkpoint"] == str(ckpts["edm"]) and t.provenance["model_class"].endswith("EDMModule")


def test_training_is_refused(ckpts: dict[str, Path], tmp_path: Path) -> None:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ValueError, match="DPMOTModule cannot be trained: it only samples"):
        trainer.fit(module(ckpts), DigitsDataModule(batch_size=16))


def test_bad_checkpoints_and_shapes_fail_clearly(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a SemiDiscreteOTModule checkpoint"):
        DPMOTModule(str(ckpts["edm"]), str(ckpts["edm"]))
    with pytest.raises(ValueError, match="cannot rebuild the diffusion model.*SemiDiscreteOTModule"):
        DPMOTModule(str(ckpts["ot"]), str(ckpts["ot"]))
    with pytest.raises(FileNotFoundError, match="diffusion checkpoint .*nope.ckpt' does not exist"):
        DPMOTModule(str(tmp_path / "nope.ckpt"), str(ckpts["ot"]))
    with pytest.raises(FileNotFoundError, match="targets file .*gone.pt' of OT checkpoint .* does not exist"):
        module(ckpts, targets_file=str(tmp_path / "gone.pt"))
    with pytest.raises(ValueError, match=r"shapes differ: data \(3, 32, 32\), diffusion model \(1, 8, 8\)"):
        module(ckpts, data_shape=(3, 32, 32))
    other = targets_of(ckpts, "ot_small").save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold the targets OT checkpoint"):
        module(ckpts, targets_file=str(other))


def test_curvature_is_measured_from_the_mapped_latents(ckpts: dict[str, Path]) -> None:
    """NFESweep's trajectory metrics go through generate's step callback, so for DPM-OT they start at the OT-mapped
    latents at sigma_s (before the generation protocol they started from Gaussian noise * sigma_s)."""
    from lightning_dpmot.callbacks.nfe_sweep import NFESweep
    from lightning_dpmot.metrics.curvature import TrajectoryRecorder, mean_trajectory_metrics

    m = module(ckpts)
    sweep = NFESweep(samplers=["heun"], nfe=[3], curvature_samples=6, curvature_steps=4)
    measured = sweep.measure_curvature(m)
    seeds = torch.arange(6) + 10_000_000  # the sweep's curvature seeds
    spec = SamplerSpec("heun", num_steps=4)
    recorder = TrajectoryRecorder()
    result = m.expressway(seeds, spec=spec, callback=recorder)
    assert torch.equal(recorder.x_start, result.latents.double())  # the trajectory starts at the mapped latents
    expected = mean_trajectory_metrics(*recorder.stack())
    assert measured["curvature"] == pytest.approx(expected["curvature"], rel=1e-12)
    assert measured["deviation"] == pytest.approx(expected["deviation"], rel=1e-12)
    # the old measurement (Gaussian noise at sigma_s) gives other trajectories
    noise_start = TrajectoryRecorder()
    sigmas = m.sigmas_for(spec)
    from lightning_dpmot.utils.random import StackedGenerator

    x = StackedGenerator(seeds).randn(m.data_shape).double() * sigmas[0]
    m.inner.sample_from(x, sigmas, cond={"label": result.labels}, spec=spec, callback=noise_start)
    assert mean_trajectory_metrics(*noise_start.stack())["curvature"] != pytest.approx(measured["curvature"])


def test_ot_checkpoint_from_before_the_solver_config_resumes_through_the_cli(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    """Checkpoints whose hyperparameters hold the flat pre-SemiDiscreteConfig solver keys: `dpmot fit --ckpt_path`
    upgrades them (SemiDiscreteOTModule.upgrade_hparams) and DPMOTModule samples from them."""
    ckpt = torch.load(ckpts["ot"], weights_only=True)
    hparams = dict(ckpt["hyper_parameters"])
    new_keys = ("seed", "optimizer", "lr_exponent", "average_power")  # (the last three came with averaged SGD)
    solver = {k: v for k, v in hparams.pop("solver").items() if k not in new_keys}
    old = dict(ckpt, hyper_parameters={**hparams, **solver})
    # an old (Adam) state: no ASGD iterate, no optimizer in the solver's extra state (h, m, v, schedule are kept)
    state = {k: v for k, v in ckpt["state_dict"].items() if k != "solver.h_iterate"}
    state["solver._extra_state"] = {k: v for k, v in state["solver._extra_state"].items() if k != "optimizer"}
    old["state_dict"] = state
    assert "solver" not in old["hyper_parameters"] and old["hyper_parameters"]["num_mc_samples"] == 2048
    torch.save(old, tmp_path / "old.ckpt")
    resumed = ot_checkpoint(tmp_path / "resumed", 0.5, 5, f"--ckpt_path={tmp_path / 'old.ckpt'}")
    assert torch.load(resumed, weights_only=True)["global_step"] == 5
    m = DPMOTModule(str(ckpts["edm"]), str(tmp_path / "old.ckpt"), sampler=SamplerSpec("heun", num_steps=3))
    assert torch.equal(m.generate(torch.arange(3)).x, module(ckpts).generate(torch.arange(3)).x)
