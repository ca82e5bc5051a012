"""Fit the DPM-OT potential h under Lightning: ``dpmot fit --config configs/dpm_ot/<...>_fit.yaml``.

:class:`SemiDiscreteOTModule` wraps :class:`~lightning_dpmot.ot.semidiscrete.SemiDiscreteOT` with manual
optimisation: every training step is one Monte Carlo iteration on h (``SemiDiscreteOT.step``, averaged SGD or Adam). The
DataModule's training batches are ignored; the DataModule supplies the target images (``setup``) and sets the
rhythm of epochs, hence of ModelCheckpoint's epoch-end saves (choose ``batch_size`` so an epoch is ~100 steps).

Data flow:

1. ``setup``: targets ``y_i = x_i + sigma_s n_i`` from ``trainer.datamodule.dataset(split)`` (or from a diffusion
   checkpoint's samples, or a saved targets file), identical on every rank by construction; written once with
   provenance to ``<log_dir>/ot_targets.pt``.
2. ``training_step``: ``solver.step()`` (the rank's share of the MC chunks, one all-reduce of the histogram);
   logs ``train/loss`` (the MC estimate of the convex energy E(h) being minimised) and ``ot/*`` diagnostics.
3. every ``eval_every`` steps: held-out evaluation ``ot_eval/*``; the run stops (``trainer.should_stop``) under
   the rule of ``SemiDiscreteOT.fit``: the step's own debiased error passes and so does the held-out one. Both
   therefore stop at the same iteration with the same h.

Checkpoints hold the solver state (h, the ASGD iterate, Adam m and v, iteration, M, lr, schedule) but not the targets:
they are
rebuilt deterministically on resume and checked against the SHA-256 stored in ``checkpoint["dpm_ot"]``.

Multi-GPU (DDP): every rank holds all targets and h; MC chunks are split over ranks and the histogram is summed,
so every rank takes the identical step and h does not depend on the number of devices. The solver's buffers are
excluded from DDP's buffer broadcast (``_ddp_params_and_buffers_to_ignore``); a zero-size-effect parameter keeps
DDP's wrapper happy (it refuses modules without trainable parameters) and an lr-0 SGD optimizer on it makes
Lightning count steps (``max_steps``, ``global_step``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_dpmot.models.base import plain_data
from lightning_dpmot.ot.latent_targets import (
    LatentTargets,
    generate_samples,
    targets_from_dataset,
    targets_from_samples,
)
from lightning_dpmot.ot.semidiscrete import SemiDiscreteConfig, SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_maps import exact_fp32
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.distributed import gather_rows, rank_seeds

#: Key of the DPM-OT metadata in a Lightning checkpoint of :class:`SemiDiscreteOTModule`.
CHECKPOINT_KEY = "dpm_ot"
TARGETS_FILENAME = "ot_targets.pt"
SUMMARY_FILENAME = "ot_fit.json"
#: Hyperparameters that checkpoints written before :class:`SemiDiscreteConfig` held at the top level (now nested under
#: ``solver``); ``seed`` stays the module's (it seeded the targets and, then as now by default, the MC streams).
LEGACY_SOLVER_KEYS: tuple[str, ...] = tuple(
    name
    for name in SemiDiscreteConfig.field_names()
    if name not in ("seed", "optimizer", "lr_exponent", "average_power")
)
_STEP_LOGS = ("g_norm", "max_abs_err", "mean_abs_err", "max_rel_err", "rel_rms_err", "empty_cells", "energy")
_PROGRESS = ("rel_rms_err", "empty_cells")


def as_solver_config(solver: SemiDiscreteConfig | Mapping[str, Any] | None) -> SemiDiscreteConfig:
    """The typed config of a module argument or checkpoint entry (a config, a plain mapping, or None: defaults)."""
    if solver is None:
        return SemiDiscreteConfig()
    if isinstance(solver, SemiDiscreteConfig):
        return solver
    if isinstance(solver, Mapping):
        return SemiDiscreteConfig.from_mapping(solver)
    raise ValueError(f"solver must be a SemiDiscreteConfig or a mapping of its settings, got {type(solver).__name__}")


def migrate_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters with the solver settings nested under ``solver`` (a plain dict), as the module saves them.

    Checkpoints written before :class:`SemiDiscreteConfig` hold the settings as flat keys (``lr``,
    ``num_mc_samples``, ..., :data:`LEGACY_SOLVER_KEYS`); they are moved into ``solver`` unchanged, which rebuilds the
    identical solver (the module's ``seed`` still seeds the MC streams: ``solver.seed`` is None). Solver settings
    written before the ``optimizer`` setting existed are Adam's: ``optimizer: adam`` is added (the default is now
    averaged SGD). Current hyperparameters are returned as they are (copied).

    Raises:
        ValueError: flat solver keys next to a ``solver`` entry, or invalid settings (named).
    """
    hp = dict(hparams)
    legacy = {key: hp.pop(key) for key in LEGACY_SOLVER_KEYS if key in hp}
    if legacy:
        if hp.get("solver") is not None:
            raise ValueError(
                f"hyperparameters hold both a 'solver' config and the pre-SemiDiscreteConfig flat solver keys "
                f"{sorted(legacy)}; keep only 'solver'"
            )
        hp["solver"] = SemiDiscreteConfig.from_mapping({"optimizer": "adam", **legacy}).as_dict()
    elif isinstance(hp.get("solver"), SemiDiscreteConfig):
        hp["solver"] = hp["solver"].as_dict()
    if isinstance(hp.get("solver"), Mapping) and "optimizer" not in hp["solver"]:
        hp["solver"] = {**hp["solver"], "optimizer": "adam"}  # written before averaged SGD existed
    return hp


