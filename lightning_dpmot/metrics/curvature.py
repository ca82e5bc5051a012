"""Straightness of probability-flow ODE trajectories (AOT's "lower curvature" claim, measured our way).

A trajectory is recorded at levels ``sigma_0 > sigma_1 > ... > sigma_N >= 0`` as states ``x_i`` (B, *S) and
denoised estimates ``D_i = D(x_i; sigma_i)``. The probability-flow ODE is
``dx/dsigma = d(x, sigma) = (x - D(x; sigma)) / sigma``; its path is a straight line traversed at constant
speed exactly when ``D`` stays constant (``x_i = D + sigma_i * n``). With ``dim`` the number of entries per
sample and ``I = {i : sigma_i > 0}`` (``D(x; 0) = x`` is no network evaluation, so levels at ``sigma = 0``
are skipped), per sample:

(a) straightness deviation ``mean_{i in I} ||D_i - x_N||^2 / dim``: how far the denoiser's guesses lie from
    the final sample; 0 for a straight path ending at ``sigma_N = 0``.
(b) curvature (Lee et al. 2023, in sigma time)
    ``mean_{i in I} ||d_i - (x_0 - x_N) / (sigma_0 - sigma_N)||^2 / dim`` with
    ``d_i = (x_i - D_i) / sigma_i``: the deviation of the ODE velocity from the chord's; 0 when straight.
    As in Lee et al., a change of speed along a straight line also counts.
(c) total variation ``sum_{i, i+1 in I} ||D_{i+1} - D_i|| / sqrt(dim)``: path length of the denoised
    estimate.

Any sampler that records its trajectory can feed these; :class:`TrajectoryRecorder` turns the step callback of
:mod:`lightning_dpmot.sampling.samplers` into the ``(xs, Ds, sigmas)`` tensors. Measure on a fine reference
solver (many Euler/Heun steps), so that solver error does not masquerade as curvature.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange
from torch import Tensor


def _check_trajectory(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> None:
    if xs.ndim < 3:
        raise ValueError(f"xs must have shape (T, B, *S), got {tuple(xs.shape)}")
    if denoised.shape != xs.shape:
        raise ValueError(f"denoised must have the shape of xs {tuple(xs.shape)}, got {tuple(denoised.shape)}")
    if sigmas.shape != (len(xs),):
        raise ValueError(f"sigmas must have shape ({len(xs)},) to match xs, got {tuple(sigmas.shape)}")
    if len(xs) < 2:
        raise ValueError(f"a trajectory needs at least 2 recorded levels, got {len(xs)}")
    if bool((sigmas[1:] >= sigmas[:-1]).any()) or bool(sigmas[-1] < 0):
        raise ValueError("sigmas must be strictly decreasing and non-negative")


def _flat(t: Tensor) -> Tensor:
    """(T, B, *S) -> (T, B, dim) in at least float32."""
    t = rearrange(t, "t b ... -> t b (...)")
    return t if t.dtype == torch.float64 else t.float()


def straightness_deviation(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> Tensor:
    """(a) ``mean_{sigma_i > 0} ||D_i - x_N||^2 / dim`` per sample.

    Args:
        xs: (T, B, *S) states at ``sigmas``; ``xs[-1]`` is the final sample.
        denoised: (T, B, *S) denoised estimates ``D(x_i; sigma_i)`` (ignored where ``sigma_i = 0``).
        sigmas: (T,) strictly decreasing levels.

    Returns:
        (B,) deviations.
    """
    _check_trajectory(xs, denoised, sigmas)
    x, d = _flat(xs), _flat(denoised)
    active = sigmas.to(x.device) > 0
    return (d[active] - x[-1]).square().mean(-1).mean(0)


def curvature(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> Tensor:
    """(b) ``mean_{sigma_i > 0} ||d_i - (x_0 - x_N) / (sigma_0 - sigma_N)||^2 / dim`` per sample.

    Args:
        xs: (T, B, *S) states at ``sigmas``.
        denoised: (T, B, *S) denoised estimates (ignored where ``sigma_i = 0``).
        sigmas: (T,) strictly decreasing levels.

    Returns:
        (B,) curvatures.
    """
    _check_trajectory(xs, denoised, sigmas)
    x, d = _flat(xs), _flat(denoised)
    s = sigmas.to(x.device, x.dtype)
    active = s > 0
    directions = (x[active] - d[active]) / rearrange(s[active], "t -> t 1 1")
    chord = (x[0] - x[-1]) / (s[0] - s[-1])
    return (directions - chord).square().mean(-1).mean(0)


def total_variation(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> Tensor:
    """(c) ``sum_{sigma_i, sigma_{i+1} > 0} ||D_{i+1} - D_i|| / sqrt(dim)`` per sample.

    Args:
        xs: (T, B, *S) states (only their shape is used).
        denoised: (T, B, *S) denoised estimates.
        sigmas: (T,) strictly decreasing levels.

    Returns:
        (B,) total variations (0 when fewer than two levels have ``sigma > 0``).
    """
    _check_trajectory(xs, denoised, sigmas)
    d = _flat(denoised)[sigmas.to(denoised.device) > 0]
    dim = d.shape[-1]
    return (d[1:] - d[:-1]).norm(dim=-1).sum(0) / dim**0.5


def trajectory_metrics(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> dict[str, Tensor]:
    """All per-sample measures: ``{"deviation", "curvature", "total_variation"}``, each (B,)."""
    return {
        "deviation": straightness_deviation(xs, denoised, sigmas),
        "curvature": curvature(xs, denoised, sigmas),
        "total_variation": total_variation(xs, denoised, sigmas),
    }


def mean_trajectory_metrics(xs: Tensor, denoised: Tensor, sigmas: Tensor) -> dict[str, float]:
    """Batch means of :func:`trajectory_metrics` as Python floats (for logging)."""
    return {name: value.mean().item() for name, value in trajectory_metrics(xs, denoised, sigmas).items()}


class TrajectoryRecorder:
    """Step callback that records a sampler's ODE trajectory.

    The samplers call ``callback({"i", "x_in", "x", "sigma", "sigma_next", "denoised"})`` after each step with
    the state ``x_i`` the step started from, the new state ``x_{i+1}`` and ``D(x_i; sigma_i)``. The recorder keeps
    the start state and closes the trajectory at the last level (at ``sigma_N = 0`` the denoised estimate is the
    sample itself). Pass it as the ``callback`` of a module's ``generate`` to record exactly the trajectories the
    module generates (for DPM-OT: from the OT-mapped latents at sigma_s).

    Args:
        x_start: (B, *S) the state the sampler starts from, at ``sigmas[0]`` (default: the first step's ``x_in``).
    """

    def __init__(self, x_start: Tensor | None = None) -> None:
        self.x_start = x_start.detach().clone() if x_start is not None else None
        self.steps: list[dict[str, Any]] = []

    def __call__(self, info: dict[str, Any]) -> None:
        if info["i"] != len(self.steps):
            raise ValueError(f"expected step {len(self.steps)}, got step {info['i']}: reuse of a recorder?")
        if self.x_start is None:
            self.x_start = info["x_in"].detach().clone()
        self.steps.append(
            {
                "x": info["x"].detach().clone(),
                "denoised": info["denoised"].detach().clone(),
                "sigma": float(info["sigma"]),
                "sigma_next": float(info["sigma_next"]),
            }
        )

    def stack(self) -> tuple[Tensor, Tensor, Tensor]:
        """The recorded trajectory.

        Returns:
            ``(xs, denoised, sigmas)``: (N + 1, B, *S), (N + 1, B, *S) and (N + 1,) float64, ready for
            :func:`trajectory_metrics`.
        """
        if not self.steps:
            raise ValueError("no steps recorded: pass the recorder as the sampler's callback first")
        if self.steps[-1]["sigma_next"] != 0.0:
            raise ValueError(f"the trajectory must end at sigma = 0, it ends at {self.steps[-1]['sigma_next']}")
        dtype = torch.float64
        x0 = self.x_start.to(self.steps[0]["x"].device, dtype)
        xs = torch.stack([x0] + [s["x"].to(dtype) for s in self.steps])
        denoised = torch.stack([s["denoised"].to(dtype) for s in self.steps] + [xs[-1]])
        sigmas = torch.tensor([s["sigma"] for s in self.steps] + [self.steps[-1]["sigma_next"]], dtype=dtype)
        return xs, denoised, sigmas.to(xs.device)
