"""Noise-to-latent maps over a semi-discrete OT potential: each map's defining property, fp32 guard, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from torch import Tensor

from lightning_dpmot.ot.latent_targets import LatentTargets
from lightning_dpmot.ot.power_cells import sample_source
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT
from lightning_dpmot.ot.semidiscrete_maps import (
    _CALIBRATION,
    AEOTMap,
    HardMap,
    RenoiseMap,
    SoftMap,
    build_map,
    exact_fp32,
)
from lightning_dpmot.utils.random import StackedGenerator, make_generator

N, D, SIGMA = 40, 6, 0.3


@pytest.fixture
def targets() -> LatentTargets:
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(N, D, generator=gen) * 2 - 1
    latents = clean + SIGMA * torch.randn(N, D, generator=gen)
    return LatentTargets(latents, torch.arange(N), torch.arange(N) % 3, SIGMA, clean=clean)


@pytest.fixture
def solver(targets: LatentTargets) -> SemiDiscreteOT:
    solver = SemiDiscreteOT(targets.flat(), num_mc_samples=1024, chunk_size=512)
    for _ in range(30):  # a partly fitted potential: h != 0, cells of varied size
        solver.step()
    return solver


def noise(b: int = 64, seed: int = 1) -> Tensor:
    return torch.randn(b, D, generator=torch.Generator().manual_seed(seed))


def test_hard_map_returns_exactly_the_stored_latent_of_the_power_cell(solver: SemiDiscreteOT) -> None:
    x = noise()
    out = HardMap(solver)(x)
    scores = x @ solver.targets.T + solver.h
    assert torch.equal(out.index, scores.argmax(dim=1))
    assert torch.equal(out.latents, solver.targets[out.index])
    assert torch.equal(HardMap(solver).map(x), solver(x))


def test_renoise_map_is_the_cells_clean_image_plus_fresh_noise(solver: SemiDiscreteOT, targets: LatentTargets) -> None:
    x = noise()
    out = RenoiseMap(solver, targets.flat_clean(), SIGMA)(x, torch.Generator().manual_seed(5))
    fresh = torch.randn(64, D, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out.index, solver.assign(x))
    assert torch.equal(out.latents, targets.flat_clean()[out.index] + SIGMA * fresh)
    # x only selects the cell: a per-sample noise source makes each row depend on its own seed alone
    per_sample = RenoiseMap(solver, targets.flat_clean(), SIGMA)(x[:3], StackedGenerator([7, 8, 9]))
    alone = RenoiseMap(solver, targets.flat_clean(), SIGMA)(x[1:2], StackedGenerator([8]))
    assert torch.equal(per_sample.latents[1], alone.latents[0])


def test_soft_map_tends_to_the_hard_map_as_temperature_falls(solver: SemiDiscreteOT) -> None:
    x = noise()
    assert torch.equal(SoftMap(solver, k=5, temperature=1e-6)(x).latents, HardMap(solver)(x).latents)
    warm = SoftMap(solver, k=5, temperature=1.0)(x).latents
    assert (warm - HardMap(solver)(x).latents).abs().max() > 1e-3  # it does interpolate


def test_soft_map_lies_in_the_convex_hull_of_the_top_k_latents(solver: SemiDiscreteOT) -> None:
    x = noise(16)
    soft = SoftMap(solver, k=4, temperature=0.5)
    out = soft(x)
    _, idx = solver.topk(x, 4)
    assert torch.equal(out.index, idx[:, 0])
    for b in range(16):
        y = solver.targets[idx[b]].double().numpy()  # (k, d); find w >= 0 with sum 1 and w @ y = out
        a = np.vstack([y.T, 1e3 * np.ones((1, 4))])
        w, residual = nnls(a, np.concatenate([out.latents[b].double().numpy(), [1e3]]))
        assert residual < 1e-4 and abs(w.sum() - 1) < 1e-6
        assert np.allclose(w, soft.weights(x[b : b + 1])[0][0].double().numpy(), atol=1e-4)


def test_restore_noise_tops_the_blends_noise_up_to_sigma_s(solver: SemiDiscreteOT) -> None:
    x = noise(8)
    plain = SoftMap(solver, k=4, temperature=0.5)
    topped = SoftMap(solver, k=4, temperature=0.5, restore_noise=True, sigma_s=SIGMA)
    w, _ = plain.weights(x)
    added = topped(x, torch.Generator().manual_seed(3)).latents - plain(x).latents
    fresh = torch.randn(8, D, generator=torch.Generator().manual_seed(3))
    expected = SIGMA * (1 - w.square().sum(1, keepdim=True)).sqrt() * fresh
    assert torch.allclose(added, expected, atol=1e-6)


def reference_angles(solver: SemiDiscreteOT, idx: Tensor) -> Tensor:
    """Angles between the normals (y_i, -1) / ||(y_i, -1)|| of the best cell and each runner-up (float64)."""
    y = solver.targets.double()
    normals = torch.cat([y, -torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    normals = normals / normals.norm(dim=1, keepdim=True)
    cos = (normals[idx[:, :1]] * normals[idx[:, 1:]]).sum(-1)
    return torch.arccos(cos.clamp(-1, 1))


def test_aeot_outputs_the_best_target_or_the_lambda_mix_with_the_first_regular_runner_up(
    solver: SemiDiscreteOT,
) -> None:
    aeot = AEOTMap(solver, k=4, angle_threshold=0.5, lam=0.75, calibration_samples=2048)
    x = noise(256, seed=9)
    out = aeot(x)
    _, idx = solver.topk(x, 4)
    lo, hi = aeot.theta_range.double()
    theta = (reference_angles(solver, idx) - lo) / (hi - lo)
    regular = theta <= 0.5
    y = solver.targets
    kinds = set()
    for b in range(256):
        if not regular[b].any():
            assert torch.equal(out.latents[b], y[idx[b, 0]])
            kinds.add("top1")
        else:
            j = int(regular[b].nonzero()[0]) + 1
            assert torch.allclose(out.latents[b], 0.25 * y[idx[b, 0]] + 0.75 * y[idx[b, j]], atol=1e-6)
            kinds.add("pair")
    assert kinds == {"top1", "pair"}  # both branches are exercised
    # calibration: min and max angle over the fixed batch of source samples seeded by calibration_seed
    calib = sample_source("gaussian", 2048, D, make_generator(0, _CALIBRATION))
    theta_calib = reference_angles(solver, solver.topk(calib, 4)[1])
    assert torch.allclose(aeot.theta_range.double(), torch.stack([theta_calib.min(), theta_calib.max()]), atol=1e-5)


def test_maps_run_in_fp32_under_autocast_and_restore_the_matmul_precision(solver: SemiDiscreteOT) -> None:
    x = noise(256)
    expected = HardMap(solver)(x).index
    before = torch.get_float32_matmul_precision()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.addmm(solver.h, x, solver.targets.T).dtype == torch.bfloat16  # what an unguarded GEMM does
        assert torch.equal(HardMap(solver)(x).index, expected)
        with exact_fp32("cpu"):
            assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == before


def test_build_map_names_and_bad_input(solver: SemiDiscreteOT, targets: LatentTargets) -> None:
    assert isinstance(build_map("hard", solver), HardMap)
    assert isinstance(build_map("renoise", solver, targets), RenoiseMap)
    assert build_map("soft", solver, targets, k=3).k == 3 and build_map("aeot", solver, targets).k == 5
    with pytest.raises(ValueError, match="unknown map 'exact'; expected one of hard, renoise, soft, aeot"):
        build_map("exact", solver)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="renoise map needs the targets' clean samples"):
        build_map("renoise", solver)
    with pytest.raises(ValueError, match="targets hold 3 latents but the solver has 40"):
        build_map("hard", solver, targets.subset(torch.arange(3)))
    with pytest.raises(ValueError, match=r"k must be in \[1, 40\]"):
        SoftMap(solver, k=41)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        SoftMap(solver, temperature=0.0)
    with pytest.raises(ValueError, match="aeot needs k >= 2"):
        AEOTMap(solver, k=1)
    with pytest.raises(ValueError, match="restore_noise needs sigma_s"):
        SoftMap(solver, restore_noise=True)
    for name in ("hard", "renoise", "soft", "aeot"):
        with pytest.raises(ValueError, match="noise x has dimension 5 but the targets have dimension 6"):
            build_map(name, solver, targets)(torch.zeros(2, 5))  # type: ignore[arg-type]
