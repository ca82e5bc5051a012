"""Semi-discrete optimal transport from noise to a point cloud (DPM-OT / AE-OT, Gu-Luo-Sun-Yau).

Source mu: N(0, I_d) or the uniform centred cube [-1/2, 1/2]^d. Target nu = sum_i nu_i delta_{y_i}. For
heights h (N,), the power cells are ``W_i(h) = {x : <x, y_i> + h_i >= <x, y_j> + h_j for all j}`` with masses
``w_i(h) = mu(W_i(h))``. The energy

    E(h) = E_{x ~ mu}[max_i <x, y_i> + h_i] - sum_i nu_i h_i

is convex with gradient ``w(h) - nu``; its minimiser h* balances the cells and
``T(x) = y_{argmax_i <x,y_i>+h*_i}`` is the quadratic-cost (Brenier) OT map. :class:`SemiDiscreteOT`
estimates w(h) by Monte Carlo and runs, by default, averaged SGD on h (Genans, Godichon-Baggioni, Vialard &
Wintenberger 2025, as POT's ``solve_semidiscrete``): iterates ``h_t = h_{t-1} - lr0 t^-a (w_hat_i - nu_i) / nu_i``
and their polynomial-decay average ``h_bar`` (Shamir & Zhang 2013), which is the h used for evaluation, assignment and
checkpoints; or Adam with a near-constant step (``optimizer="adam"``, the released DPM-OT code), whose Monte Carlo
jitter of h sets an error floor (measured on d = 8, N = 256, M = 256: Adam's held-out relative RMS mass error stalls
at 0.083, averaged SGD reaches 0.017 after 1 M samples, as POT does: benchmarks/README.md). Every step re-centres h
to mean zero (h is defined up to a constant).

Centring: the released DPM-OT code samples x uniform on [0, 1]^d. With x' = x - 1/2 the same cells are
obtained from ``h'_i = h_i + 1/2 sum_k y_ik``, and the centred problem is far better conditioned (no d-scaled
learning rate, no warm start): we always solve the centred one; :meth:`SemiDiscreteOT.unit_cube_potential`
converts back. Translating all targets by a vector changes every score by the same amount, so cells and h do
not change.

Relation to POT's ``ot.semidiscrete`` (squared Euclidean cost, potential g): POT assigns x to
``argmin_j ||x - y_j||^2 - g_j = argmax_j <x, y_j> + (g_j - ||y_j||^2) / 2``, so ``h = (g - ||y||^2) / 2`` up
to a constant.

Monte Carlo and distribution: iteration t draws ``M`` samples in chunks of ``chunk_size``; chunk c comes from
a generator seeded with ``mix_seed(seed, stream, t, c)`` (:func:`power_cells.chunk_generator`). Rank r of W
processes chunks r, r + W, ...; the length-N histogram, the energy partial sum and the sample count are summed
by one all-reduce, so every rank takes the identical step and the result does not depend on W
(bit-identical h, the counts being integers), and a run resumed from :meth:`state_dict` matches the
uninterrupted one exactly.

Precision: all GEMMs are fp32; dtype casts of the module (``.half()``, Lightning's ``*-true`` precisions) are
ignored. TF32/bf16 matmuls mis-assign samples near cell faces: on GPUs call
``torch.set_float32_matmul_precision("highest")`` (this class changes no global setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_dpmot.ot.costs import ldexp
from lightning_dpmot.ot.power_cells import (
    EVAL_STREAM,
    SOURCE_STD,
    TRAIN_STREAM,
    check_masses,
    check_targets,
    chunk_generator,
    power_argmax,
    power_topk,
    sample_source,
    score_workspace,
)
from lightning_dpmot.ot.semidiscrete_config import (
    DEFAULT_ASGD_RELATIVE_LR,
    DEFAULT_AVERAGE_POWER,
    DEFAULT_LR_EXPONENT,
    DEFAULT_RELATIVE_LR,
    Criterion,
    Optimizer,
    SemiDiscreteConfig,
)
from lightning_dpmot.ot.semidiscrete_fit import fit_loop, mass_diagnostics
from lightning_dpmot.utils.distributed import all_reduce_sum

#: Targets whose largest entry exceeds 2^_SCORE_SCALE_EXPONENT (or is below its inverse) are rescaled by a power of
#: two inside :attr:`SemiDiscreteOT.score_scale`, whose fp32 squares would overflow (1e20-scale targets) or underflow.
_SCORE_SCALE_EXPONENT = 60

#: Admissible range of the bound ``max_i ||y_i|| * (sigma_x sqrt(d) + 10)`` on the fp32 scores ``<x, y_i>``: far below
#: the fp32 maximum (3.4e38), leaving room for h and the tails of the source, and far above the subnormal range
#: (< 1.2e-38), where score differences lose their precision (measured: cells drift from ~1e-38 on).
MAX_SCORE_BOUND = 2.0**100
MIN_SCORE_BOUND = 2.0**-100

__all__ = [
    "DEFAULT_ASGD_RELATIVE_LR",
    "DEFAULT_AVERAGE_POWER",
    "DEFAULT_LR_EXPONENT",
    "DEFAULT_RELATIVE_LR",
    "Criterion",
    "MAX_SCORE_BOUND",
    "MIN_SCORE_BOUND",
    "Optimizer",
    "SemiDiscreteConfig",
    "SemiDiscreteOT",
]


def _check_score_range(targets: Tensor, source: str) -> None:
    """``ValueError`` if the fp32 scores ``<x, y_i>`` of typical source samples could overflow or turn subnormal.

    ``|<x, y_i>| <= ||x|| ||y_i||``, ``||y_i|| <= sqrt(d) max |y_ik|`` and ``||x||`` stays below
    ``sigma_x sqrt(d) + 10`` for all practical samples; the bound must lie in
    [:data:`MIN_SCORE_BOUND`, :data:`MAX_SCORE_BOUND`] = [2^-100, 2^100] (or be 0: all targets at the origin). The
    power cells are invariant to scaling the targets and h together, so rescaling the targets loses nothing.
    """
    root_d = math.sqrt(targets.shape[1])
    max_norm = float(targets.abs().max()) * root_d  # >= max_i ||y_i||, with no (N, d) temporary
    bound = max_norm * (SOURCE_STD[source] * root_d + 10.0)
    if bound > MAX_SCORE_BOUND or 0.0 < bound < MIN_SCORE_BOUND:
        size = "large" if bound > 1.0 else "small"
        raise ValueError(
            f"targets are too {size} for fp32 scores: ||y_i|| up to {max_norm:.3g} in d = {targets.shape[1]} gives "
            f"scores <x, y_i> of ~{bound:.3g} (need between {MIN_SCORE_BOUND:.3g} and {MAX_SCORE_BOUND:.3g}); rescale "
            "the targets (the power cells of a * y with heights a * h are those of y with h)"
        )


class SemiDiscreteOT(nn.Module):
    """Semi-discrete OT potential h between a noise source and N weighted targets, fitted by Monte Carlo averaged SGD
    (or Adam).

    Construction: ``SemiDiscreteOT(targets, config=SemiDiscreteConfig(...))``, or with keyword overrides of the
    config's fields, ``SemiDiscreteOT(targets, lr=0.05, num_mc_samples=8192)`` (applied on top of ``config`` or the
    defaults). The resolved settings are :attr:`config` (``seed=None`` becomes 0).

    Args:
        targets: (N, d) target points y_i (stored as fp32; must be finite, and small enough that the fp32 scores
            ``<x, y_i>`` cannot overflow: see :data:`MAX_SCORE_BOUND`).
        masses: (N,) target masses nu_i, positive, summing to 1; uniform by default.
        config: the solver settings (:class:`SemiDiscreteConfig`); default ``SemiDiscreteConfig()``.
        all_reduce: sums a tensor over processes; default ``torch.distributed`` SUM when initialised,
            else identity.
        rank: process index override (default: ``torch.distributed`` rank, read at call time).
        world_size: process count override (default: ``torch.distributed`` world size).
        **overrides: fields of :class:`SemiDiscreteConfig` replacing those of ``config``.

    Raises:
        ValueError: bad targets or masses, an unknown or invalid setting (named), or targets too large for fp32 scores.
    """

    targets: Tensor
    nu: Tensor
    h: Tensor
    h_iterate: Tensor
    m: Tensor
    v: Tensor
    iteration: Tensor
    num_mc_samples: Tensor
    lr: Tensor
    best_g_norm: Tensor
    stall: Tensor
    doublings: Tensor

    def __init__(
        self,
        targets: Tensor,
        masses: Tensor | None = None,
        *,
        config: SemiDiscreteConfig | None = None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if isinstance(masses, SemiDiscreteConfig):
            raise ValueError("the second positional argument is the target masses: pass the settings as config=...")
        config = (config or SemiDiscreteConfig()).replace(**overrides)
        self.config = config if config.seed is not None else config.replace(seed=0)
        check_targets(targets)
        n = targets.shape[0]
        nu = torch.full((n,), 1.0 / n, dtype=torch.float64) if masses is None else check_masses(masses, n)
        self.all_reduce = all_reduce
        self._rank, self._world_size = rank, world_size

        y = targets.detach().to(torch.float32).contiguous()
        _check_score_range(y, self.config.source)
        self.register_buffer("targets", y)
        self.register_buffer("nu", nu.to(y.device))
        zeros = torch.zeros(n, dtype=torch.float32, device=y.device)
        self.register_buffer("h", zeros.clone())  # the potential used everywhere (ASGD: the Polyak-Ruppert average)
        self.register_buffer("h_iterate", zeros.clone())  # the iterate whose cells give the gradient (Adam: = h)
        self.register_buffer("m", zeros.clone())
        self.register_buffer("v", zeros.clone())
        m_default = 10 * n if self.config.num_mc_samples is None else self.config.num_mc_samples
        scalar = dict(device=y.device)
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.int64, **scalar))
        self.register_buffer("num_mc_samples", torch.tensor(self._round_to_chunks(m_default), **scalar))
        lr = self.config.lr
        relative = DEFAULT_ASGD_RELATIVE_LR if self.config.optimizer == "asgd" else DEFAULT_RELATIVE_LR
        lr_value = lr if lr is not None else relative * (self.score_scale or 1.0)
        self.register_buffer("lr", torch.tensor(lr_value, dtype=torch.float64, **scalar))
        self.register_buffer("best_g_norm", torch.tensor(math.inf, dtype=torch.float64, **scalar))
        self.register_buffer("stall", torch.tensor(0, dtype=torch.int64, **scalar))
        self.register_buffer("doublings", torch.tensor(0, dtype=torch.int64, **scalar))

    # ------------------------------------------------------------------ properties and module plumbing

    @property
    def num_targets(self) -> int:
        """N."""
        return self.targets.shape[0]

    @property
    def dim(self) -> int:
        """d."""
        return self.targets.shape[1]

    @property
    def score_scale(self) -> float:
        """Natural scale of h: ``sigma_x * sqrt(sum_i nu_i ||y_i - y_bar||^2)``, the spread of <x, y_i>.

        sigma_x is the per-coordinate standard deviation of the source (1, or 1/sqrt(12) for the cube); y_bar
        is the nu-weighted mean. Invariant to translating the targets, like the cells.
        """
        # extreme magnitudes: an exact power-of-two rescaling keeps the fp32 squares finite (1e20-scale targets
        # used to give inf, hence an inf lr and a NaN h); ordinary targets are used as they are (bit-identical)
        peak = float(self.targets.abs().max())
        exponent = math.frexp(peak)[1] if peak > 0.0 else 0
        shift = -exponent if abs(exponent) > _SCORE_SCALE_EXPONENT else 0
        targets = self.targets if shift == 0 else ldexp(self.targets, shift)
        y_bar = self.nu.to(torch.float32) @ targets  # (d,)
        spread = 0.0
        chunk = self.config.target_chunk_size
        for start in range(0, self.num_targets, chunk):  # no (N, d) temporary
            sq = (targets[start : start + chunk] - y_bar).square().sum(dim=1, dtype=torch.float64)
            spread += float(self.nu[start : start + chunk] @ sq)
        return math.ldexp(SOURCE_STD[self.config.source] * math.sqrt(spread), -shift)

    @property
    def rank(self) -> int:
        """This process's index among the processes sharing the Monte Carlo chunks."""
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def world_size(self) -> int:
        """Number of processes sharing the Monte Carlo chunks."""
        if self._world_size is not None:
            return self._world_size
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def _round_to_chunks(self, num_samples: int) -> int:
        return math.ceil(num_samples / self.config.chunk_size) * self.config.chunk_size

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> SemiDiscreteOT:
        """Move like any module, but keep every buffer's dtype (the solver always computes in fp32/fp64)."""
        dtypes = {name: buf.dtype for name, buf in self.named_buffers(recurse=False)}
        super()._apply(fn, recurse)
        for name, dtype in dtypes.items():
            buf = getattr(self, name)
            if buf.dtype != dtype:
                setattr(self, name, buf.to(dtype))
        return self

    def get_extra_state(self) -> dict[str, Any]:
        """Settings defining the Monte Carlo stream and the meaning of the state (the optimiser); checked on load so
        a resume cannot silently diverge."""
        return {
            "source": self.config.source,
            "chunk_size": self.config.chunk_size,
            "seed": self.config.seed,
            "antithetic": self.config.antithetic,
            "optimizer": self.config.optimizer,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose Monte Carlo stream or optimiser differs from this solver's (states written
        before ``optimizer`` existed are Adam's)."""
        state = {"optimizer": "adam", **state}
        mine = self.get_extra_state()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            msg = ", ".join(f"{k}: checkpoint {a!r} vs solver {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint was written with different Monte Carlo or optimiser settings ({msg})")

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """States written before ASGD existed have no ``h_iterate``: it is h (Adam's iterate)."""
        if prefix + "h" in state_dict and prefix + "h_iterate" not in state_dict:
            state_dict[prefix + "h_iterate"] = state_dict[prefix + "h"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"N={self.num_targets}, d={self.dim}, source={c.source}, M={int(self.num_mc_samples)}, "
            f"chunk_size={c.chunk_size}, target_chunk_size={c.target_chunk_size}, seed={c.seed}"
        )

    # ------------------------------------------------------------------ Monte Carlo cell masses

    def _mc_statistics(
        self, num_samples: int, iteration: int, stream: int, h: Tensor | None = None
    ) -> tuple[Tensor, float, float]:
        """Cell-hit histogram of the rounded-up ``num_samples`` of (iteration, stream), summed over ranks.

        ``h`` (N,): the heights of the cells (default :attr:`h`; ASGD's step passes its iterate).

        Returns:
            ``(counts, value_sum, total)``: counts (N,) float64 (integer valued), the sum of
            ``max_i <x, y_i> + h_i`` over the samples, and the number of samples.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        n, device = self.num_targets, self.targets.device
        h = self.h if h is None else h
        num_chunks = math.ceil(num_samples / self.config.chunk_size)
        draw = self.config.chunk_size // 2 if self.config.antithetic else self.config.chunk_size
        acc = torch.zeros(n + 2, dtype=torch.float64, device=device)
        x = torch.empty(draw, self.dim, device=device)  # reused: memory does not grow with the chunk count
        ws = score_workspace(draw, n, self.config.target_chunk_size, self.config.antithetic, device)
        for c in range(self.rank, num_chunks, self.world_size):
            gen = chunk_generator(self.config.seed, stream, iteration, c, device=device)
            sample_source(self.config.source, draw, self.dim, gen, out=x)
            val, idx = power_argmax(x, self.targets, h, self.config.target_chunk_size, self.config.antithetic, ws)
            acc[:n] += torch.bincount(idx, minlength=n)
            acc[n] += val.sum(dtype=torch.float64)
            acc[n + 1] += idx.numel()
        acc = (self.all_reduce or all_reduce_sum)(acc)
        value_sum, total = acc[n:].tolist()
        return acc[:n], value_sum, total

    @torch.no_grad()
    def cell_masses(self, num_samples: int | None = None, iteration: int | None = None) -> Tensor:
        """Monte Carlo estimate of w(h), (N,) float64, from the optimisation stream.

        Args:
            num_samples: samples (rounded up to whole chunks); default the current M.
            iteration: whose samples to use; default the current one (the samples :meth:`step` uses).
        """
        m = int(self.num_mc_samples) if num_samples is None else int(num_samples)
        t = int(self.iteration) if iteration is None else int(iteration)
        counts, _, total = self._mc_statistics(m, t, TRAIN_STREAM)
        return counts / total

    @torch.no_grad()
    def evaluate(self, num_samples: int | None = None) -> dict[str, float]:
        """Held-out diagnostics of h from an independent stream (default ``eval_factor * M`` samples).

        Returns the keys of :func:`semidiscrete_fit.mass_diagnostics` plus ``energy`` and ``num_samples``.
        """
        m = self.config.eval_factor * int(self.num_mc_samples) if num_samples is None else int(num_samples)
        counts, value_sum, total = self._mc_statistics(m, int(self.iteration), EVAL_STREAM)
        diag = mass_diagnostics(counts, total, self.nu)
        diag["energy"] = value_sum / total - float(self.nu @ self.h.to(torch.float64))
        diag["num_samples"] = total
        return diag

    def is_converged(self, diagnostics: dict[str, float], tol: float | None = None) -> bool:
        """The stopping rule on (held-out) diagnostics: no empty cell and the ``criterion`` error <= tol."""
        tol = self.config.tol if tol is None else tol
        key = "rel_rms_err" if self.config.criterion == "rms" else "max_rel_err"
        return diagnostics["empty_cells"] == 0 and diagnostics[key] <= tol

    def step_passes(self, diagnostics: dict[str, float], tol: float | None = None) -> bool:
        """The cheap gate of a :meth:`step`'s own diagnostics before a held-out evaluation decides convergence.

        Adam: the step's (pre-update) debiased error passes ``tol`` with no empty cell (its h is the one evaluated).
        ASGD: always True: the step measured the iterate, not the average that is evaluated.
        """
        if self.config.optimizer == "asgd":
            return True
        tol = self.config.tol if tol is None else tol
        return diagnostics["empty_cells"] == 0 and diagnostics["rel_rms_err"] <= tol

    # ------------------------------------------------------------------ optimisation

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """One iteration: MC masses, gradient w - nu, an Adam or averaged-SGD update, re-centring, stall/doubling
        bookkeeping.

        Returns:
            Diagnostics of the point whose cells gave the gradient, *before* the update (Adam: h; ASGD: the
            iterate :attr:`h_iterate`, not the average; see :func:`semidiscrete_fit.mass_diagnostics`) plus
            ``energy`` (MC estimate of E there), ``num_mc_samples`` and ``lr`` used (ASGD: ``lr0 / t^a``), and
            ``iteration`` (completed steps after this one).
        """
        t, m_samples, lr = int(self.iteration), int(self.num_mc_samples), float(self.lr)
        asgd = self.config.optimizer == "asgd"
        point = self.h_iterate if asgd else self.h
        counts, value_sum, total = self._mc_statistics(m_samples, t, TRAIN_STREAM, point)
        diag = mass_diagnostics(counts, total, self.nu)
        diag["energy"] = value_sum / total - float(self.nu @ point.to(torch.float64))
        grad = counts / total - self.nu  # (N,) float64
        if asgd:
            lr = lr / (t + 1) ** self.config.lr_exponent
            self._asgd_update(grad, lr, t + 1)
        else:
            self._adam_update(grad.to(torch.float32), lr, t + 1)
        self.iteration += 1
        self._check_potential()
        self._schedule(diag["g_norm"])
        diag.update(num_mc_samples=float(m_samples), lr=lr, iteration=float(t + 1))
        return diag

    def _adam_update(self, grad: Tensor, lr: float, t: int) -> None:
        """Adam on h (optionally without bias correction, as the released code), then ``h -= mean(h)``."""
        beta1, beta2 = self.config.betas
        self.m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if self.config.bias_correction:
            denom = (self.v / (1.0 - beta2**t)).sqrt_().add_(self.config.eps)
            self.h.addcdiv_(self.m, denom, value=-lr / (1.0 - beta1**t))
        else:
            self.h.addcdiv_(self.m, self.v.sqrt().add_(self.config.eps), value=-lr)
        self.h.sub_(self.h.mean())
        self.h_iterate.copy_(self.h)  # Adam's iterate is h (as in states written before ASGD existed)

    def _asgd_update(self, grad: Tensor, lr: float, t: int) -> None:
        """Averaged SGD: ``h_t = h_{t-1} - lr_t (w - nu) / nu``, centred; h = the (polynomial-decay) average of
        h_1 .. h_t: ``h += (gamma + 1) / (t + gamma) (h_t - h)`` (gamma = 0: the running mean).

        Args:
            grad: (N,) float64 ``w_hat(h_{t-1}) - nu``.
            lr: this step's size ``lr0 / t^a``.
            t: the 1-based step number (the number of iterates averaged).
        """
        self.h_iterate.sub_((grad / self.nu).to(torch.float32), alpha=lr)
        self.h_iterate.sub_(self.h_iterate.mean())
        gamma = self.config.average_power
        self.h.add_(self.h_iterate - self.h, alpha=(gamma + 1.0) / (t + gamma))
        self.h.sub_(self.h.mean())

    def _schedule(self, g_norm: float) -> None:
        """Best g-norm tracking; after ``patience`` stalled steps, double M and decay lr (max_doublings)."""
        if g_norm < float(self.best_g_norm):
            self.best_g_norm.fill_(g_norm)
            self.stall.zero_()
            return
        self.stall += 1
        if int(self.stall) > self.config.patience and int(self.doublings) < self.config.max_doublings:
            self.num_mc_samples.mul_(2)
            self.lr.mul_(self.config.lr_decay)
            self.best_g_norm.fill_(math.inf)
            self.stall.zero_()
            self.doublings += 1

    def fit(
        self,
        max_iterations: int,
        tol: float | None = None,
        eval_every: int = 50,
        eval_num_samples: int | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Run :meth:`step` until converged or ``max_iterations`` more steps.

        Stopping rule: every ``eval_every`` steps, if :meth:`step_passes` (Adam: the step's own debiased error
        already passes; ASGD: always), a held-out :meth:`evaluate` of h with ``eval_num_samples`` (default
        ``eval_factor * M``) decides via :meth:`is_converged`. The raw gradient norm is useless here: it has a Monte
        Carlo floor of about 1/sqrt(M). With ``criterion="max"``, a tol below the evaluation's noise floor raises
        ``ValueError``.

        Returns:
            ``{"converged": bool, "iterations": steps run, "last_step": dict, "evaluation": held-out dict,
            "history": list of step dicts}``.
        """
        tol = self.config.tol if tol is None else float(tol)
        return fit_loop(self, max_iterations, tol, eval_every, eval_num_samples, progress and self.rank == 0)

    # ------------------------------------------------------------------ the map

    def _check_noise(self, x: Tensor) -> Tensor:
        """x as (B, d) fp32 on the targets' device; ``ValueError`` for a wrong shape or non-finite entries (a NaN
        sample has no power cell: argmax over NaN scores used to return cell 0 and a real target)."""
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"noise x must be a 2-D tensor (B, d), got shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != self.dim:
            raise ValueError(f"noise x has dimension {x.shape[1]} but the targets have dimension {self.dim}")
        x = x.to(device=self.targets.device, dtype=torch.float32)
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        if bad:
            raise ValueError(f"noise x is non-finite: {bad} of {x.shape[0]} samples contain NaN or infinite values")
        self._check_potential()
        return x

    def _check_potential(self) -> None:
        """``RuntimeError`` if h has non-finite entries (every score would be NaN and every cell 0)."""
        bad = int((~torch.isfinite(self.h)).sum())
        if bad:
            raise RuntimeError(
                f"the potential h has {bad} non-finite entries after {int(self.iteration)} iterations: the solver "
                "diverged (lower lr) or was loaded from a corrupt state"
            )

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """Power cell per noise sample: x (B, d) -> (B,) int64 ``argmax_i <x, y_i> + h_i``."""
        x = self._check_noise(x)
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        ws = score_workspace(
            min(self.config.chunk_size, x.shape[0]), self.num_targets, self.config.target_chunk_size, False, x.device
        )
        for start in range(0, x.shape[0], self.config.chunk_size):
            stop = start + self.config.chunk_size
            out[start:stop] = power_argmax(
                x[start:stop], self.targets, self.h, self.config.target_chunk_size, False, ws
            )[1]
        return out

    @torch.no_grad()
    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k best cells per sample: x (B, d) -> ``(scores, indices)``, each (B, k), best first."""
        x = self._check_noise(x)
        if not 1 <= k <= self.num_targets:
            raise ValueError(f"k must be in [1, {self.num_targets}], got {k}")
        parts = [
            power_topk(x[s : s + self.config.chunk_size], self.targets, self.h, k, self.config.target_chunk_size)
            for s in range(0, x.shape[0], self.config.chunk_size)
        ]
        if not parts:
            return x.new_empty(0, k), torch.empty(0, k, dtype=torch.int64, device=x.device)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Hard OT map: x (B, d) -> (B, d) ``targets[assign(x)]`` (the stored target itself)."""
        return self.targets[self.assign(x)]

    def unit_cube_potential(self) -> Tensor:
        """h for the released code's uncentred source U[0, 1]^d: ``h_i - 1/2 sum_k y_ik``, re-centred, (N,).

        Only meaningful with ``source="uniform"``: x in [0, 1]^d with this potential falls in the same cell as
        x - 1/2 with h.
        """
        h = self.h.to(torch.float64) - 0.5 * self.targets.to(torch.float64).sum(dim=1)
        return (h - h.mean()).to(torch.float32)
