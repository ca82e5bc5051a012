"""Lightning callbacks: EMA, sample grids, prediction writer."""

from lightning_dpmot.callbacks.ema import EMAHalfLife, ema_beta
from lightning_dpmot.callbacks.predict_writer import SampleWriter
from lightning_dpmot.callbacks.samples import SampleGrid

__all__ = ["EMAHalfLife", "SampleGrid", "SampleWriter", "ema_beta"]
