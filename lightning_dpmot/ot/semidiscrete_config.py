"""Settings of :class:`~lightning_dpmot.ot.semidiscrete.SemiDiscreteOT`: one frozen, validated dataclass and the
measured defaults of its two stochastic optimisers (Adam on h; averaged SGD with a decaying step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_dpmot.ot import checks
from lightning_dpmot.ot.power_cells import Source, check_source

Criterion = Literal["rms", "max"]
Optimizer = Literal["adam", "asgd"]

#: Default Adam step as a fraction of :attr:`SemiDiscreteOT.score_scale`. Adam moves each h_i by about lr per
#: step, and the Monte Carlo jitter of h (hence the error plateau) grows with lr. Sweep at M = 10 N, constant
#: lr, power-law targets (d = 256), held-out debiased relative RMS mass error after 50 / 100 / 200 steps:
#: N = 2000: 0.01 -> 0.59 / 0.24 / 0.10; 0.02 -> 0.22 / 0.12 / 0.11; 0.04 -> 0.15 / 0.15 / 0.16 (plateau).
#: N = 300:  0.01 -> 0.31 / 0.15 / 0.08; 0.02 -> 0.15 / 0.10 / 0.09; 0.04 -> 0.14 / 0.13 / 0.11.
#: Low dimension with many targets is harder: at h = 0 only the extreme points of the targets own a cell, and
#: h must first travel ~score_scale (pass a larger lr or run longer).
DEFAULT_RELATIVE_LR = 0.02

#: Default averaged-SGD base step lr0 as a fraction of :attr:`SemiDiscreteOT.score_scale` (``optimizer="asgd"``:
#: ``h_i -= lr0 t^-a (w_i - nu_i) / nu_i``, so lr0 is the h move of a cell whose mass is off by 100 %). Measured on
#: d = 8, N = 256, M = 256 (score_scale 2.83; benchmarks/semidiscrete_vs_pot.py), held-out relative RMS mass error at
#: 2^16 / 2^18 / 2^20 samples, a = 1/2, gamma = 1, lr0 (absolute) = 0.5 -> 0.071 / 0.037 / 0.017; 0.71 (the default,
#: 0.25 x 2.83) -> 0.067 / 0.036 / 0.017; 1.0 -> 0.066 / 0.035 / 0.017; 2.0 -> 0.128 / 0.085 / 0.033 (empty cells
#: early). Very low dimension with many targets needs far smaller steps (1-D, N = 100: ~0.03 score_scale): the
#: Hessian of E in relative-mass units grows like N^(2/d).
DEFAULT_ASGD_RELATIVE_LR = 0.25

#: Default exponent a of the averaged-SGD step ``lr0 / t^a``. Genans et al. (2025) and POT use 2/3; with the
#: polynomial-decay average (gamma = 1) a = 1/2 measured as good or better (same sweep: a = 2/3, lr0 = 1 ->
#: 0.079 / 0.040 / 0.017; a = 1/2 -> 0.066 / 0.035 / 0.017) and converges the digits potential in 75 steps.
DEFAULT_LR_EXPONENT = 0.5

#: Default gamma of the polynomial-decay average (``average_power``): the uniform Polyak-Ruppert mean (gamma = 0)
#: keeps the far-off early iterates for long (same sweep, a = 2/3, lr0 = 1, M = 2048: gamma = 0 -> 0.207 / 0.098 /
#: 0.047; gamma = 1 -> 0.152 / 0.048 / 0.021).
DEFAULT_AVERAGE_POWER = 1.0


@dataclass(frozen=True)
class SemiDiscreteConfig:
    """Settings of the semi-discrete OT solver (one typed config for :class:`SemiDiscreteOT` and the Lightning module).

    Every field is validated on construction (``ValueError`` naming the field: NaN, infinite, negative or
    out-of-range values never reach the solver). In YAML, a nested mapping: ``solver: {lr: 0.02, num_mc_samples: ...}``.

    Args:
        source: ``"gaussian"`` (mu = N(0, I)) or ``"uniform"`` (mu = the cube [-1/2, 1/2]^d).
        optimizer: ``"asgd"``: averaged SGD (Polyak-Ruppert) with the decaying step ``lr / t^lr_exponent`` on the
            relative gradient ``(w_i - nu_i) / nu_i``; the average is the h used for evaluation, assignment and
            checkpoints. ``"adam"``: Adam on h with a near-constant step, no averaging (the released DPM-OT code).
        lr: step size on h. Adam: the step (``None``: ``DEFAULT_RELATIVE_LR * score_scale``); ASGD: lr0 of
            ``lr0 / t^a`` (``None``: ``DEFAULT_ASGD_RELATIVE_LR * score_scale``).
        lr_exponent: ASGD step exponent a in [0, 1] (``DEFAULT_LR_EXPONENT`` = 1/2); unused by Adam.
        average_power: ASGD polynomial-decay averaging (Shamir & Zhang 2013) ``h_bar_t = h_bar_{t-1} + (gamma + 1) /
            (t + gamma) (h_t - h_bar_{t-1})``, gamma >= 0: iterate t weighs ~ t^gamma, so the early, far-off iterates
            are forgotten faster than by the uniform Polyak-Ruppert mean (gamma = 0); default 1; unused by Adam.
        num_mc_samples: Monte Carlo samples per iteration M, rounded up to whole chunks; ``None``: 10 N.
        chunk_size: samples per chunk (one RNG draw and one GEMM row block); part of the MC stream definition.
        target_chunk_size: targets per GEMM block; peak memory ~ chunk_size x target_chunk_size floats.
        betas: Adam (beta1, beta2), each in [0, 1); unused by ASGD.
        eps: Adam epsilon (> 0); unused by ASGD.
        bias_correction: Adam bias correction (the released DPM-OT code has none: set False for parity).
        patience: iterations without a new best g-norm before M doubles and lr decays (>= 0).
        max_doublings: at most this many doublings of M (>= 0).
        lr_decay: lr factor applied at each doubling, in (0, 1].
        tol: convergence tolerance of ``fit`` on the held-out mass error (see ``criterion``), > 0.
        criterion: ``"rms"``: debiased relative RMS cell-mass error <= tol; ``"max"``: max relative error <= tol. Both
            also require no empty cell.
        eval_factor: held-out evaluation uses ``eval_factor * M`` samples (>= 1).
        seed: seed of the Monte Carlo streams. ``None``: 0 in :class:`SemiDiscreteOT`; the module's ``seed`` (which
            also seeds its targets) in :class:`~lightning_dpmot.models.semidiscrete.SemiDiscreteOTModule`.
        antithetic: also use the reflections -x of every sample (free: same GEMM, scores h - <x, y>); unbiased because
            mu is symmetric; needs an even ``chunk_size``.
    """

    source: Source = "gaussian"
    optimizer: Optimizer = "asgd"
    lr: float | None = None
    lr_exponent: float = DEFAULT_LR_EXPONENT
    average_power: float = DEFAULT_AVERAGE_POWER
    num_mc_samples: int | None = None
    chunk_size: int = 8192
    target_chunk_size: int = 8192
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    bias_correction: bool = True
    patience: int = 50
    max_doublings: int = 3
    lr_decay: float = 0.8
    tol: float = 0.05
    criterion: Criterion = "rms"
    eval_factor: int = 4
    seed: int | None = None
    antithetic: bool = False

    def __post_init__(self) -> None:
        check_source(self.source)
        fields: dict[str, Any] = {
            "lr": None if self.lr is None else checks.positive("lr", self.lr),
            "lr_exponent": checks.finite("lr_exponent", self.lr_exponent),
            "average_power": checks.finite("average_power", self.average_power),
            "num_mc_samples": None
            if self.num_mc_samples is None
            else checks.integer("num_mc_samples", self.num_mc_samples, 1),
            "chunk_size": checks.integer("chunk_size", self.chunk_size, 1),
            "target_chunk_size": checks.integer("target_chunk_size", self.target_chunk_size, 1),
            "betas": self._betas(self.betas),
            "eps": checks.positive("eps", self.eps),
            "patience": checks.integer("patience", self.patience, 0),
            "max_doublings": checks.integer("max_doublings", self.max_doublings, 0),
            "lr_decay": checks.positive("lr_decay", self.lr_decay),
            "tol": checks.positive("tol", self.tol),
            "eval_factor": checks.integer("eval_factor", self.eval_factor, 1),
            "seed": None if self.seed is None else checks.integer("seed", self.seed, -(2**63)),
        }
        if self.optimizer not in ("adam", "asgd"):
            raise ValueError(f"optimizer must be 'adam' or 'asgd', got {self.optimizer!r}")
        if not 0.0 <= fields["lr_exponent"] <= 1.0:
            raise ValueError(f"lr_exponent must lie in [0, 1], got {self.lr_exponent}")
        if fields["average_power"] < 0.0:
            raise ValueError(f"average_power must be >= 0, got {self.average_power}")
        if fields["lr_decay"] > 1.0:
            raise ValueError(f"lr_decay must lie in (0, 1], got {self.lr_decay}")
        for name in ("bias_correction", "antithetic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.criterion not in ("rms", "max"):
            raise ValueError(f"criterion must be 'rms' or 'max', got {self.criterion!r}")
        if self.antithetic and fields["chunk_size"] % 2:
            raise ValueError(f"antithetic sampling needs an even chunk_size, got {self.chunk_size}")
        for name, value in fields.items():  # canonical types (YAML and old checkpoints give lists, integral floats)
            object.__setattr__(self, name, value)

    @staticmethod
    def _betas(betas: Any) -> tuple[float, float]:
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        pair = (checks.finite("betas[0]", betas[0]), checks.finite("betas[1]", betas[1]))
        if not (0.0 <= pair[0] < 1.0 and 0.0 <= pair[1] < 1.0):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)}")
        return pair

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SemiDiscreteConfig:
        """The config of a plain mapping (YAML, checkpoint hyperparameters); unknown keys raise ``ValueError``."""
        unknown = sorted(set(settings) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown semi-discrete solver setting(s) {unknown}; valid: {', '.join(cls.field_names())}"
            )
        return cls(**settings)

    def replace(self, **overrides: Any) -> SemiDiscreteConfig:
        """A copy with some settings changed (validated again); unknown names raise ``ValueError``."""
        if not overrides:
            return self
        return SemiDiscreteConfig.from_mapping({**self.as_dict(), **overrides})

    def as_dict(self) -> dict[str, Any]:
        """Plain ``{name: value}`` (YAML- and ``torch.load(weights_only=True)``-safe), ``betas`` as a list."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out
