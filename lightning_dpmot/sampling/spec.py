"""A sampler configuration that YAML files, the FID callback and ``dpmot predict`` share.

:class:`SamplerSpec` describes the ODE/SDE solver only; guidance is configured apart
(:class:`~lightning_dpmot.diffusion.guidance.GuidanceSpec`) and wraps the denoiser before it reaches the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import Denoiser
from lightning_dpmot.sampling.samplers import (
    NoiseSource,
    SampleResult,
    StepCallback,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heun_stochastic,
)

SamplerName = Literal["heun", "euler", "stochastic", "ddim", "ddpm"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
_SECOND_ORDER = ("heun", "stochastic")


@dataclass
class SamplerSpec:
    """Which sampler, how many steps, on which noise levels.

    Args:
        name: "heun" (EDM Alg. 1, NFE = 2N - 1), "euler" (NFE = N), "stochastic" (EDM Alg. 2 with S_churn...,
            NFE = 2N - 1), "ddim" (eta-DDIM, NFE = N), "ddpm" (ancestral, eta = 1, NFE = N).
        num_steps: N, the number of noise levels before the final 0.
        schedule: "karras" (EDM's rho-schedule between sigma_min and sigma_max) or "timesteps" (a discrete
            model's own levels, uniformly spaced timesteps as in DDIM).
        rho: exponent of the Karras schedule (7 in EDM; AOT uses 90 / 72).
        sigma_min: smallest nonzero level (None: the model's default).
        sigma_max: starting level (None: the model's default; DPM-OT starts lower, at its junction level).
        eta: DDIM stochasticity (ddim only).
        S_churn: EDM churn (stochastic only); S_min, S_max: churn window; S_noise: noise inflation.
    """

    name: SamplerName = "heun"
    num_steps: int = 18
    schedule: Literal["karras", "timesteps"] = "karras"
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    eta: float = 0.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")

    @property
    def nfe(self) -> int:
        """Network function evaluations this spec costs (Heun skips the correction at sigma = 0)."""
        return 2 * self.num_steps - 1 if self.name in _SECOND_ORDER else self.num_steps

    @classmethod
    def from_nfe(cls, name: SamplerName, nfe: int, **kwargs: object) -> SamplerSpec:
        """The spec with the given NFE (for 2nd-order samplers NFE must be odd: N = (NFE + 1) / 2)."""
        if name in _SECOND_ORDER:
            if nfe % 2 == 0:
                raise ValueError(f"{name} uses 2N - 1 evaluations, so NFE must be odd; got {nfe}")
            return cls(name=name, num_steps=(nfe + 1) // 2, **kwargs)  # type: ignore[arg-type]
        return cls(name=name, num_steps=nfe, **kwargs)  # type: ignore[arg-type]

    @property
    def tag(self) -> str:
        """Short name for logs and tables, e.g. ``heun-karras-rho7``."""
        if self.schedule == "karras":
            return f"{self.name}-karras-rho{self.rho:g}"
        return f"{self.name}-{self.schedule}"


def run_sampler(
    spec: SamplerSpec,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond | None = None,
    generator: torch.Generator | NoiseSource | None = None,
    callback: StepCallback | None = None,
) -> SampleResult:
    """Run the sampler named by ``spec`` from ``x`` at ``sigmas[0]`` (see :mod:`lightning_dpmot.sampling.samplers`).

    ``denoiser`` is used as given: wrap it for guidance first (:meth:`GuidanceSpec.wrap`).
    """
    kwargs = {"cond": cond, "generator": generator, "callback": callback}
    if spec.name == "heun":
        return sample_heun(denoiser, x, sigmas, **kwargs)
    if spec.name == "euler":
        return sample_euler(denoiser, x, sigmas, **kwargs)
    if spec.name == "stochastic":
        return sample_heun_stochastic(
            denoiser,
            x,
            sigmas,
            S_churn=spec.S_churn,
            S_min=spec.S_min,
            S_max=spec.S_max,
            S_noise=spec.S_noise,
            **kwargs,
        )
    eta = 1.0 if spec.name == "ddpm" else spec.eta
    return sample_euler_ancestral(denoiser, x, sigmas, eta=eta, **kwargs)
