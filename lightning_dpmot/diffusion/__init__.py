"""Noise levels shared by all models: the denoiser interface, EDM preconditioning, and discrete VP schedules."""

from lightning_dpmot.diffusion.denoiser import CFGDenoiser, CountingDenoiser, Denoiser, append_dims
from lightning_dpmot.diffusion.edm import (
    EDMPrecond,
    edm_loss,
    edm_loss_weight,
    edm_precond,
    sample_sigma_lognormal,
)
from lightning_dpmot.diffusion.vp import VPEpsDenoiser, VPSchedule, cosine_betas, linear_betas

__all__ = [
    "CFGDenoiser",
    "CountingDenoiser",
    "Denoiser",
    "EDMPrecond",
    "VPEpsDenoiser",
    "VPSchedule",
    "append_dims",
    "cosine_betas",
    "edm_loss",
    "edm_loss_weight",
    "edm_precond",
    "linear_betas",
    "sample_sigma_lognormal",
]
