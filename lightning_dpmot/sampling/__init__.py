"""Samplers with one signature, their noise-level schedules, and the shared sampler configuration."""

from lightning_dpmot.sampling.samplers import (
    SampleResult,
    ancestral_step,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heun_stochastic,
)
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SAMPLER_NAMES, SamplerSpec, run_sampler

__all__ = [
    "SAMPLER_NAMES",
    "SampleResult",
    "SamplerSpec",
    "ancestral_step",
    "karras_sigmas",
    "run_sampler",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_heun_stochastic",
]