def solver_config(hparams: Mapping[str, Any]) -> SemiDiscreteConfig:
    """The solver config of a module's (or checkpoint's, old or new) hyperparameters, its seed resolved.

    ``solver.seed = None`` means the module's ``seed`` (which also seeds the targets), as before the config existed.
    """
    hp = migrate_hparams(hparams)
    config = as_solver_config(hp.get("solver"))
    return config if config.seed is not None else config.replace(seed=int(hp.get("seed", 0)))


def _plain_floats(diag: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in diag.items()}


class SemiDiscreteOTModule(L.LightningModule):
    """Semi-discrete OT potential from noise to junction latents, one solver iteration per training step.

    Args:
        data_shape: sample shape, linked from the DataModule (checked against the targets).
        num_classes: linked from the DataModule (unused).
        sigma_s: junction noise level of the targets (sigma space, data in [-1, 1]).
        split: dataset split of the targets ("train" default; "val" holds out what evaluation uses: copy risk).
        num_draws: noise draws per image.
        seed: seed of the target noise, the target subset and (unless ``solver.seed`` is set) the Monte Carlo streams.
        max_targets: seeded random subset of this many targets (None: all).
        targets_file: load the targets from this :class:`LatentTargets` file instead of building them.
        diffusion_ckpt: build the targets from this diffusion checkpoint's own samples (``generate``).
        num_generated: number of generated samples (seeds ``0 .. num_generated - 1``).
        generate_sampler: sampler for the generated targets (default: the model's own).
        generate_batch_size: per-device generation batch size.
        keep_clean: store the clean samples in the targets file (the ``renoise`` map needs them).
        solver: the :class:`~lightning_dpmot.ot.semidiscrete.SemiDiscreteConfig` of the solver (YAML: a nested
            mapping ``solver: {lr: ..., num_mc_samples: ...}``); its ``seed`` defaults to this module's ``seed``.
        eval_every: held-out evaluation every this many steps.
        eval_num_samples: held-out samples (default ``eval_factor * M``).
        stop_when_converged: stop the run at convergence (else run to ``max_steps``).
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        sigma_s: float = 0.5,
        split: Literal["train", "val"] = "train",
        num_draws: int = 1,
        seed: int = 0,
        max_targets: int | None = None,
        targets_file: str | None = None,
        diffusion_ckpt: str | None = None,
        num_generated: int = 1000,
        generate_sampler: SamplerSpec | None = None,
        generate_batch_size: int = 256,
        keep_clean: bool = True,
        solver: SemiDiscreteConfig | None = None,
        eval_every: int = 50,
        eval_num_samples: int | None = None,
        stop_when_converged: bool = True,
    ) -> None:
        super().__init__()
        if not (math.isfinite(sigma_s) and sigma_s >= 0):
            raise ValueError(f"sigma_s must be finite and >= 0, got {sigma_s}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if targets_file is not None and diffusion_ckpt is not None:
            raise ValueError("give either targets_file or diffusion_ckpt (generated targets), not both")
        if num_draws < 1 or num_generated < 1 or eval_every < 1 or generate_batch_size < 1:
            raise ValueError(
                f"num_draws, num_generated, eval_every and generate_batch_size must be >= 1, got {num_draws}, "
                f"{num_generated}, {eval_every} and {generate_batch_size}"
            )
        config = as_solver_config(solver)  # also a plain dict: load_from_checkpoint passes the saved hyperparameters
        #: the solver settings, ``seed`` resolved (None: the module's seed, which also seeds the targets)
        self.solver_config = config if config.seed is not None else config.replace(seed=seed)
        # save_hyperparameters reads the arguments' current values: keep the settings as a plain dict (YAML-loggable,
        # weights_only-loadable); the config's own seed (None by default) is saved, not the resolved one
        solver = config.as_dict()  # type: ignore[assignment]
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.data_shape = tuple(data_shape)
        self.ddp_anchor = nn.Parameter(torch.zeros(()))  # DDP refuses a module without trainable parameters
        self.solver: SemiDiscreteOT | None = None
        self.targets: LatentTargets | None = None
        self.targets_path: Path | None = None
        self.fingerprint: str | None = None
        self.last_evaluation: dict[str, float] | None = None
        self.evaluated_at = -1
        self.converged = False

    @staticmethod
    def upgrade_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Checkpoint hyperparameters in the current form (flat pre-:class:`SemiDiscreteConfig` solver keys nested
        under ``solver``): :func:`migrate_hparams`, for callers that rebuild the module from a checkpoint (the CLI)."""
        return migrate_hparams(hparams)

    # ------------------------------------------------------------------------------------------------- targets
    def build_targets(self) -> LatentTargets:
        """The targets this configuration asks for (identical on every rank; may use collectives)."""
        hp = self.hparams
        if hp.targets_file is not None:
            targets = LatentTargets.load(hp.targets_file)
            if not math.isclose(targets.sigma_s, hp.sigma_s, rel_tol=1e-6, abs_tol=1e-12):
                raise ValueError(
                    f"targets_file {hp.targets_file!r} holds latents at sigma_s={targets.sigma_s:.6g}, but the "
                    f"module asks for sigma_s={hp.sigma_s:.6g}"
                )
            return targets
        if hp.diffusion_ckpt is not None:
            return self._generated_targets()
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "dataset"):
            raise ValueError("SemiDiscreteOTModule needs a DataModule with dataset(split) to build its targets")
        provenance = {"split": hp.split, "dataset": str(getattr(dm, "name", type(dm).__name__)), "checkpoint": None}
        return targets_from_dataset(
            dm.dataset(hp.split),
            hp.sigma_s,
            num_draws=hp.num_draws,
            seed=hp.seed,
            max_targets=hp.max_targets,
            keep_clean=hp.keep_clean,
            provenance=provenance,
        )

    def _generated_targets(self) -> LatentTargets:
        """Each rank generates its share of the seeds; the samples are gathered, so all ranks hold the same."""
        from lightning_dpmot.models.dpm_ot import load_diffusion_module  # models.dpm_ot imports this module

        hp, trainer = self.hparams, self.trainer
        model = load_diffusion_module(hp.diffusion_ckpt).to(trainer.strategy.root_device)
        seeds = rank_seeds(hp.num_generated, trainer.global_rank, trainer.world_size)
        x, labels = generate_samples(model, seeds, hp.generate_sampler, hp.generate_batch_size)
        if trainer.world_size > 1:
            device = trainer.strategy.root_device
            x = gather_rows(trainer, x.to(device)).cpu()
            labels = gather_rows(trainer, labels.to(device).unsqueeze(1)).cpu()[:, 0]
            seeds = gather_rows(trainer, seeds.to(device).unsqueeze(1)).cpu()[:, 0]
        order = seeds.argsort()
        provenance = {
            "checkpoint": str(hp.diffusion_ckpt),
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "sampler": (hp.generate_sampler or model.sampler).tag,
            "split": None,
            "dataset": None,
        }
        del model
        return targets_from_samples(
            x[order],
            seeds[order],
            labels[order],
            hp.sigma_s,
            num_draws=hp.num_draws,
            seed=hp.seed,
            max_targets=hp.max_targets,
            keep_clean=hp.keep_clean,
            provenance=provenance,
        )

    # --------------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, stage: str) -> None:
        if self.solver is not None:
            return
        targets = self.build_targets()
        if targets.data_shape != self.data_shape:
            raise ValueError(f"targets have shape {targets.data_shape} but the data shape is {self.data_shape}")
        self.attach(targets)
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)  # collective for some loggers
        self.targets_path = (log_dir / TARGETS_FILENAME).resolve()
        if self.trainer.is_global_zero and stage == "fit":
            existing_ok = self.targets_path.is_file() and _stored_fingerprint(self.targets_path) == self.fingerprint
            if not existing_ok:
                targets.save(self.targets_path)

    def attach(self, targets: LatentTargets) -> None:
        """Create the solver for ``targets`` (called by ``setup``; callable directly outside a Trainer)."""
        self.targets = targets
        self.fingerprint = targets.fingerprint()
        self.solver = SemiDiscreteOT(targets.flat(), config=self.solver_config)
        self._ddp_params_and_buffers_to_ignore = [f"solver.{name}" for name, _ in self.solver.named_buffers()]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # lr 0 and no gradients: the step only advances Lightning's step counter; h moves in solver.step()
        return torch.optim.SGD([self.ddp_anchor], lr=0.0)

    # ------------------------------------------------------------------------------------------------ training
    def _solver(self) -> SemiDiscreteOT:
        if self.solver is None:
            raise RuntimeError("the solver does not exist yet: call setup() (Trainer) or attach(targets)")
        return self.solver

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        solver = self._solver()
        with exact_fp32(solver.targets.device):
            diag = solver.step()
        self.ddp_anchor.grad = torch.zeros_like(self.ddp_anchor)  # a (zero) gradient keeps AMP's GradScaler happy
        self.optimizers().step()
        self.log("train/loss", diag["energy"], prog_bar=True, batch_size=1)
        for key in _STEP_LOGS:
            self.log(f"ot/{key}", diag[key], prog_bar=key in _PROGRESS, batch_size=1)
        self.log("ot/num_mc_samples", diag["num_mc_samples"], batch_size=1)
        self.log("ot/lr", diag["lr"], batch_size=1)
        iteration = int(solver.iteration)
        if iteration % self.hparams.eval_every == 0:
            evaluation = self.evaluate()
            # SemiDiscreteOT.fit's rule: the step's own (pre-update) error gates the held-out decision (Adam only)
            self.converged = solver.step_passes(diag) and solver.is_converged(evaluation)
            self.log("ot_eval/converged", float(self.converged), batch_size=1)
            if self.converged and self.hparams.stop_when_converged:
                self.trainer.should_stop = True

    def evaluate(self, log: bool = True) -> dict[str, float]:
        """Held-out diagnostics of the current h (collective under DDP); logged as ``ot_eval/*`` if ``log``."""
        solver = self._solver()
        with exact_fp32(solver.targets.device):
            evaluation = _plain_floats(solver.evaluate(self.hparams.eval_num_samples))
        self.last_evaluation, self.evaluated_at = evaluation, int(solver.iteration)
        if log:
            for key in (*_STEP_LOGS, "num_samples"):
                self.log(f"ot_eval/{key}", evaluation[key], batch_size=1)
        return evaluation

    @override
    def on_train_end(self) -> None:
        solver = self._solver()
        if self.evaluated_at != int(solver.iteration):
            self.evaluate(log=False)  # Lightning allows no logging in on_train_end
            self.converged = solver.is_converged(self.last_evaluation)
        if self.trainer.is_global_zero and self.targets_path is not None:
            summary = {
                "converged": self.converged,
                "iterations": int(solver.iteration),
                "evaluation": self.last_evaluation,
                "targets_file": str(self.targets_path),
                "targets_sha256": self.fingerprint,
                "num_targets": solver.num_targets,
                "dim": solver.dim,
                "sigma_s": float(self.hparams.sigma_s),
            }
            (self.targets_path.parent / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2))

    # --------------------------------------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"].pop("solver.targets", None)  # rebuilt from data and verified by hash
        targets = self.targets
        assert targets is not None
        checkpoint[CHECKPOINT_KEY] = {
            "targets_sha256": self.fingerprint,
            "targets_file": None if self.targets_path is None else str(self.targets_path),
            "sigma_s": targets.sigma_s,
            "data_shape": list(targets.data_shape),
            "num_targets": targets.num_targets,
            "provenance": targets.provenance,
            "evaluation": self.last_evaluation,
            "converged": self.converged,
        }
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = plain_data(checkpoint["hyper_parameters"])  # weights_only-loadable

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise ValueError("not a SemiDiscreteOTModule checkpoint: it has no 'dpm_ot' entry")
        hparams = checkpoint.get("hyper_parameters") or {}
        legacy = sorted(set(hparams) & set(LEGACY_SOLVER_KEYS))
        if legacy or "optimizer" not in (hparams.get("solver") or {"optimizer": None}):
            # written before SemiDiscreteConfig (flat solver settings) or before averaged SGD (Adam): the current form
            checkpoint["hyper_parameters"] = migrate_hparams(hparams)
        if self.solver is None:
            note = (
                f" (it also predates SemiDiscreteConfig: its flat solver hyperparameters {legacy} are now "
                "model.init_args.solver.*, which load_ot_checkpoint converts)"
                if legacy
                else ""
            )
            raise ValueError(
                "a SemiDiscreteOTModule checkpoint holds no targets and cannot be loaded on its own: resume it with "
                "`dpmot fit --ckpt_path` or read it with lightning_dpmot.models.semidiscrete.load_ot_checkpoint" + note
            )
        solver = self.solver
        if meta["targets_sha256"] != self.fingerprint:
            raise ValueError(
                f"the targets built now (sha256 {self.fingerprint[:16]}...) differ from those the checkpoint was "
                f"fitted to ({meta['targets_sha256'][:16]}...): check sigma_s, split, num_draws, seed, max_targets "
                f"and the data, or pass targets_file={meta.get('targets_file')!r}"
            )
        checkpoint["state_dict"]["solver.targets"] = solver.targets

    @override
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also works before ``setup`` (e.g. ddp_spawn's results in the main process): the solver is then built from
        the state's own ``solver.targets``."""
        if self.solver is None and "solver.targets" in state_dict:
            self.solver = SemiDiscreteOT(state_dict["solver.targets"], config=self.solver_config)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _stored_fingerprint(path: Path) -> str | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("sha256")
    except Exception:  # unreadable: rewrite it
        return None


def load_ot_checkpoint(
    path: str | Path, targets_file: str | Path | None = None, map_location: str | torch.device = "cpu"
) -> tuple[SemiDiscreteOT, LatentTargets, dict[str, Any]]:
    """The fitted solver, its targets and the checkpoint's ``dpm_ot`` metadata from a SemiDiscreteOTModule checkpoint.

    The targets come from ``targets_file`` or, by default, the file the fitting run recorded; their SHA-256 must
    match the checkpoint's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OT checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path}: not a SemiDiscreteOTModule checkpoint (no {CHECKPOINT_KEY!r} entry)")
    source = targets_file or meta.get("targets_file")
    if source is None:
        raise ValueError(f"{path}: the checkpoint records no targets file; pass targets_file")
    if not Path(source).is_file():
        raise FileNotFoundError(
            f"targets file {str(source)!r} of OT checkpoint {str(path)!r} does not exist; pass targets_file=<the "
            f"fitting run's {TARGETS_FILENAME}>"
        )
    targets = LatentTargets.load(source)
    if targets.fingerprint() != meta["targets_sha256"]:
        raise ValueError(f"targets file {str(source)!r} does not hold the targets OT checkpoint {str(path)!r} fitted")
    try:
        config = solver_config(ckpt.get("hyper_parameters") or {})
    except ValueError as err:
        raise ValueError(f"{path}: invalid solver settings in the checkpoint's hyperparameters: {err}") from err
    solver = SemiDiscreteOT(targets.flat(), config=config)
    state: dict[str, Tensor] = {
        k.removeprefix("solver."): v for k, v in ckpt["state_dict"].items() if k.startswith("solver.")
    }
    state["targets"] = solver.targets
    solver.load_state_dict(state)
    return solver.to(map_location), targets, meta
