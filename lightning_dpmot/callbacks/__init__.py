"""Lightning callbacks: EMA, sample grids, FID during training, prediction writer."""

from lightning_dpmot.callbacks.ema import EMAHalfLife, ema_beta
from lightning_dpmot.callbacks.fid import FIDCallback
from lightning_dpmot.callbacks.nfe_sweep import NFESweep
from lightning_dpmot.callbacks.predict_writer import SampleWriter
from lightning_dpmot.callbacks.samples import SampleGrid

__all__ = ["EMAHalfLife", "FIDCallback", "NFESweep", "SampleGrid", "SampleWriter", "ema_beta"]
