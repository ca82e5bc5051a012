"""lightning_dpmot: diffusion models with optimal transport on PyTorch Lightning."""

__version__ = "0.1.0"
