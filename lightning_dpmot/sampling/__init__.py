"""Samplers with one signature, their noise-level schedules, and the shared sampler configuration."""

from lightning_dpmot.sampling.linear_multistep import sample_ipndm, variable_step_weights
from lightning_dpmot.sampling.multistep import (
    dpmpp_multistep_step,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_unipc,
    unipc_coefficients,
    unipc_step,
)
from lightning_dpmot.sampling.samplers import (
    SampleResult,
    ancestral_step,
    sample_ddpm_ho,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_heun_stochastic,
)
from lightning_dpmot.sampling.schedules import karras_sigmas
from lightning_dpmot.sampling.spec import SAMPLER_NAMES, SamplerSpec, run_sampler

__all__ = [
    "sample_ddpm_ho",
    "SAMPLER_NAMES",
    "SampleResult",
    "SamplerSpec",
    "ancestral_step",
    "dpmpp_multistep_step",
    "karras_sigmas",
    "run_sampler",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_heun_stochastic",
    "sample_ipndm",
    "sample_unipc",
    "unipc_coefficients",
    "unipc_step",
    "variable_step_weights",
]
