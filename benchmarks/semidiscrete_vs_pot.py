"""Semi-discrete OT side by side: ``SemiDiscreteOT`` (Adam, averaged SGD) against POT's ``solve_semidiscrete``.

Same targets for all solvers, held-out error measured by one evaluator on the same samples (common random numbers):

* ``d8``: N(0, I_8) source, N = 256 targets drawn from N(0, I_8) (seed 0), uniform masses. Held-out error: the
  debiased relative RMS cell-mass error (``mass_diagnostics``) of ``--eval-samples`` samples of an independent
  stream; its Monte Carlo floor (the raw error of a perfect h) is printed beside it.
* ``1d``: N(0, 1) to the N = 100 points ``y_i = Phi^-1((i + 1/2) / N)``, uniform masses. The exact heights follow
  from the cell boundaries at the quantiles ``Phi^-1(i / N)``; the error is computed by quadrature on ``2^20``
  probability-midpoint quantiles (mass resolution 1e-6, no Monte Carlo), and ``max|h - h*|`` is printed too.

Ours: M = 256 samples per iteration (doubling on stalls, as the solver's schedule does; every sample is
counted), default settings (Adam: lr 0.02 score_scale; ASGD: lr0 0.25 score_scale, a = 1/2, gamma = 1) except the
1-D ASGD lr0 = 0.03 (``--asgd-lr-1d``). For each solver: the error vs cumulative source samples and vs wall time
(single thread, the solver's own time; the evaluation is not timed). POT's solver has no callback, so it is re-run
from scratch for every sample budget (``max_iter = budget / batch_size``), with its defaults (batch 32,
``lr0 = sqrt(N * batch)``, step ``lr0 / t^(2/3)``, Polyak averaging, DRAG entropic annealing) unless overridden.
POT's potential g (``argmin_j ||x - y_j||^2 - g_j``) is evaluated as ``h = (g - ||y||^2) / 2``.

Then the ratios: our error / POT's at each shared budget, and the samples and time each solver needed to reach
POT's final error (log-log interpolation between checkpoints; ``-`` = not reached).

Usage::

    python benchmarks/semidiscrete_vs_pot.py                       # both cases, ~ a few minutes on one core
    python benchmarks/semidiscrete_vs_pot.py --case d8 --budgets 8 --eval-samples 4194304
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from lightning_dpmot.ot.power_cells import power_argmax
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_fit import mass_diagnostics


@dataclass
class Curve:
    """Error of one solver at increasing sample budgets."""

    name: str
    samples: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)


@dataclass
class Case:
    """Targets (N, d), uniform masses, and a held-out error of a potential h (N,)."""

    name: str
    targets: Tensor
    error: Callable[[Tensor], tuple[float, int, str]]
    floor: float


def line_exact_h(y: np.ndarray) -> np.ndarray:
    """Exact centred heights of N(0, 1) to sorted equal-mass points y (N,): the boundary between cells i and i + 1
    is t_i = Phi^-1((i + 1) / N), where ``t_i y_i + h_i = t_i y_{i+1} + h_{i+1}``."""
    n = y.shape[0]
    t = norm.ppf(np.arange(1, n) / n)
    h = np.concatenate([[0.0], np.cumsum(-t * np.diff(y))])
    return h - h.mean()


def make_case(name: str, eval_samples: int) -> Case:
    if name == "1d":
        n = 100
        y = norm.ppf((np.arange(n) + 0.5) / n)
        targets = torch.from_numpy(y).float()[:, None]
        h_star = torch.from_numpy(line_exact_h(y))
        grid = torch.from_numpy(norm.ppf((np.arange(2**20) + 0.5) / 2**20)).float()[:, None]
        nu = torch.full((n,), 1.0 / n, dtype=torch.float64)

        def line_error(h: Tensor) -> tuple[float, int, str]:
            idx = power_argmax(grid, targets, h.float(), 8192)[1]
            w = torch.bincount(idx, minlength=n).double() / grid.shape[0]
            rel = ((w - nu) / nu).square().mean().sqrt().item()
            dh = (h.double() - h.double().mean() - h_star).abs().max().item()
            return rel, int((w == 0).sum()), f"max|h-h*|={dh:.2e}"

        return Case(name, targets, line_error, 0.0)
    gen = torch.Generator().manual_seed(0)
    targets = torch.randn(256, 8, generator=gen)
    evaluator = SemiDiscreteOT(targets, seed=987654321, chunk_size=8192)

    def mc_error(h: Tensor) -> tuple[float, int, str]:
        evaluator.h.copy_(h.float() - h.float().mean())
        diag = evaluator.evaluate(eval_samples)
        return diag["rel_rms_err"], int(diag["empty_cells"]), ""

    nu = torch.full((256,), 1.0 / 256, dtype=torch.float64)
    floor = mass_diagnostics(nu * eval_samples, eval_samples, nu)["noise_floor"]
    return Case(name, targets, mc_error, floor)


def run_ours(case: Case, budgets: list[int], optimizer: str, mc: int, chunk: int, **kw: float) -> Curve:
    """One run of ``SemiDiscreteOT``, evaluated whenever the cumulative samples reach the next budget."""
    solver = SemiDiscreteOT(case.targets, optimizer=optimizer, num_mc_samples=mc, chunk_size=chunk, **kw)
    curve = Curve(f"ours-{optimizer}" + "".join(f" {k}={v:g}" for k, v in kw.items()))
    samples, seconds = 0, 0.0
    for budget in budgets:
        while samples < budget:
            m = int(solver.num_mc_samples)
            start = time.perf_counter()
            solver.step()
            seconds += time.perf_counter() - start
            samples += m
        err, empty, extra = case.error(solver.h)
        curve.samples.append(samples)
        curve.seconds.append(seconds)
        curve.errors.append(err)
        curve.empty.append(empty)
        curve.extra.append(extra)
    return curve


def run_pot(case: Case, budgets: list[int], batch: int, seed: int = 0, **kw: float) -> Curve:
    """POT's ``solve_semidiscrete`` from scratch at every budget (it has no callback), same source, torch fp32."""
    from ot.semidiscrete import solve_semidiscrete

    y = case.targets
    curve = Curve(f"POT batch={batch}" + "".join(f" {k}={v:g}" for k, v in kw.items()))
    d = y.shape[1]
    for budget in budgets:
        gen = torch.Generator().manual_seed(seed)
        iters = max(1, budget // batch)
        start = time.perf_counter()
        sampler = lambda b, gen=gen: torch.randn(b, d, generator=gen)  # noqa: E731
        g = solve_semidiscrete(y, sampler, max_iter=iters, batch_size=batch, **kw)
        seconds = time.perf_counter() - start
        h = (g - y.square().sum(dim=1)) / 2
        err, empty, extra = case.error(h)
        curve.samples.append(iters * batch)
        curve.seconds.append(seconds)
        curve.errors.append(err)
        curve.empty.append(empty)
        curve.extra.append(extra)
    return curve


def reach(curve: Curve, level: float, axis: list[float]) -> float:
    """The first axis value (samples or seconds) where the error falls to ``level``, log-log interpolated."""
    for i, err in enumerate(curve.errors):
        if err <= level:
            if i == 0 or curve.errors[i - 1] <= 0.0 or err <= 0.0:
                return axis[i]
            a, b = math.log(curve.errors[i - 1]), math.log(err)
            frac = (a - math.log(level)) / (a - b)
            return math.exp(math.log(axis[i - 1]) + frac * (math.log(axis[i]) - math.log(axis[i - 1])))
    return math.nan


def report(case: Case, curves: list[Curve]) -> None:
    print(f"\n=== case {case.name}: N = {case.targets.shape[0]}, d = {case.targets.shape[1]}", end="")
    print(f", held-out MC floor {case.floor:.4f}" if case.floor else ", exact (quadrature) masses")
    for c in curves:
        print(f"-- {c.name}")
        print(f"   {'samples':>11} {'seconds':>8} {'rel RMS err':>12} {'empty':>6}")
        for s, t, e, k, x in zip(c.samples, c.seconds, c.errors, c.empty, c.extra, strict=True):
            print(f"   {s:>11.3e} {t:>8.2f} {e:>12.4f} {k:>6d}  {x}")
    pot = curves[-1]
    level = pot.errors[-1]
    print(f"-- ratios against {pot.name}")
    for c in curves[:-1]:
        ratios = [f"{e / p:.2f}" if p > 0 else "-" for e, p in zip(c.errors, pot.errors, strict=True)]
        print(f"   {c.name}: error / POT's at each budget: {' '.join(ratios)}")
    print(f"   to reach POT's final error {level:.4f}:")
    for c in curves:
        s, t = reach(c, level, c.samples), reach(c, level, c.seconds)
        s_txt = "-" if math.isnan(s) else f"{s:.3e}"
        t_txt = "-" if math.isnan(t) else f"{t:.2f}"
        print(f"   {c.name:>40}: samples {s_txt:>10}  seconds {t_txt:>7}")
    print("   at equal error (each level POT reached; ours interpolated): our samples / POT's, POT's time / ours")
    for c in curves[:-1]:
        cells = []
        for p_err, p_s, p_t in zip(pot.errors, pot.samples, pot.seconds, strict=True):
            s, t = reach(c, p_err, c.samples), reach(c, p_err, c.seconds)
            cells.append("-" if math.isnan(s) else f"{p_err:.4f}: {s / p_s:.2f} / {p_t / t:.1f}x")
        print(f"   {c.name}: " + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=["d8", "1d", "both"], default="both")
    parser.add_argument("--budgets", type=int, default=7, help="budgets 2^14 ... 2^(13 + budgets) samples")
    parser.add_argument("--eval-samples", type=int, default=2**22)
    parser.add_argument("--mc", type=int, default=256, help="our Monte Carlo samples per iteration M (both optimisers)")
    parser.add_argument("--chunk", type=int, default=256, help="our chunk size")
    parser.add_argument(
        "--asgd-lr-1d", type=float, default=0.03, help="ASGD lr0 in 1-D (the default 0.25 score_scale is for d >= 8)"
    )
    parser.add_argument("--pot-batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [2 ** (14 + k) for k in range(args.budgets)]
    for name in ["d8", "1d"] if args.case == "both" else [args.case]:
        case = make_case(name, args.eval_samples)
        asgd = {"lr": args.asgd_lr_1d} if name == "1d" else {}
        curves = [
            run_ours(case, budgets, "adam", args.mc, args.chunk),
            run_ours(case, budgets, "asgd", args.mc, args.chunk, **asgd),
            run_pot(case, budgets, args.pot_batch),
        ]
        report(case, curves)


if __name__ == "__main__":
    main()
