"""Discriminator Guidance (Kim et al., ICML 2023) as a denoiser wrapper.

A time-dependent discriminator d(x_sigma, sigma) separates noised data from noised model samples (both noised
as x_sigma = x_0 + sigma n). At its optimum d* = p_data,sigma / (p_data,sigma + p_theta,sigma), so its logit
l = log(d / (1 - d)) = log p_data,sigma - log p_theta,sigma and

    grad_x l(x, sigma) = grad_x log p_data,sigma(x) - grad_x log p_theta,sigma(x),

the error of the model's score. With score = (D - x) / sigma^2 (Tweedie), the corrected denoiser is

    D_DG(x; sigma, c) = D(x; sigma, c) + w * sigma^2 * grad_x l(x, sigma)     for sigma_min <= sigma <= sigma_max

and D elsewhere. ``w = 1`` with the exact discriminator turns the model's denoiser into the data's (the tests
check this on Gaussians in closed form); DG's default is ``w = 2`` (``dg_weight_1st_order``) on
tau in [0.01, 1] of the VP-SDE (beta 0.1 -> 20), i.e. sigma in [0.045, 152]. The gradient is taken with autograd
enabled and outside inference mode whatever the caller's mode; the correction is a constant for an outer
autograd graph (a wrapper around this one differentiates through D only). NFE counts only calls of D.

The discriminator is unconditional (the condition is passed to D only). :class:`DiscriminatorGuidanceSpec` is the
YAML entry ``guidance: {discriminator: {checkpoint: ..., weight: 2.0}}``, read by
:class:`~lightning_dpmot.diffusion.guidance.GuidanceSpec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.denoiser import Denoiser, append_dims

#: A discriminator logit l(x, sigma): (B, *S), (B,) -> (B,).
LogitFn = Callable[[Tensor, Tensor], Tensor]

_LOADED: dict[str, nn.Module] = {}


def load_discriminator(checkpoint: str | Path) -> nn.Module:
    """The frozen :class:`~lightning_dpmot.nets.discriminator.TimeDiscriminator` of a ``DiscriminatorModule``
    checkpoint (``torch.load(weights_only=True)``; loaded once per process). A missing or unusable file raises
    one error naming it (``FileNotFoundError`` / ``CheckpointError``)."""
    key = str(Path(checkpoint).expanduser())
    if key not in _LOADED:
        from lightning_dpmot.models.discriminator import DiscriminatorModule
        from lightning_dpmot.utils.checkpoint_io import CheckpointError, load_checkpoint, load_lightning_module

        if not Path(key).is_file():
            raise FileNotFoundError(f"discriminator guidance: checkpoint not found: {key}")
        hparams = load_checkpoint(key).get("hyper_parameters") or {}
        class_path = str(hparams.get("_class_path", ""))
        held = class_path.rsplit(".", 1)[-1]
        if held and held != DiscriminatorModule.__name__:  # no class recorded (saved outside the CLI): try it
            raise CheckpointError(
                f"discriminator guidance: checkpoint {key} holds a {held}, not a DiscriminatorModule "
                "(train one with configs/dg/digits_disc.yaml)"
            )
        module = load_lightning_module(key, cls=DiscriminatorModule)
        net = module.net.eval()
        net.requires_grad_(False)
        _LOADED[key] = net
    return _LOADED[key]


def logit_gradient(logit: LogitFn, x: Tensor, sigma: Tensor) -> Tensor:
    """grad_x l(x, sigma) summed per sample, (B, *S) in x's dtype; works under no_grad and inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (the logit may cast)
        x_req = x.detach().clone().to(dtype).requires_grad_(True)
        out = logit(x_req, sigma.detach().clone().to(dtype))
        (grad,) = torch.autograd.grad(out.sum(), x_req)
    return grad.to(x.dtype)


class DGDenoiser:
    """``D_DG = D + w sigma^2 grad_x l`` inside ``[sigma_min, sigma_max]`` (module docstring).

    Args:
        denoiser: the (possibly CFG-) guided denoiser D(x, sigma, cond).
        logit: the discriminator's logit l(x, sigma) (a module is moved to x's device on first use).
        weight: w.
        sigma_min, sigma_max: the noise levels where guidance acts (inclusive).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        logit: LogitFn,
        weight: float = 2.0,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
    ) -> None:
        if not sigma_min <= sigma_max:
            raise ValueError(f"need sigma_min <= sigma_max, got {sigma_min} and {sigma_max}")
        self.denoiser, self.logit, self.weight = denoiser, logit, float(weight)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.last: dict[str, Tensor] = {}  # diagnostics of the last guided call

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        d = self.denoiser(x, sigma, cond)
        s = sigma.reshape(-1).expand(x.shape[0]).to(x.device)
        active = (s >= self.sigma_min) & (s <= self.sigma_max)
        if self.weight == 0.0 or not bool(active.any()):
            return d
        if isinstance(self.logit, nn.Module):
            self.logit.to(x.device)
        grad = logit_gradient(self.logit, x, s)
        scale = torch.where(active, self.weight * s.to(grad.dtype) ** 2, torch.zeros_like(s, dtype=grad.dtype))
        correction = append_dims(scale, x.ndim) * grad
        self.last = {"correction_rms": correction.float().pow(2).flatten(1).mean(1).sqrt(), "sigma": s}
        return d + correction.detach().to(d.dtype)


@dataclass
class DiscriminatorGuidanceSpec:
    """Discriminator guidance configuration (YAML ``guidance: {discriminator: {...}}``).

    Args:
        checkpoint: a ``DiscriminatorModule`` checkpoint (``dpmot fit --config configs/dg/digits_disc.yaml``).
        weight: w (DG: 2 on the first-order direction).
        sigma_min, sigma_max: the window (DG: VP tau in [0.01, 1], sigma in [0.045, 152]).
        model: an already loaded logit l(x, sigma) (Python use; then ``checkpoint`` is only its name).
    """

    checkpoint: str
    weight: float = 2.0
    sigma_min: float = 0.045
    sigma_max: float = 152.0
    model: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not float("-inf") < self.weight < float("inf"):
            raise ValueError(f"discriminator guidance weight must be finite, got {self.weight}")
        if not 0.0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 <= sigma_min <= sigma_max, got {self.sigma_min} and {self.sigma_max}")

    @property
    def active(self) -> bool:
        return self.weight != 0.0

    def load(self) -> LogitFn:
        return self.model if self.model is not None else load_discriminator(self.checkpoint)

    def wrap(self, denoiser: Denoiser) -> DGDenoiser:
        return DGDenoiser(denoiser, self.load(), self.weight, self.sigma_min, self.sigma_max)


__all__ = ["DGDenoiser", "DiscriminatorGuidanceSpec", "LogitFn", "load_discriminator", "logit_gradient"]
