"""Trajectory straightness: zero on a straight ODE path, known values on a constructed curved path."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.metrics.curvature import (
    TrajectoryRecorder,
    curvature,
    mean_trajectory_metrics,
    straightness_deviation,
    total_variation,
    trajectory_metrics,
)

SIGMAS = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.1, 0.0], dtype=torch.float64)


def _straight(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """x_i = D + sigma_i * n with a constant denoised estimate D, shapes (T, B, 2, 4, 4)."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
    n = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
    xs = d + SIGMAS.view(-1, 1, 1, 1, 1) * n
    return xs, d.expand_as(xs).clone()


def _curved() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two Euler steps in 2-D that turn by 90 degrees: sigma 2 -> 1 -> 0.

    x_0 = (2, 0), D_0 = (0, 0): d_0 = (1, 0), x_1 = (1, 0); D_1 = (1, 1): d_1 = (0, -1), x_2 = (1, 1).
    Chord velocity (x_0 - x_2) / 2 = (0.5, -0.5): curvature = mean(0.5, 0.5) / 2 = 0.25; deviation =
    mean(||(0,0) - (1,1)||^2, 0) / 2 = 0.5; total variation = ||D_1 - D_0|| / sqrt(2) = 1.
    """
    xs = torch.tensor([[[2.0, 0.0]], [[1.0, 0.0]], [[1.0, 1.0]]], dtype=torch.float64)
    ds = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[1.0, 1.0]]], dtype=torch.float64)
    return xs, ds, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)


def test_straight_path_has_zero_curvature_deviation_and_variation() -> None:
    xs, ds = _straight()
    metrics = trajectory_metrics(xs, ds, SIGMAS)
    assert all(v.shape == (3,) for v in metrics.values())
    assert bool((metrics["curvature"] < 1e-24).all())
    assert torch.equal(metrics["deviation"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(metrics["total_variation"], torch.zeros(3, dtype=torch.float64))


def test_constructed_curved_path_has_known_values() -> None:
    xs, ds, sigmas = _curved()
    assert curvature(xs, ds, sigmas).item() == pytest.approx(0.25)
    assert straightness_deviation(xs, ds, sigmas).item() == pytest.approx(0.5)
    assert total_variation(xs, ds, sigmas).item() == pytest.approx(1.0)


def test_values_are_per_sample() -> None:
    xs, ds, sigmas = _curved()
    straight_x = torch.tensor([3.0, 4.0], dtype=torch.float64) + sigmas.view(-1, 1, 1) * torch.tensor([1.0, -2.0])
    both_x, both_d = (
        torch.cat([xs, straight_x], dim=1),
        torch.cat([ds, straight_x[-1:].expand(3, 1, 2)], dim=1),
    )
    values = trajectory_metrics(both_x, both_d, sigmas)
    torch.testing.assert_close(values["curvature"], torch.tensor([0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(values["deviation"], torch.tensor([0.5, 0.0], dtype=torch.float64))
    means = mean_trajectory_metrics(both_x, both_d, sigmas)
    assert means == pytest.approx({"deviation": 0.25, "curvature": 0.125, "total_variation": 0.5})


def test_levels_at_sigma_zero_are_ignored() -> None:
    xs, ds, sigmas = _curved()
    ds_changed = ds.clone()
    ds_changed[-1] = 123.0  # D at sigma = 0 is no network evaluation
    assert mean_trajectory_metrics(xs, ds_changed, sigmas) == mean_trajectory_metrics(xs, ds, sigmas)


def test_recorder_feeds_a_sampler_trajectory() -> None:
    from lightning_dpmot.sampling.samplers import sample_euler

    target = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    x_start = 80.0 * torch.randn(2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    recorder = TrajectoryRecorder(x_start)
    sample_euler(lambda x, sigma, labels=None: target.expand_as(x), x_start, SIGMAS, callback=recorder)
    xs, ds, sigmas = recorder.stack()
    assert xs.shape == (6, 2, 2) and torch.equal(sigmas, SIGMAS)
    torch.testing.assert_close(xs[-1], target)  # a constant denoiser is reached exactly by Euler
    assert float(curvature(xs, ds, sigmas).max()) < 1e-20

    # two-point data: D(x; sigma) is the posterior mean over {-1, +1} per coordinate; the ODE path bends
    def two_points(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(x / sigma.view(-1, 1) ** 2)

    recorder = TrajectoryRecorder(x_start)
    sample_euler(two_points, x_start, SIGMAS, callback=recorder)
    assert bool((curvature(*recorder.stack()) > 1e-3).all())


def test_bad_trajectories_raise_clear_errors() -> None:
    xs, ds, sigmas = _curved()
    with pytest.raises(ValueError, match=r"sigmas must have shape \(3,\) to match xs"):
        curvature(xs, ds, sigmas[:2])
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing and non-negative"):
        curvature(xs, ds, sigmas.flip(0))
    with pytest.raises(ValueError, match=r"denoised must have the shape of xs \(3, 1, 2\)"):
        curvature(xs, ds[:, :, :1], sigmas)
    with pytest.raises(ValueError, match="no steps recorded"):
        TrajectoryRecorder(xs[0]).stack()
