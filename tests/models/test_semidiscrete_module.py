"""SemiDiscreteOTModule: the Lightning fit equals SemiDiscreteOT.fit, exact resume, lean checkpoints, DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dpmot.data import DigitsDataModule
from lightning_dpmot.models.semidiscrete import (
    LEGACY_SOLVER_KEYS,
    SemiDiscreteOTModule,
    load_ot_checkpoint,
    migrate_hparams,
    solver_config,
)
from lightning_dpmot.ot.latent_targets import LatentTargets, targets_from_dataset
from lightning_dpmot.ot.semidiscrete import SemiDiscreteConfig, SemiDiscreteOT

SETTINGS = dict(sigma_s=0.5, max_targets=64, seed=3)
SOLVER = dict(num_mc_samples=2048, chunk_size=512)


def fit(
    root: Path,
    max_steps: int,
    ckpt_path: str | None = None,
    solver: dict[str, object] | None = None,
    **overrides: object,
) -> SemiDiscreteOTModule:
    config = SemiDiscreteConfig(**{**SOLVER, **(solver or {})})  # type: ignore[arg-type]
    module = SemiDiscreteOTModule(**{**SETTINGS, **overrides}, solver=config)  # type: ignore[arg-type]
    trainer = quiet_trainer(
        root,
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, save_top_k=0)],
    )
    trainer.fit(module, DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)  # 11 steps per epoch
    return module


def test_lightning_fit_converges_and_equals_solver_fit(tmp_path: Path) -> None:
    module = fit(tmp_path, max_steps=400, solver=dict(tol=0.1), eval_every=10)
    steps = module.trainer.global_step
    assert module.converged and steps < 400 and int(module.solver.iteration) == steps
    assert module.last_evaluation["rel_rms_err"] <= 0.1 and module.last_evaluation["empty_cells"] == 0
    targets = targets_from_dataset(DigitsDataModule().dataset("train"), 0.5, seed=3, max_targets=64)
    direct = SemiDiscreteOT(targets.flat(), num_mc_samples=2048, chunk_size=512, seed=3, tol=0.1)
    result = direct.fit(400, eval_every=10, progress=False)
    assert result["converged"] and result["iterations"] == steps
    assert torch.equal(direct.h, module.solver.h) and result["evaluation"] == module.last_evaluation
    metrics = module.trainer.callback_metrics
    assert metrics["ot/num_mc_samples"].item() == 2048 and metrics["ot_eval/converged"].item() == 1.0
    assert metrics["train/loss"].item() == pytest.approx(result["history"][-1]["energy"], rel=1e-6)
    # the targets were written once, with provenance, next to a summary of the fit
    written = LatentTargets.load(tmp_path / "ot_targets.pt")
    assert written.fingerprint() == targets.fingerprint() and written.provenance["split"] == "train"
    assert written.provenance["dataset"] == "digits-8px" and written.clean is not None
    summary = json.loads((tmp_path / "ot_fit.json").read_text())
    assert summary["converged"] and summary["iterations"] == steps and summary["num_targets"] == 64


def test_resume_from_last_ckpt_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    common = dict(solver=dict(tol=1e-3, patience=2, max_doublings=1), eval_every=5)  # no convergence; one doubling
    straight = fit(tmp_path / "a", max_steps=24, **common)
    fit(tmp_path / "b", max_steps=12, **common)
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert "solver.targets" not in ckpt["state_dict"] and int(ckpt["state_dict"]["solver.iteration"]) == 12
    assert ckpt["dpm_ot"]["targets_sha256"] == straight.fingerprint and ckpt["dpm_ot"]["num_targets"] == 64
    resumed = fit(tmp_path / "b", max_steps=24, ckpt_path=str(last), **common)
    assert resumed.trainer.global_step == 24 and int(straight.solver.doublings) == 1
    for name, buf in straight.solver.named_buffers():
        assert torch.equal(buf, getattr(resumed.solver, name)), name
    assert resumed.last_evaluation == straight.last_evaluation


def test_resuming_with_other_targets_fails_clearly(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=3, eval_every=100)
    with pytest.raises(ValueError, match="differ from those the checkpoint was fitted to.*check sigma_s"):
        fit(tmp_path, max_steps=6, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), sigma_s=0.4)


def test_targets_file_replaces_the_build_and_must_match_sigma_s(tmp_path: Path) -> None:
    targets = targets_from_dataset(DigitsDataModule().dataset("train"), 0.5, seed=9, max_targets=16)
    path = targets.save(tmp_path / "mine.pt")
    module = fit(tmp_path / "run", max_steps=2, targets_file=str(path))
    assert module.fingerprint == targets.fingerprint() and module.solver.num_targets == 16
    with pytest.raises(ValueError, match="holds latents at sigma_s=0.5, but the module asks for sigma_s=0.2"):
        fit(tmp_path / "run2", max_steps=2, targets_file=str(path), sigma_s=0.2)


def test_bad_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'val', got 'test'"):
        SemiDiscreteOTModule(split="test")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either targets_file or diffusion_ckpt"):
        SemiDiscreteOTModule(targets_file="a.pt", diffusion_ckpt="b.ckpt")
    with pytest.raises(ValueError, match="sigma_s must be finite and >= 0, got -1"):
        SemiDiscreteOTModule(sigma_s=-1.0)
    with pytest.raises(ValueError, match="eps must be finite, got nan"):
        SemiDiscreteOTModule(solver={"eps": float("nan")})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown semi-discrete solver setting\(s\) \['lrr'\]"):
        SemiDiscreteOTModule(solver={"lrr": 0.1})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ one typed solver config


def test_the_solver_config_is_saved_as_a_plain_mapping_and_its_seed_defaults_to_the_modules() -> None:
    module = SemiDiscreteOTModule(seed=3, solver=SemiDiscreteConfig(num_mc_samples=2048, tol=0.2))
    assert module.solver_config == SemiDiscreteConfig(num_mc_samples=2048, tol=0.2, seed=3)
    assert module.hparams["solver"] == SemiDiscreteConfig(num_mc_samples=2048, tol=0.2).as_dict()  # plain, seed None
    assert "num_mc_samples" not in module.hparams and "tol" not in module.hparams
    assert solver_config(module.hparams) == module.solver_config
    explicit = SemiDiscreteOTModule(seed=3, solver=SemiDiscreteConfig(seed=5))
    assert explicit.solver_config.seed == 5  # the MC streams decouple from the targets' seed only on request
    rebuilt = SemiDiscreteOTModule(**dict(module.hparams))  # what load_from_checkpoint does: a dict, not the config
    assert rebuilt.solver_config == module.solver_config


def legacy_hparams(hparams: dict[str, object]) -> dict[str, object]:
    """Hyperparameters as checkpoints written before SemiDiscreteConfig held them: flat solver keys, no 'solver'."""
    old = {k: v for k, v in hparams.items() if k != "solver"}
    flat = dict(hparams["solver"])  # type: ignore[arg-type]
    assert flat.pop("seed") is None  # the module's seed seeded the MC streams
    assert flat.pop("optimizer") == "adam"  # settings added with averaged SGD: absent from old checkpoints
    flat.pop("lr_exponent"), flat.pop("average_power")
    assert set(flat) == set(LEGACY_SOLVER_KEYS)
    old.update(flat)
    return old


def test_checkpoints_from_before_the_solver_config_still_load(tmp_path: Path) -> None:
    adam = dict(patience=7, lr=0.03, optimizer="adam")  # checkpoints from before the config are Adam runs
    module = fit(tmp_path, max_steps=3, solver=adam, eval_every=100)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["hyper_parameters"]["solver"]["patience"] == 7  # nested, plain
    old = dict(ckpt, hyper_parameters=legacy_hparams(ckpt["hyper_parameters"]))
    # nor did they hold the ASGD iterate or name the optimizer in the solver's extra state
    state = {k: v for k, v in ckpt["state_dict"].items() if k != "solver.h_iterate"}
    state["solver._extra_state"] = {k: v for k, v in state["solver._extra_state"].items() if k != "optimizer"}
    old["state_dict"] = state
    assert "solver" not in old["hyper_parameters"] and old["hyper_parameters"]["num_mc_samples"] == 2048
    torch.save(old, tmp_path / "old.ckpt")
    new_solver, _, _ = load_ot_checkpoint(last)
    old_solver, targets, meta = load_ot_checkpoint(tmp_path / "old.ckpt")
    assert old_solver.config == new_solver.config == module.solver_config
    assert old_solver.config.seed == 3 and old_solver.config.lr == 0.03 and old_solver.config.patience == 7
    for name, buf in new_solver.named_buffers():
        assert torch.equal(buf, getattr(old_solver, name)), name
    # SemiDiscreteOTModule.load_from_checkpoint cannot rebuild the targets; the message names the change too
    with pytest.raises(ValueError, match="cannot be loaded on its own.*predates SemiDiscreteConfig.*init_args.solver"):
        SemiDiscreteOTModule.load_from_checkpoint(tmp_path / "old.ckpt")
    # resuming an old checkpoint with the new module continues exactly
    resumed = fit(tmp_path, max_steps=6, ckpt_path=str(tmp_path / "old.ckpt"), solver=adam)
    straight = fit(tmp_path / "straight", max_steps=6, solver=adam, eval_every=100)
    assert torch.equal(resumed.solver.h, straight.solver.h)


def test_migrating_hyperparameters() -> None:
    current = {"seed": 1, "solver": SemiDiscreteConfig(tol=0.2).as_dict()}
    assert migrate_hparams(current) == current
    assert migrate_hparams({"seed": 1, "solver": SemiDiscreteConfig(tol=0.2)}) == current
    # flat (pre-config) keys and solver mappings without 'optimizer' were written by Adam runs
    old = {"seed": 1, "solver": SemiDiscreteConfig(tol=0.2, optimizer="adam").as_dict()}
    assert migrate_hparams({"seed": 1, "tol": 0.2}) == old
    assert SemiDiscreteOTModule.upgrade_hparams({"_class_path": "x", "seed": 1, "tol": 0.2}) == {
        "_class_path": "x",
        **old,
    }
    assert solver_config({"seed": 1, "tol": 0.2}) == SemiDiscreteConfig(tol=0.2, seed=1, optimizer="adam")
    no_optimizer = {
        k: v for k, v in current["solver"].items() if k not in ("optimizer", "lr_exponent", "average_power")
    }
    assert solver_config({"seed": 1, "solver": no_optimizer}) == SemiDiscreteConfig(tol=0.2, seed=1, optimizer="adam")
    assert SemiDiscreteConfig().optimizer == "asgd" and solver_config(current).optimizer == "asgd"
    with pytest.raises(ValueError, match=r"both a 'solver' config and the pre-SemiDiscreteConfig flat solver keys"):
        migrate_hparams({"solver": {}, "lr": 0.1})
    with pytest.raises(ValueError, match="tol must be positive"):
        migrate_hparams({"tol": -1.0})


class CheckRanks(L.Callback):
    """In each worker, after the last step: every rank holds the same targets and the same h, and DDP does not
    broadcast the solver's buffers (failures propagate from the workers)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < trainer.max_steps:
            return
        fingerprints = pl_module.all_gather(torch.tensor(int(pl_module.fingerprint[:15], 16)))
        hs = pl_module.all_gather(pl_module.solver.h)
        assert fingerprints.shape == (2,) and fingerprints[0] == fingerprints[1]
        assert torch.equal(hs[0], hs[1])
        assert pl_module.solver.world_size == 2
        assert {"solver.targets", "solver.h"} <= set(trainer.strategy.model.parameters_to_ignore)
        pl_module.log("checked_ranks", float(hs.shape[0]))


@pytest.mark.slow
def test_two_process_ddp_fit_gives_the_same_h_on_both_ranks_as_one_process(tmp_path: Path) -> None:
    config = SemiDiscreteConfig(**SOLVER, tol=1e-3)  # type: ignore[arg-type]
    module = SemiDiscreteOTModule(**SETTINGS, solver=config, eval_every=4)  # type: ignore[arg-type]
    trainer = quiet_trainer(
        tmp_path,
        devices=2,
        strategy="ddp_spawn",
        max_steps=8,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[CheckRanks()],
    )
    trainer.fit(module, DigitsDataModule(batch_size=16))
    assert trainer.callback_metrics["checked_ranks"].item() == 2.0  # the workers ran the checks
    single = fit(tmp_path / "single", max_steps=8, eval_every=4, solver=dict(tol=1e-3))
    assert torch.equal(module.solver.h, single.solver.h)  # rank 0's state, returned to the main process
    assert torch.equal(module.solver.iteration, single.solver.iteration)
