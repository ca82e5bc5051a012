"""LightningModules (training and sampling logic only; networks live in :mod:`lightning_dpmot.nets`)."""

from lightning_dpmot.models.base import DiffusionModule, NetFactory
from lightning_dpmot.models.dpm import DPMModule
from lightning_dpmot.models.dpm_ot import DPMOTModule, load_diffusion_module
from lightning_dpmot.models.edm import EDMModule
from lightning_dpmot.models.generation import GenerativeModule
from lightning_dpmot.models.matching import ContrastiveMatchingModule
from lightning_dpmot.models.semidiscrete import SemiDiscreteOTModule, load_ot_checkpoint
from lightning_dpmot.models.text2img import TextToImageModule

__all__ = [
    "ContrastiveMatchingModule",
    "DPMModule",
    "DPMOTModule",
    "DiffusionModule",
    "EDMModule",
    "GenerativeModule",
    "NetFactory",
    "SemiDiscreteOTModule",
    "TextToImageModule",
    "load_diffusion_module",
    "load_ot_checkpoint",
]
