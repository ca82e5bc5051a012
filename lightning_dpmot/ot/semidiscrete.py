"""Semi-discrete optimal transport from noise to a point cloud (DPM-OT / AE-OT, Gu-Luo-Sun-Yau).

Source mu: N(0, I_d) or the uniform centred cube [-1/2, 1/2]^d. Target nu = sum_i nu_i delta_{y_i}. For
heights h (N,), the power cells are ``W_i(h) = {x : <x, y_i> + h_i >= <x, y_j> + h_j for all j}`` with masses
``w_i(h) = mu(W_i(h))``. The energy

    E(h) = E_{x ~ mu}[max_i <x, y_i> + h_i] - sum_i nu_i h_i

is convex with gradient ``w(h) - nu``; its minimiser h* balances the cells and
``T(x) = y_{argmax_i <x,y_i>+h*_i}`` is the quadratic-cost (Brenier) OT map. :class:`SemiDiscreteOT`
estimates w(h) by Monte Carlo and runs Adam on h, re-centring h to mean zero after every step (h is defined
up to a constant).

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
by one all-reduce, so every rank takes the identical Adam step and the result does not depend on W
(bit-identical h, the counts being integers), and a run resumed from :meth:`state_dict` matches the
uninterrupted one exactly.

Precision: all GEMMs are fp32; dtype casts of the module (``.half()``, Lightning's ``*-true`` precisions) are
ignored. TF32/bf16 matmuls mis-assign samples near cell faces: on GPUs call
``torch.set_float32_matmul_precision("highest")`` (this class changes no global setting).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_dpmot.ot.power_cells import (
    EVAL_STREAM,
    SOURCE_STD,
    TRAIN_STREAM,
    Source,
    check_masses,
    check_source,
    check_targets,
    chunk_generator,
    power_argmax,
    power_topk,
    sample_source,
    score_workspace,
)
from lightning_dpmot.ot.semidiscrete_fit import fit_loop, mass_diagnostics

Criterion = Literal["rms", "max"]

#: Default Adam step as a fraction of :attr:`SemiDiscreteOT.score_scale`. Adam moves each h_i by about lr per
#: step, and the Monte Carlo jitter of h (hence the error plateau) grows with lr. Sweep at M = 10 N, constant
#: lr, power-law targets (d = 256), held-out debiased relative RMS mass error after 50 / 100 / 200 steps:
#: N = 2000: 0.01 -> 0.59 / 0.24 / 0.10; 0.02 -> 0.22 / 0.12 / 0.11; 0.04 -> 0.15 / 0.15 / 0.16 (plateau).
#: N = 300:  0.01 -> 0.31 / 0.15 / 0.08; 0.02 -> 0.15 / 0.10 / 0.09; 0.04 -> 0.14 / 0.13 / 0.11.
#: Low dimension with many targets is harder: at h = 0 only the extreme points of the targets own a cell, and
#: h must first travel ~score_scale (pass a larger lr or run longer).
DEFAULT_RELATIVE_LR = 0.02


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` in place over the ``torch.distributed`` group when one of size > 1 is running."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _check_settings(
    chunk_size: int,
    target_chunk_size: int,
    eval_factor: int,
    antithetic: bool,
    lr: float | None,
    betas: tuple[float, float],
    lr_decay: float,
    criterion: str,
    tol: float,
) -> None:
    sizes = {"chunk_size": chunk_size, "target_chunk_size": target_chunk_size, "eval_factor": eval_factor}
    for name, value in sizes.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if antithetic and chunk_size % 2:
        raise ValueError(f"antithetic sampling needs an even chunk_size, got {chunk_size}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas}")
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay}")
    if criterion not in ("rms", "max"):
        raise ValueError(f"criterion must be 'rms' or 'max', got {criterion!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")


class SemiDiscreteOT(nn.Module):
    """Semi-discrete OT potential h between a noise source and N weighted targets, fitted by Monte Carlo Adam.

    Args:
        targets: (N, d) target points y_i (stored as fp32; must be finite).
        masses: (N,) target masses nu_i, positive, summing to 1; uniform by default.
        source: ``"gaussian"`` (N(0, I)) or ``"uniform"`` (cube [-1/2, 1/2]^d).
        lr: Adam step size; default ``DEFAULT_RELATIVE_LR * score_scale``.
        num_mc_samples: Monte Carlo samples per iteration M, rounded up to whole chunks; default 10 N.
        chunk_size: samples per chunk (one RNG draw and one GEMM row block). Part of the MC stream definition.
        target_chunk_size: targets per GEMM block; peak memory ~ chunk_size x target_chunk_size floats.
        betas: Adam (beta1, beta2). eps: Adam epsilon.
        bias_correction: Adam bias correction (the released code has none: set False for parity).
        patience: iterations without a new best g-norm before M doubles and lr decays.
        max_doublings: at most this many doublings of M.
        lr_decay: lr factor applied at each doubling.
        tol: convergence tolerance of :meth:`fit` on the held-out mass error (see ``criterion``).
        criterion: ``"rms"``: debiased relative RMS cell-mass error <= tol; ``"max"``: max relative
            error <= tol. Both also require no empty cell.
        eval_factor: held-out evaluation uses ``eval_factor * M`` samples.
        seed: seed of the Monte Carlo streams.
        antithetic: also use the reflections -x of every sample (free: same GEMM, scores h - <x, y>); unbiased
            because mu is symmetric, and never noisier per GEMM than independent samples.
        all_reduce: sums a tensor over processes; default ``torch.distributed`` SUM when initialised,
            else identity.
        rank: process index override (default: ``torch.distributed`` rank, read at call time).
        world_size: process count override (default: ``torch.distributed`` world size).
    """

    targets: Tensor
    nu: Tensor
    h: Tensor
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
        source: Source = "gaussian",
        lr: float | None = None,
        num_mc_samples: int | None = None,
        chunk_size: int = 8192,
        target_chunk_size: int = 8192,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        bias_correction: bool = True,
        patience: int = 50,
        max_doublings: int = 3,
        lr_decay: float = 0.8,
        tol: float = 0.05,
        criterion: Criterion = "rms",
        eval_factor: int = 4,
        seed: int = 0,
        antithetic: bool = False,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        check_targets(targets)
        check_source(source)
        n = targets.shape[0]
        nu = torch.full((n,), 1.0 / n, dtype=torch.float64) if masses is None else check_masses(masses, n)
        _check_settings(chunk_size, target_chunk_size, eval_factor, antithetic, lr, betas, lr_decay, criterion, tol)
        self.source, self.chunk_size, self.target_chunk_size = source, int(chunk_size), int(target_chunk_size)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps, self.bias_correction = float(eps), bool(bias_correction)
        self.patience, self.max_doublings, self.lr_decay = int(patience), int(max_doublings), float(lr_decay)
        self.tol, self.criterion, self.eval_factor = float(tol), criterion, int(eval_factor)
        self.seed, self.antithetic = int(seed), bool(antithetic)
        self.all_reduce = all_reduce
        self._rank, self._world_size = rank, world_size

        y = targets.detach().to(torch.float32).contiguous()
        self.register_buffer("targets", y)
        self.register_buffer("nu", nu.to(y.device))
        zeros = torch.zeros(n, dtype=torch.float32, device=y.device)
        self.register_buffer("h", zeros.clone())
        self.register_buffer("m", zeros.clone())
        self.register_buffer("v", zeros.clone())
        m_default = 10 * n if num_mc_samples is None else int(num_mc_samples)
        if m_default < 1:
            raise ValueError(f"num_mc_samples must be positive, got {num_mc_samples}")
        scalar = dict(device=y.device)
        self.register_buffer("iteration", torch.tensor(0, dtype=torch.int64, **scalar))
        self.register_buffer("num_mc_samples", torch.tensor(self._round_to_chunks(m_default), **scalar))
        lr_value = float(lr) if lr is not None else DEFAULT_RELATIVE_LR * (self.score_scale or 1.0)
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
        y_bar = self.nu.to(torch.float32) @ self.targets  # (d,)
        spread = 0.0
        for start in range(0, self.num_targets, self.target_chunk_size):  # no (N, d) temporary
            stop = start + self.target_chunk_size
            sq = (self.targets[start:stop] - y_bar).square().sum(dim=1, dtype=torch.float64)
            spread += float(self.nu[start:stop] @ sq)
        return SOURCE_STD[self.source] * math.sqrt(spread)

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
        return math.ceil(num_samples / self.chunk_size) * self.chunk_size

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
        """Settings defining the Monte Carlo stream; checked on load so a resume cannot silently diverge."""
        return {
            "source": self.source,
            "chunk_size": self.chunk_size,
            "seed": self.seed,
            "antithetic": self.antithetic,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint whose Monte Carlo stream differs from this solver's."""
        mine = self.get_extra_state()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            msg = ", ".join(f"{k}: checkpoint {a!r} vs solver {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint was written with different Monte Carlo settings ({msg})")

    def extra_repr(self) -> str:
        return (
            f"N={self.num_targets}, d={self.dim}, source={self.source}, M={int(self.num_mc_samples)}, "
            f"chunk_size={self.chunk_size}, target_chunk_size={self.target_chunk_size}, seed={self.seed}"
        )

    # ------------------------------------------------------------------ Monte Carlo cell masses

    def _mc_statistics(self, num_samples: int, iteration: int, stream: int) -> tuple[Tensor, float, float]:
        """Cell-hit histogram of the rounded-up ``num_samples`` of (iteration, stream), summed over ranks.

        Returns:
            ``(counts, value_sum, total)``: counts (N,) float64 (integer valued), the sum of
            ``max_i <x, y_i> + h_i`` over the samples, and the number of samples.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        n, device = self.num_targets, self.targets.device
        num_chunks = math.ceil(num_samples / self.chunk_size)
        draw = self.chunk_size // 2 if self.antithetic else self.chunk_size
        acc = torch.zeros(n + 2, dtype=torch.float64, device=device)
        x = torch.empty(draw, self.dim, device=device)  # reused: memory does not grow with the chunk count
        ws = score_workspace(draw, n, self.target_chunk_size, self.antithetic, device)
        for c in range(self.rank, num_chunks, self.world_size):
            gen = chunk_generator(self.seed, stream, iteration, c, device=device)
            sample_source(self.source, draw, self.dim, gen, out=x)
            val, idx = power_argmax(x, self.targets, self.h, self.target_chunk_size, self.antithetic, ws)
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
        m = self.eval_factor * int(self.num_mc_samples) if num_samples is None else int(num_samples)
        counts, value_sum, total = self._mc_statistics(m, int(self.iteration), EVAL_STREAM)
        diag = mass_diagnostics(counts, total, self.nu)
        diag["energy"] = value_sum / total - float(self.nu @ self.h.to(torch.float64))
        diag["num_samples"] = total
        return diag

    def is_converged(self, diagnostics: dict[str, float], tol: float | None = None) -> bool:
        """The stopping rule on (held-out) diagnostics: no empty cell and the ``criterion`` error <= tol."""
        tol = self.tol if tol is None else tol
        key = "rel_rms_err" if self.criterion == "rms" else "max_rel_err"
        return diagnostics["empty_cells"] == 0 and diagnostics[key] <= tol

    # ------------------------------------------------------------------ optimisation

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """One iteration: MC masses, gradient w - nu, Adam on h, re-centring, stall/doubling bookkeeping.

        Returns:
            Diagnostics of the h *before* the update (see :func:`semidiscrete_fit.mass_diagnostics`) plus
            ``energy`` (MC estimate of E(h)), ``num_mc_samples`` and ``lr`` used, and ``iteration`` (completed
            steps after this one).
        """
        t, m_samples, lr = int(self.iteration), int(self.num_mc_samples), float(self.lr)
        counts, value_sum, total = self._mc_statistics(m_samples, t, TRAIN_STREAM)
        diag = mass_diagnostics(counts, total, self.nu)
        diag["energy"] = value_sum / total - float(self.nu @ self.h.to(torch.float64))
        grad = (counts / total - self.nu).to(torch.float32)
        self._adam_update(grad, lr, t + 1)
        self.iteration += 1
        self._schedule(diag["g_norm"])
        diag.update(num_mc_samples=float(m_samples), lr=lr, iteration=float(t + 1))
        return diag

    def _adam_update(self, grad: Tensor, lr: float, t: int) -> None:
        """Adam on h (optionally without bias correction, as the released code), then ``h -= mean(h)``."""
        beta1, beta2 = self.betas
        self.m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        self.v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        if self.bias_correction:
            denom = (self.v / (1.0 - beta2**t)).sqrt_().add_(self.eps)
            self.h.addcdiv_(self.m, denom, value=-lr / (1.0 - beta1**t))
        else:
            self.h.addcdiv_(self.m, self.v.sqrt().add_(self.eps), value=-lr)
        self.h.sub_(self.h.mean())

    def _schedule(self, g_norm: float) -> None:
        """Best g-norm tracking; after ``patience`` stalled steps, double M and decay lr (max_doublings)."""
        if g_norm < float(self.best_g_norm):
            self.best_g_norm.fill_(g_norm)
            self.stall.zero_()
            return
        self.stall += 1
        if int(self.stall) > self.patience and int(self.doublings) < self.max_doublings:
            self.num_mc_samples.mul_(2)
            self.lr.mul_(self.lr_decay)
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

        Stopping rule: every ``eval_every`` steps, if the step's own (debiased) error already passes, a
        held-out :meth:`evaluate` with ``eval_num_samples`` (default ``eval_factor * M``) decides via
        :meth:`is_converged`. The raw gradient norm is useless here: it has a Monte Carlo floor of about
        1/sqrt(M). With ``criterion="max"``, a tol below the evaluation's noise floor raises ``ValueError``.

        Returns:
            ``{"converged": bool, "iterations": steps run, "last_step": dict, "evaluation": held-out dict,
            "history": list of step dicts}``.
        """
        tol = self.tol if tol is None else float(tol)
        return fit_loop(self, max_iterations, tol, eval_every, eval_num_samples, progress and self.rank == 0)

    # ------------------------------------------------------------------ the map

    def _check_noise(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"noise x must be a 2-D tensor (B, d), got shape {tuple(getattr(x, 'shape', ()))}")
        if x.shape[1] != self.dim:
            raise ValueError(f"noise x has dimension {x.shape[1]} but the targets have dimension {self.dim}")
        return x.to(device=self.targets.device, dtype=torch.float32)

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """Power cell per noise sample: x (B, d) -> (B,) int64 ``argmax_i <x, y_i> + h_i``."""
        x = self._check_noise(x)
        out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
        ws = score_workspace(
            min(self.chunk_size, x.shape[0]), self.num_targets, self.target_chunk_size, False, x.device
        )
        for start in range(0, x.shape[0], self.chunk_size):
            stop = start + self.chunk_size
            out[start:stop] = power_argmax(x[start:stop], self.targets, self.h, self.target_chunk_size, False, ws)[1]
        return out

    @torch.no_grad()
    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The k best cells per sample: x (B, d) -> ``(scores, indices)``, each (B, k), best first."""
        x = self._check_noise(x)
        if not 1 <= k <= self.num_targets:
            raise ValueError(f"k must be in [1, {self.num_targets}], got {k}")
        parts = [
            power_topk(x[s : s + self.chunk_size], self.targets, self.h, k, self.target_chunk_size)
            for s in range(0, x.shape[0], self.chunk_size)
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
