"""Noise levels shared by all models: the denoiser interface, conditioning mappings, guidance wrappers, EDM
preconditioning, discrete VP schedules, guidance schedules and cross-modal guidance."""

from lightning_dpmot.diffusion.conditioning import ClassConditioner, Cond, Conditioner, cond_cat
from lightning_dpmot.diffusion.cross_modal import CrossModalDenoiser, CrossModalSpec, GuideModel
from lightning_dpmot.diffusion.cutouts import CutoutSpec
from lightning_dpmot.diffusion.denoiser import CountingDenoiser, Denoiser, append_dims
from lightning_dpmot.diffusion.edm import (
    EDMPrecond,
    edm_loss,
    edm_loss_weight,
    edm_precond,
    sample_sigma_lognormal,
)
from lightning_dpmot.diffusion.guidance import CFGDenoiser, GuidanceSpec
from lightning_dpmot.diffusion.guidance_schedules import (
    Constant,
    Cosine,
    GuidanceSchedule,
    Linear,
    Piecewise,
    SigmaClock,
    Window,
)
from lightning_dpmot.diffusion.vp import VPEpsDenoiser, VPSchedule, cosine_betas, linear_betas

__all__ = [
    "CFGDenoiser",
    "Constant",
    "Cosine",
    "CrossModalDenoiser",
    "CrossModalSpec",
    "CutoutSpec",
    "GuideModel",
    "GuidanceSchedule",
    "Linear",
    "Piecewise",
    "SigmaClock",
    "Window",
    "ClassConditioner",
    "Cond",
    "Conditioner",
    "CountingDenoiser",
    "Denoiser",
    "EDMPrecond",
    "GuidanceSpec",
    "VPEpsDenoiser",
    "VPSchedule",
    "append_dims",
    "cond_cat",
    "cosine_betas",
    "edm_loss",
    "edm_loss_weight",
    "edm_precond",
    "linear_betas",
    "sample_sigma_lognormal",
]
