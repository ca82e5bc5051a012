"""Lightning callbacks: checkpoints, EMA, OT noise-data coupling, sample grids, FID (training, per NFE), predictions,
prompt-set evaluation."""

from lightning_dpmot.callbacks.checkpoint import LastCheckpoint
from lightning_dpmot.callbacks.ema import EMAHalfLife, ema_beta
from lightning_dpmot.callbacks.fid import FIDCallback
from lightning_dpmot.callbacks.nfe_sweep import NFESweep
from lightning_dpmot.callbacks.nonfinite import NonFiniteGuard
from lightning_dpmot.callbacks.ot_coupling import OTCouplingCallback
from lightning_dpmot.callbacks.predict_writer import SampleWriter
from lightning_dpmot.callbacks.prompt_eval import PromptSetEvaluation
from lightning_dpmot.callbacks.samples import SampleGrid
from lightning_dpmot.callbacks.signals import GracefulShutdown

__all__ = [
    "EMAHalfLife",
    "FIDCallback",
    "GracefulShutdown",
    "LastCheckpoint",
    "NFESweep",
    "NonFiniteGuard",
    "OTCouplingCallback",
    "PromptSetEvaluation",
    "SampleGrid",
    "SampleWriter",
    "ema_beta",
]
