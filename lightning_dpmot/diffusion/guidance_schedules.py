"""Guidance schedules: a guidance weight as a function of normalised sampling time.

UPainting's "diverse guidance schedules" are not published; the closest public pipelines vary the classifier-free
scale w, the cross-modal (CLIP) scale s and the cutout counts over the trajectory (Paddle's UPainting pipeline skips
CLIP guidance for the first 10 of 50 steps; Disco Diffusion indexes cut counts by the 1000-step timestep). Here each
is a small config object evaluated at the **normalised time** tau of the noise level being denoised:

- tau = 1 at the first level of the sampler's grid (sigma_max, pure noise), tau = 0 at the end (sigma = 0);
- on the grid ``sigmas[0] > ... > sigmas[N-1] > sigmas[N] = 0`` level i has tau = 1 - i / N, and a level between two
  grid points (EDM's churned sigma-hat) is placed by linear interpolation in log sigma (:class:`SigmaClock`).

So tau is the DDPM ``t / T`` of the trajectory that is actually sampled, whatever the sampler or number of steps.
Every schedule documents its values at both ends. In YAML a plain number is a :class:`Constant`; anything else is a
``class_path``/``init_args`` pair, e.g. ``{class_path: lightning_dpmot.diffusion.Window, init_args: {value: 100,
tau_min: 0.0, tau_max: 0.8}}`` (Paddle's skip of the first 20 % of the steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class GuidanceSchedule:
    """A weight ``value(tau)`` for normalised time tau in [0, 1] (1 = start of sampling, 0 = end)."""

    def __call__(self, tau: Tensor) -> Tensor:
        """Values at ``tau`` (any shape, float) -> same shape, float64."""
        raise NotImplementedError

    def at(self, tau: float) -> float:
        """The value at one time."""
        return float(self(torch.tensor(float(tau), dtype=torch.float64)))

    @property
    def always_zero(self) -> bool:
        """True when the schedule is 0 everywhere (the guidance it weights can be skipped)."""
        return False


class Constant(GuidanceSchedule):
    """``value`` at every tau."""

    def __init__(self, value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"a guidance schedule needs finite values, got {value}")
        self.value = float(value)

    def __call__(self, tau: Tensor) -> Tensor:
        return torch.full_like(torch.as_tensor(tau, dtype=torch.float64), self.value)

    @property
    def always_zero(self) -> bool:
        return self.value == 0.0

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class Linear(GuidanceSchedule):
    """A linear ramp: ``start`` at tau = 1 (first step), ``end`` at tau = 0 (last); ``start > end`` decays."""

    def __init__(self, start: float, end: float) -> None:
        if not (math.isfinite(start) and math.isfinite(end)):
            raise ValueError(f"a guidance schedule needs finite values, got start={start}, end={end}")
        self.start, self.end = float(start), float(end)

    def __call__(self, tau: Tensor) -> Tensor:
        tau = torch.as_tensor(tau, dtype=torch.float64).clamp(0, 1)
        return self.end + (self.start - self.end) * tau

    @property
    def always_zero(self) -> bool:
        return self.start == 0.0 and self.end == 0.0

    def __repr__(self) -> str:
        return f"Linear(start={self.start}, end={self.end})"


class Cosine(Linear):
    """A half-cosine from ``start`` at tau = 1 to ``end`` at tau = 0: ``end + (start - end) (1 - cos(pi tau)) / 2``
    (flat at both ends, steepest in the middle of the trajectory)."""

    def __call__(self, tau: Tensor) -> Tensor:
        tau = torch.as_tensor(tau, dtype=torch.float64).clamp(0, 1)
        return self.end + (self.start - self.end) * (1 - torch.cos(math.pi * tau)) / 2

    def __repr__(self) -> str:
        return f"Cosine(start={self.start}, end={self.end})"


class Window(GuidanceSchedule):
    """``value`` for tau in [tau_min, tau_max], ``outside`` elsewhere.

    ``Window(s, 0.0, 0.8)`` skips the first 20 % of the trajectory (Paddle UPainting: no CLIP guidance in the first
    10 of 50 steps); ``Window(s, 0.5, 1.0)`` guides only the first half (global layout).
    """

    def __init__(self, value: float, tau_min: float = 0.0, tau_max: float = 1.0, outside: float = 0.0) -> None:
        if not 0.0 <= tau_min <= tau_max <= 1.0:
            raise ValueError(f"a guidance window needs 0 <= tau_min <= tau_max <= 1, got [{tau_min}, {tau_max}]")
        if not (math.isfinite(value) and math.isfinite(outside)):
            raise ValueError(f"a guidance schedule needs finite values, got value={value}, outside={outside}")
        self.value, self.tau_min, self.tau_max, self.outside = float(value), float(tau_min), float(tau_max), outside

    def __call__(self, tau: Tensor) -> Tensor:
        tau = torch.as_tensor(tau, dtype=torch.float64)
        inside = (tau >= self.tau_min - 1e-6) & (tau <= self.tau_max + 1e-6)
        return torch.where(inside, self.value, float(self.outside)).to(torch.float64)

    @property
    def always_zero(self) -> bool:
        return self.value == 0.0 and self.outside == 0.0

    def __repr__(self) -> str:
        return f"Window({self.value}, tau_min={self.tau_min}, tau_max={self.tau_max}, outside={self.outside})"


class Piecewise(GuidanceSchedule):
    """Disco-style piecewise constant list: ``segments = [[count, value], ...]`` in sampling order.

    The segments make a list of ``sum(count)`` values (Disco: ``"[12]*400+[4]*600"`` = ``[[400, 12], [600, 4]]``
    over the 1000 training timesteps); entry ``floor((1 - tau) * len)`` (clamped) is used, so the first segment
    applies at the start of sampling (tau = 1) and the last at the end (tau = 0).
    """

    def __init__(self, segments: Sequence[Sequence[float]]) -> None:
        if not segments or any(len(s) != 2 or int(s[0]) < 1 or not math.isfinite(s[1]) for s in segments):
            raise ValueError(f"piecewise schedule needs [[count >= 1, finite value], ...], got {segments!r}")
        self.segments = [(int(c), float(v)) for c, v in segments]
        self.table = torch.tensor([v for c, v in self.segments for _ in range(c)], dtype=torch.float64)

    def __call__(self, tau: Tensor) -> Tensor:
        tau = torch.as_tensor(tau, dtype=torch.float64).clamp(0, 1)
        index = ((1 - tau) * len(self.table)).floor().long().clamp(0, len(self.table) - 1)
        return self.table[index]

    @property
    def always_zero(self) -> bool:
        return all(v == 0.0 for _, v in self.segments)

    def __repr__(self) -> str:
        return f"Piecewise({[list(s) for s in self.segments]})"


def as_schedule(value: float | GuidanceSchedule) -> GuidanceSchedule:
    """A number is a :class:`Constant`; a schedule is itself."""
    if isinstance(value, GuidanceSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a guidance weight is a number or a GuidanceSchedule, got {type(value).__name__}")
    return Constant(float(value))


class SigmaClock:
    """Normalised time tau of a noise level on a sampler's grid (tau = 1 - i / N at ``sigmas[i]``).

    Args:
        sigmas: the sampler's levels (N + 1,), decreasing, ending at 0.
    """

    def __init__(self, sigmas: Tensor) -> None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        if sigmas.numel() < 2 or bool((sigmas[1:] >= sigmas[:-1]).any()) or float(sigmas[-1]) < 0:
            raise ValueError("SigmaClock needs a strictly decreasing, nonnegative grid of noise levels")
        self.N = sigmas.numel() - 1
        positive = sigmas[sigmas > 0]
        self.log_levels = positive.log().flip(0)  # increasing
        self.taus = (1 - torch.arange(positive.numel(), dtype=torch.float64) / self.N).flip(0)  # matching, increasing

    def __call__(self, sigma: Tensor) -> Tensor:
        """tau of ``sigma`` (any shape) -> float64, same shape; 0 for sigma = 0, clamped to [0, 1]."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        log_sigma = sigma.clamp_min(1e-300).log()
        x, y = self.log_levels, self.taus
        if x.numel() == 1:
            tau = torch.full_like(log_sigma, float(y[0]))
        else:
            i = torch.searchsorted(x, log_sigma.contiguous()).clamp(1, x.numel() - 1)
            x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
            tau = y0 + (y1 - y0) * (log_sigma - x0) / (x1 - x0)
        # below the last positive level: interpolate linearly in sigma towards tau = 0 at sigma = 0
        lowest = float(x[0].exp())
        below = sigma < lowest
        tau = torch.where(below, float(y[0]) * sigma / lowest, tau)
        return tau.clamp(0, 1)


__all__ = [
    "Constant",
    "Cosine",
    "GuidanceSchedule",
    "Linear",
    "Piecewise",
    "SigmaClock",
    "Window",
    "as_schedule",
]
