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
from lightning_dpmot.sampling.linear_multistep import sample_ipndm
from lightning_dpmot.sampling.multistep import (
    UniPCVariant,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_unipc,
)
from lightning_dpmot.sampling.samplers import (
    NoiseSource,
    SampleResult,
    StepCallback,
    sample_ddpm_ho,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heun_stochastic,
)

SamplerName = Literal[
    "heun", "euler", "stochastic", "ddim", "ddpm", "ddpm_ho", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "ipndm_v"
]  # fmt: skip
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
_SECOND_ORDER = ("heun", "stochastic")
#: Allowed and default ``order`` of the samplers that take one.
_ORDERS: dict[str, tuple[tuple[int, ...], int]] = {
    "unipc": ((1, 2, 3), 2),
    "ipndm": ((1, 2, 3, 4), 4),
    "ipndm_v": ((1, 2, 3, 4), 4),
}


@dataclass
class SamplerSpec:
    """Which sampler, how many steps, on which noise levels.

    Args:
        name: "heun" (EDM Alg. 1, NFE = 2N - 1), "euler" (NFE = N), "stochastic" (EDM Alg. 2 with S_churn...,
            NFE = 2N - 1), "ddim" (eta-DDIM, NFE = N), "ddpm" (ancestral, eta = 1: posterior variance, no clipping,
            NFE = N), "ddpm_ho" (Ho et al.'s CIFAR-10 sampler: variance beta_t and x0 clipped to [-1, 1], NFE = N),
            "dpmpp_2m" /
            "dpmpp_3m" (DPM-Solver++(2M) / (3M), deterministic, NFE = N), "unipc" (UniPC, NFE = N), "ipndm"
            (iPNDM: Adams-Bashforth in sigma with constant-step weights, NFE = N), "ipndm_v" (the same with the
            weights of the actual uneven steps, NFE = N).
        num_steps: N, the number of noise levels before the final 0.
        schedule: "karras" (EDM's rho-schedule between sigma_min and sigma_max) or "timesteps" (a discrete
            model's own levels, uniformly spaced timesteps as in DDIM).
        rho: exponent of the Karras schedule (7 in EDM; AOT uses 90 / 72).
        sigma_min: smallest nonzero level (None: the model's default).
        sigma_max: starting level (None: the model's default; DPM-OT starts lower, at its junction level).
        eta: DDIM stochasticity (ddim only).
        S_churn: EDM churn (stochastic only); S_min, S_max: churn window; S_noise: noise inflation.
        order: UniPC's predictor order 1..3 (default 2; with the corrector the method has order + 1), or the
            Adams-Bashforth order 1..4 of ipndm / ipndm_v (default 4). None: the sampler's default.
        variant: UniPC's B(h): "bh1" (B = h) or "bh2" (B = e^h - 1, better at few steps) (unipc only).
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
    order: int | None = None
    variant: UniPCVariant = "bh2"

    def __post_init__(self) -> None:
        if self.name not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.name!r}; expected one of {', '.join(SAMPLER_NAMES)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.order is not None:
            allowed = _ORDERS.get(self.name, ((1, 2, 3), 2))[0]
            if self.order not in allowed:
                raise ValueError(f"{self.name}: order must be one of {allowed}, got {self.order}")
        if self.variant not in ("bh1", "bh2"):
            raise ValueError(f"variant must be 'bh1' or 'bh2', got {self.variant!r}")

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
    def resolved_order(self) -> int | None:
        """``order``, or the sampler's default where it takes one (unipc: 2, ipndm/ipndm_v: 4); else None."""
        if self.name not in _ORDERS:
            return None
        return self.order if self.order is not None else _ORDERS[self.name][1]

    @property
    def tag(self) -> str:
        """Short name for logs and tables, e.g. ``heun-karras-rho7``, ``unipc2-bh2-karras-rho7``, ``ipndm4-...``."""
        name = self.name
        if self.name == "unipc":
            name = f"unipc{self.resolved_order}-{self.variant}"
        elif self.name in _ORDERS:
            name = f"{self.name}{self.resolved_order}"
        if self.schedule == "karras":
            return f"{name}-karras-rho{self.rho:g}"
        return f"{name}-{self.schedule}"


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
    if spec.name == "dpmpp_2m":
        return sample_dpmpp_2m(denoiser, x, sigmas, **kwargs)
    if spec.name == "dpmpp_3m":
        return sample_dpmpp_3m(denoiser, x, sigmas, **kwargs)
    if spec.name == "unipc":
        return sample_unipc(denoiser, x, sigmas, order=spec.resolved_order or 2, variant=spec.variant, **kwargs)
    if spec.name in ("ipndm", "ipndm_v"):
        order = spec.resolved_order or 4
        return sample_ipndm(denoiser, x, sigmas, order=order, variable_step=spec.name == "ipndm_v", **kwargs)
    if spec.name == "ddpm_ho":
        return sample_ddpm_ho(denoiser, x, sigmas, **kwargs)
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
