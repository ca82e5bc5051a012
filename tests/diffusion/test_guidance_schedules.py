"""Guidance schedules: their documented values at both ends, and the normalised clock of a sampler's grid."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_dpmot.diffusion.guidance_schedules import (
    Constant,
    Cosine,
    Linear,
    Piecewise,
    SigmaClock,
    Window,
    as_schedule,
)
from lightning_dpmot.sampling.schedules import karras_sigmas


def test_linear_and_cosine_run_from_start_at_tau_one_to_end_at_tau_zero() -> None:
    up, cos = Linear(start=0.0, end=8.0), Cosine(start=8.0, end=2.0)
    assert up.at(1.0) == 0.0 and up.at(0.0) == 8.0 and up.at(0.25) == pytest.approx(6.0)
    assert cos.at(1.0) == pytest.approx(8.0) and cos.at(0.0) == pytest.approx(2.0)
    assert cos.at(0.5) == pytest.approx(5.0)  # half-way between the ends at the middle
    assert cos.at(0.25) == pytest.approx(2.0 + 6.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert Linear(3.0, 3.0).at(0.7) == 3.0 and Constant(2.5).at(0.1) == 2.5


def test_window_is_its_value_inside_and_outside_elsewhere() -> None:
    paddle_skip = Window(100.0, tau_min=0.0, tau_max=0.8)  # no guidance in the first 20 % of the steps
    taus = torch.tensor([1.0, 0.9, 0.8, 0.5, 0.0])
    assert paddle_skip(taus).tolist() == [0.0, 0.0, 100.0, 100.0, 100.0]
    assert Window(1.0, 0.5, 1.0, outside=0.25)(taus).tolist() == [1.0, 1.0, 1.0, 1.0, 0.25]
    assert Window(0.0).always_zero and not Window(0.0, outside=1.0).always_zero
    with pytest.raises(ValueError, match="tau_min <= tau_max"):
        Window(1.0, tau_min=0.9, tau_max=0.1)


def test_piecewise_reads_disco_lists_in_sampling_order() -> None:
    overview = Piecewise([[400, 12], [600, 4]])  # Disco's cut_overview "[12]*400+[4]*600"
    assert len(overview.table) == 1000
    assert overview.at(1.0) == 12 and overview.at(0.61) == 12  # entry 390
    assert overview.at(0.6) == 4 and overview.at(0.0) == 4  # entries 400 and 999 (clamped)
    with pytest.raises(ValueError, match="count >= 1"):
        Piecewise([[0, 1.0]])


def test_as_schedule_and_zero_detection() -> None:
    assert isinstance(as_schedule(3), Constant) and as_schedule(3).at(0.3) == 3.0
    assert Constant(0.0).always_zero and Linear(0.0, 0.0).always_zero and not Linear(0.0, 1.0).always_zero
    with pytest.raises(TypeError, match="number or a GuidanceSchedule"):
        as_schedule("7")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        Constant(float("nan"))


def test_sigma_clock_is_one_minus_step_fraction_on_the_grid() -> None:
    sigmas = karras_sigmas(10, 0.002, 80.0, 7.0)
    clock = SigmaClock(sigmas)
    expected = 1 - torch.arange(11, dtype=torch.float64) / 10
    assert torch.allclose(clock(sigmas), expected.clamp(0, 1))
    # a churned level between grid points lies between their times, monotone in sigma
    mid = torch.sqrt(sigmas[3] * sigmas[4])
    assert float(clock(sigmas[4])) < float(clock(mid)) < float(clock(sigmas[3]))
    assert float(clock(torch.tensor(200.0))) == 1.0 and float(clock(torch.tensor(0.0))) == 0.0
    with pytest.raises(ValueError, match="decreasing"):
        SigmaClock(torch.tensor([1.0, 2.0, 0.0]))
