"""Semi-discrete OT solver: closed forms, POT agreement, chunking, resume, distribution, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy.stats import norm
from torch import Tensor

from lightning_dpmot.ot.power_cells import power_argmax, power_topk
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_fit import max_rel_noise_floor

SQUARE = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def quadrature_masses(solver: SemiDiscreteOT, h: Tensor | None = None, points: int = 1201) -> Tensor:
    """Cell masses of a 2-D solver by tensor-grid quadrature of its source (no Monte Carlo), (N,) float64."""
    if solver.config.source == "gaussian":
        axis = torch.linspace(-7.0, 7.0, points, dtype=torch.float64)
        weight_1d = torch.from_numpy(norm.pdf(axis.numpy()))
    else:
        axis = (torch.arange(points, dtype=torch.float64) + 0.5) / points - 0.5
        weight_1d = torch.ones(points, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    weights = torch.outer(weight_1d, weight_1d).flatten()
    if h is not None:
        solver.h.copy_(h)
    idx = solver.assign(grid.float())
    masses = torch.bincount(idx, weights=weights, minlength=solver.num_targets)
    return masses / weights.sum()


def line_closed_form(y: Tensor, nu: Tensor) -> tuple[Tensor, float]:
    """Optimal centred h and energy for a 1-D Gaussian source and sorted targets y (N,), masses nu (N,).

    Cell i is [t_{i-1}, t_i] with t_i the N(0, 1) quantile of the cumulative mass; equal scores at t_i give
    h_{i+1} - h_i = -t_i (y_{i+1} - y_i); E(h*) = sum_i y_i (phi(t_{i-1}) - phi(t_i)).
    """
    t = norm.ppf(np.cumsum(nu.double().numpy())[:-1])
    y64 = y.double().numpy()
    h = np.concatenate([[0.0], np.cumsum(-t * np.diff(y64))])
    phi = norm.pdf(np.concatenate([[-np.inf], t, [np.inf]]))
    energy = float(np.sum(y64 * (phi[:-1] - phi[1:])))
    return torch.from_numpy(h - h.mean()), energy


# ---------------------------------------------------------------------------------------------- optimality


def test_line_matches_closed_form_potential_masses_and_energy() -> None:
    y = torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.5])
    nu = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    h_star, energy_star = line_closed_form(y, nu)
    solver = SemiDiscreteOT(
        y[:, None], nu, optimizer="adam", lr=0.05, num_mc_samples=16384, chunk_size=4096, patience=20
    )
    result = solver.fit(400, tol=0.01, progress=False)
    assert result["converged"]
    assert (solver.h.double() - h_star).abs().max() < 0.03
    # exact masses of the fitted h: the cells are intervals between consecutive equal-score points
    h = solver.h.double()
    faces = -(h[1:] - h[:-1]) / (y[1:] - y[:-1]).double()
    cdf = torch.from_numpy(norm.cdf(np.concatenate([[-np.inf], faces.numpy(), [np.inf]])))
    assert (cdf.diff() - nu.double()).abs().max() < 5e-3
    assert result["evaluation"]["energy"] == pytest.approx(energy_star, abs=5e-3)


def test_symmetric_square_keeps_h_at_zero() -> None:
    solver = SemiDiscreteOT(SQUARE, optimizer="adam", lr=0.05, num_mc_samples=8192, chunk_size=4096, patience=20)
    solver.fit(150, progress=False)
    assert solver.h.abs().max() < 0.03
    assert (quadrature_masses(solver) - 0.25).abs().max() < 5e-3


@pytest.mark.parametrize("source", ["gaussian", "uniform"])
def test_asymmetric_masses_are_matched(source: str) -> None:
    nu = torch.tensor([0.4, 0.3, 0.2, 0.1])
    lr = 0.05 if source == "gaussian" else 0.015
    solver = SemiDiscreteOT(
        SQUARE, nu, source=source, optimizer="adam", lr=lr, num_mc_samples=8192, chunk_size=4096, patience=20
    )
    result = solver.fit(300, tol=0.02, progress=False)
    assert result["converged"]
    assert (quadrature_masses(solver) - nu.double()).abs().max() < 0.01
    assert torch.equal(solver.h.argsort(descending=True), torch.arange(4))  # more mass needs a higher h


def test_unit_cube_potential_gives_the_same_cells_for_uncentred_noise() -> None:
    gen = torch.Generator().manual_seed(5)
    targets = torch.rand(20, 6, generator=gen)  # uncentred "images" in [0, 1]
    solver = SemiDiscreteOT(targets, source="uniform", num_mc_samples=4096, chunk_size=4096)
    for _ in range(30):
        solver.step()
    x01 = torch.rand(5000, 6, generator=gen)
    shifted = power_argmax(x01, solver.targets, solver.unit_cube_potential(), 8)[1]
    assert (shifted == solver.assign(x01 - 0.5)).float().mean() > 0.999


# ---------------------------------------------------------------------------------------------- POT


def test_potential_parametrisation_matches_pot_assignment() -> None:
    from ot.semidiscrete import semidiscrete_atom_weights

    gen = torch.Generator().manual_seed(3)
    targets = torch.randn(12, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(12, generator=gen, dtype=torch.float64)
    x = torch.randn(5000, 3, generator=gen, dtype=torch.float64)
    solver = SemiDiscreteOT(targets)
    solver.h.copy_((g - targets.square().sum(dim=1)) / 2)  # POT: argmin ||x - y||^2 - g
    pot_cells = semidiscrete_atom_weights(targets, x, g).argmax(dim=1)
    assert torch.equal(solver.assign(x), pot_cells)


def test_fitted_potential_agrees_with_pot_solver() -> None:
    from ot.semidiscrete import solve_semidiscrete

    gen = torch.Generator().manual_seed(3)
    targets = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    nu = torch.tensor([0.05, 0.1, 0.15, 0.2, 0.1, 0.15, 0.1, 0.15], dtype=torch.float64)
    rng = np.random.default_rng(0)
    g = solve_semidiscrete(
        targets.numpy(),
        lambda b: rng.standard_normal((b, 3)),
        a_target=nu.numpy(),
        max_iter=2000,
        batch_size=256,
    )
    h_pot = torch.from_numpy((g - targets.square().sum(dim=1).numpy()) / 2)
    h_pot -= h_pot.mean()
    solver = SemiDiscreteOT(targets, nu, optimizer="adam", lr=0.05, num_mc_samples=32768, chunk_size=8192, patience=20)
    assert solver.fit(300, tol=0.01, progress=False)["converged"]
    assert (solver.h.double() - h_pot).abs().max() < 0.03
    x = torch.randn(100_000, 3, generator=gen)
    ours = solver.assign(x)
    solver.h.copy_(h_pot)
    assert (ours == solver.assign(x)).float().mean() > 0.98


# ---------------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize(("chunk_size", "target_chunk_size"), [(7, 5), (64, 13), (250, 37), (1000, 1000)])
def test_chunked_assignment_equals_full_argmax(chunk_size: int, target_chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    targets, x = torch.randn(37, 9, generator=gen), torch.randn(250, 9, generator=gen)
    solver = SemiDiscreteOT(targets, chunk_size=chunk_size, target_chunk_size=target_chunk_size)
    solver.h.copy_(torch.randn(37, generator=gen))
    full = torch.addmm(solver.h, x, targets.T)
    assert torch.equal(solver.assign(x), full.argmax(dim=1))
    assert torch.equal(solver(x), targets[full.argmax(dim=1)])
    scores, idx = solver.topk(x, 4)
    ref_scores, ref_idx = full.topk(4, dim=1)
    assert torch.equal(idx, ref_idx) and torch.allclose(scores, ref_scores)


def test_cell_masses_do_not_depend_on_the_target_block_size() -> None:
    gen = torch.Generator().manual_seed(2)
    targets, h = torch.randn(50, 8, generator=gen), torch.randn(50, generator=gen)
    masses = []
    for target_chunk_size in (7, 50, 4096):
        solver = SemiDiscreteOT(targets, chunk_size=512, target_chunk_size=target_chunk_size)
        solver.h.copy_(h)
        masses.append(solver.cell_masses(num_samples=3000, iteration=4))
    assert torch.equal(masses[0], masses[1]) and torch.equal(masses[0], masses[2])
    assert masses[0].sum().item() == pytest.approx(1.0) and (masses[0] * 3072).eq((masses[0] * 3072).round()).all()


def test_antithetic_scores_reflections_from_the_same_gemm() -> None:
    gen = torch.Generator().manual_seed(4)
    targets, h, x = (
        torch.randn(30, 5, generator=gen),
        torch.randn(30, generator=gen),
        torch.randn(64, 5, generator=gen),
    )
    val, idx = power_argmax(x, targets, h, 7, antithetic=True)
    ref_val, ref_idx = power_argmax(torch.cat([x, -x]), targets, h, 7)
    assert torch.equal(idx, ref_idx) and torch.allclose(val, ref_val)
    top_val, top_idx = power_topk(x, targets, h, 1, 7)
    assert torch.equal(top_idx[:, 0], idx[:64])


def test_antithetic_fit_balances_the_cells() -> None:
    nu = torch.tensor([0.4, 0.3, 0.2, 0.1])
    solver = SemiDiscreteOT(
        SQUARE, nu, optimizer="adam", lr=0.05, num_mc_samples=8192, chunk_size=4096, patience=20, antithetic=True
    )
    solver.fit(300, tol=0.02, progress=False)
    assert (quadrature_masses(solver) - nu.double()).abs().max() < 0.01


# ---------------------------------------------------------------------------------------------- optimiser


def test_step_is_adam_without_bias_correction_on_the_masses_of_its_iteration() -> None:
    gen = torch.Generator().manual_seed(6)
    solver = SemiDiscreteOT(
        torch.randn(16, 4, generator=gen), optimizer="adam", lr=0.1, bias_correction=False, chunk_size=256
    )
    grad = (solver.cell_masses(iteration=0) - solver.nu).float()
    diag = solver.step()
    m, v = 0.1 * grad, 0.001 * grad.square()
    h = -0.1 * m / (v.sqrt() + 1e-8)
    assert torch.allclose(solver.h, h - h.mean(), atol=1e-6)
    assert solver.h.sum().abs() < 1e-5
    assert diag["g_norm"] == pytest.approx(grad.double().norm().item(), rel=1e-6)
    assert diag["empty_cells"] == (grad == -solver.nu.float()).sum().item()


def test_stalls_double_the_samples_and_decay_lr_at_most_max_doublings_times() -> None:
    solver = SemiDiscreteOT(
        SQUARE, optimizer="adam", lr=1.0, num_mc_samples=100, chunk_size=100, patience=2, max_doublings=2
    )
    norms = [1.0, 2.0, 2.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]
    for g_norm in norms:
        solver._schedule(g_norm)
    assert int(solver.doublings) == 2
    assert int(solver.num_mc_samples) == 400
    assert float(solver.lr) == pytest.approx(0.64)


# ---------------------------------------------------------------------------------------------- state


def _make_resumable() -> SemiDiscreteOT:
    targets = torch.randn(24, 5, generator=torch.Generator().manual_seed(7))
    return SemiDiscreteOT(
        targets, optimizer="adam", num_mc_samples=300, chunk_size=128, patience=0, max_doublings=2, seed=11
    )


def test_resume_from_state_dict_is_exact(tmp_path: Path) -> None:
    full = _make_resumable()
    for _ in range(12):
        full.step()
    first = _make_resumable()
    for _ in range(5):
        first.step()
    torch.save(first.state_dict(), tmp_path / "ot.pt")
    resumed = _make_resumable()
    resumed.load_state_dict(torch.load(tmp_path / "ot.pt", weights_only=True))
    for _ in range(7):
        resumed.step()
    assert int(full.doublings) > 0  # the schedule state took part
    for name, buf in full.named_buffers():
        assert torch.equal(buf, getattr(resumed, name)), name


def test_loading_a_checkpoint_with_another_monte_carlo_stream_fails() -> None:
    state = _make_resumable().state_dict()
    other = SemiDiscreteOT(torch.zeros(24, 5), num_mc_samples=300, chunk_size=128, seed=12)
    with pytest.raises(ValueError, match="seed: checkpoint 11 vs solver 12"):
        other.load_state_dict(state)


def test_dtype_casts_keep_the_solver_in_fp32() -> None:
    solver = SemiDiscreteOT(SQUARE.double()).half()
    assert solver.targets.dtype == torch.float32 and solver.h.dtype == torch.float32
    assert solver.nu.dtype == torch.float64 and solver.iteration.dtype == torch.int64


def test_ranks_share_chunks_and_sum_to_the_single_process_histogram() -> None:
    targets = torch.randn(40, 6, generator=torch.Generator().manual_seed(8))
    single = SemiDiscreteOT(targets, chunk_size=256)
    counts, value_sum, total = single._mc_statistics(5 * 256, 3, 0)
    parts = [
        SemiDiscreteOT(targets, chunk_size=256, rank=r, world_size=2, all_reduce=lambda t: t)._mc_statistics(
            5 * 256, 3, 0
        )
        for r in (0, 1)
    ]
    assert torch.equal(parts[0][0] + parts[1][0], counts)
    assert parts[0][2] == 3 * 256 and parts[1][2] == 2 * 256 and total == 5 * 256
    assert parts[0][1] + parts[1][1] == pytest.approx(value_sum, rel=1e-12)


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str, steps: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        solver = _make_resumable()
        diags = [solver.step() for _ in range(steps)]
        torch.save({"h": solver.h, "g_norm": [d["g_norm"] for d in diags]}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_fit_is_bit_identical_to_single_process(tmp_path: Path) -> None:
    steps = 8
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "rdv"), str(tmp_path), steps), nprocs=2, join=True)
    single = _make_resumable()
    norms = [single.step()["g_norm"] for _ in range(steps)]
    for rank in (0, 1):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(out["h"], single.h)
        assert out["g_norm"] == norms


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (
            torch.tensor([[0.0, float("nan")], [1.0, 1.0]]),
            r"targets contain NaN or infinite values \(1 non-finite",
        ),
        (torch.tensor([[0.0, float("inf")], [1.0, 1.0]]), "targets contain NaN or infinite values"),
        (torch.zeros(0, 3), r"targets is empty: .* got shape \(0, 3\)"),
        (torch.zeros(5), r"targets must be a 2-D tensor \(N, d\), got \(5,\)"),
    ],
)
def test_bad_targets_are_rejected(targets: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SemiDiscreteOT(targets)


@pytest.mark.parametrize(
    ("masses", "message"),
    [
        (torch.tensor([0.5, 0.5, 0.0]), r"masses must have shape \(4,\) to match the 4 targets, got \(3,\)"),
        (torch.tensor([0.6, 0.5, 0.1, -0.2]), "masses must be positive"),
        (torch.tensor([0.3, 0.3, 0.2, 0.1]), "masses must sum to 1, got 0.9"),
    ],
)
def test_bad_masses_are_rejected(masses: Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SemiDiscreteOT(SQUARE, masses)


def test_noise_of_the_wrong_dimension_is_rejected() -> None:
    solver = SemiDiscreteOT(SQUARE)
    with pytest.raises(ValueError, match="noise x has dimension 3 but the targets have dimension 2"):
        solver.assign(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\], got 5"):
        solver.topk(torch.zeros(4, 2), 5)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="source must be 'gaussian' or 'uniform'"):
        SemiDiscreteOT(SQUARE, source="sobol")  # type: ignore[arg-type]
    solver = SemiDiscreteOT(SQUARE, criterion="max", num_mc_samples=1000, chunk_size=1000)
    floor = max_rel_noise_floor(solver.nu, 4000)
    assert floor == pytest.approx(math.sqrt(2 * math.log(8)) * math.sqrt(0.75 / 1000), rel=1e-9)
    with pytest.raises(ValueError, match="below the Monte Carlo noise floor"):
        solver.fit(10, tol=0.5 * floor, progress=False)


def test_cell_search_ignores_autocast() -> None:
    """Under bf16 autocast the scores stay fp32 and the cells equal the fp32 argmax (bf16 GEMMs would mis-rank)."""
    from lightning_dpmot.ot.power_cells import power_argmax, power_topk

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 32, generator=gen), torch.randn(50, 32, generator=gen) * 30
    h = torch.randn(50, generator=gen)
    exact = (x @ y.T + h).argmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, idx = power_argmax(x, y, h, target_chunk_size=16)
        _, top = power_topk(x, y, h, k=3, target_chunk_size=16)
    assert values.dtype == torch.float32 and torch.equal(idx, exact) and torch.equal(top[:, 0], exact)
