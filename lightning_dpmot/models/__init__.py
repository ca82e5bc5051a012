"""LightningModules (training and sampling logic only; networks live in :mod:`lightning_dpmot.nets`)."""

from lightning_dpmot.models.base import DiffusionModule, NetFactory
from lightning_dpmot.models.edm import EDMModule

__all__ = ["DiffusionModule", "EDMModule", "NetFactory"]
