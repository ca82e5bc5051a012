"""Cross-modal (CLIP) guidance through the predicted clean image, in EDM's sigma space (UPainting, notes §2.3).

A frozen image-text matching model scores augmented views of the predicted clean image against the prompt; the
gradient of that loss w.r.t. the noisy input shifts the denoiser's output. In EDM notation (x = y + sigma n,
``D`` = the classifier-free-guided denoiser, ``eps_hat = (x - D) / sigma``) and with the VP quantities of the same
level, ``sigma_vp = sigma / sqrt(1 + sigma^2)`` (= sqrt(1 - alpha_bar)) and ``x_vp = x / sqrt(1 + sigma^2)``:

1. ``x0_hat = D(x, sigma, c)``  (CFG-combined, conditional prompt embeddings)
2. ``x' = sigma_vp * x0_hat + (1 - sigma_vp) * x_vp`` (``blend``; crowsonkb / Disco / UPainting's fac = sigma_t
   blend) or ``x' = x0_hat``
3. ``L(x) = sum_k w_k mean_views d(E_I^k(view(x')), e_k) + range_weight * range(x0_hat) + tv_weight * tv(x')``
   with ``d`` the spherical distance ``2 arcsin(|u - v| / 2)^2`` (or ``1 - cos``), e_k the k-th model's
   normalised text embedding of its prompt
4. ``g_vp = sqrt(1 + sigma^2) * grad_x L`` — the gradient w.r.t. ``x_vp``; through the U-Net
   (``grad_through_unet``) or with ``D`` held constant (then ``d x0_hat / d x = I``)
5. ``g_vp = 0`` for a sample whose gradient is not finite; ``step = clamp_rms(s(tau) * g_vp, clamp_rms)`` per sample
   (Disco's clamp of the scaled gradient: ``step * min(rms, c) / rms``)
6. ``eps_tilde = eps_hat + sigma_vp * step``  (guided-diffusion's ``condition_score``: eps - sqrt(1 - a) grad log p)
7. returned: ``D_tilde = x - sigma * eps_tilde = D - sigma * sigma_vp * step``

Without the clamp this is ``D_tilde = D - s sigma^2 grad_x L``: the score ``(D - x) / sigma^2`` plus
``-s grad_x L``, i.e. sampling from ``p(x) exp(-s L)``. The prompt embeddings, per-sample seeds of the views and
the guidance's own entries travel in the condition mapping (``guide{k}``, ``guide_seed``) and are removed before
the inner denoiser is called.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.cutouts import CutoutSpec, make_cutouts
from lightning_dpmot.diffusion.denoiser import Denoiser, append_dims
from lightning_dpmot.diffusion.guidance_schedules import GuidanceSchedule, SigmaClock, as_schedule
from lightning_dpmot.utils.random import make_generator

GUIDE_SEED = "guide_seed"
_VIEWS = 0x5C07  # generator purpose tag of the views


class MatchingModelLike(Protocol):
    """What guidance needs from an image-text matching model (:class:`~lightning_dpmot.nets.matching.MatchingModel`)."""

    image_size: int

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> Tensor: ...


def spherical_distance(u: Tensor, v: Tensor) -> Tensor:
    """``2 arcsin(|u_hat - v_hat| / 2)^2`` = theta^2 / 2 for the angle theta between u and v; (..., M) -> (...)."""
    chord = (F.normalize(u, dim=-1) - F.normalize(v, dim=-1)).norm(dim=-1)
    return 2 * torch.arcsin((chord / 2).clamp(max=1.0)).pow(2)


def cosine_distance(u: Tensor, v: Tensor) -> Tensor:
    """``1 - cos(u, v)``; (..., M) -> (...)."""
    return 1 - F.cosine_similarity(u, v, dim=-1)


def range_loss(x: Tensor) -> Tensor:
    """Per-sample mean squared excess over [-1, 1]: (B, ...) -> (B,)."""
    return (x - x.clamp(-1, 1)).pow(2).flatten(1).mean(1)


def tv_loss(x: Tensor) -> Tensor:
    """Per-sample L2 total variation (mean squared neighbour differences): (B, C, H, W) -> (B,)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).flatten(1).mean(1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).flatten(1).mean(1)
    return dx + dy


def clamp_rms(g: Tensor, max_rms: float | None) -> Tensor:
    """Scale each sample of ``g`` (B, ...) down to RMS ``max_rms`` if above it (None = no clamp)."""
    if max_rms is None:
        return g
    rms = g.pow(2).flatten(1).mean(1).sqrt()
    factor = torch.where(rms > max_rms, max_rms / rms.clamp_min(1e-30), torch.ones_like(rms))
    return g * append_dims(factor, g.ndim)


def finite_or_zero(g: Tensor) -> Tensor:
    """Zero every sample of ``g`` (B, ...) that holds a NaN or an infinity (the NaN/inf guard)."""
    ok = torch.isfinite(g).flatten(1).all(1)
    return torch.where(append_dims(ok, g.ndim), g, torch.zeros_like(g))


_MODELS: dict[str, Any] = {}


@dataclass
class GuideModel:
    """One matching model of the guidance.

    Args:
        source: a ``.ckpt`` of :class:`~lightning_dpmot.models.matching.ContrastiveMatchingModule` or a local
            Hugging Face CLIP / Chinese-CLIP directory (loaded once per process, frozen).
        weight: its weight w_k in the loss.
        text_key: the raw-condition entry with its prompts (``caption_en``; ``caption_zh`` for a bilingual or
            Chinese model: the LM and the matching model may read different lines of a bilingual pair).
        model: an already loaded model (Python use; then ``source`` is only its name).
    """

    source: str
    weight: float = 1.0
    text_key: str = "caption_en"
    model: Any = field(default=None, repr=False, compare=False)

    def load(self) -> MatchingModelLike:
        if self.model is not None:
            return self.model
        if self.source not in _MODELS:
            from lightning_dpmot.nets.matching import load_matching_model

            _MODELS[self.source] = load_matching_model(self.source)
        return _MODELS[self.source]


@dataclass
class CrossModalSpec:
    """Cross-modal guidance configuration (YAML ``guidance: {cross_modal: {...}}``).

    Args:
        guides: the matching models (weights and prompt entries each).
        scale: s(tau), a number or a :class:`~lightning_dpmot.diffusion.guidance_schedules.GuidanceSchedule`.
        cutouts: views and augmentations (counts may be schedules).
        loss: ``spherical`` (Disco / v-diffusion / Paddle) or ``cosine``.
        blend: score ``sigma_vp * x0_hat + (1 - sigma_vp) * x_vp`` (True) or ``x0_hat`` itself.
        range_weight: weight of the range loss on x0_hat (Disco: 150 against a CLIP scale of 5000, i.e. 0.03).
        tv_weight: weight of the total-variation loss on the scored image.
        clamp_rms: per-sample RMS cap of ``s * g_vp`` (Disco / Paddle: 0.05; None: no cap).
        grad_through_unet: backpropagate through the denoiser (True) or hold its output constant (cheap).
        grad_checkpoint: recompute the denoiser's activations in the backward pass instead of keeping them.
        cut_batches: repeat the view sampling this many times and average the gradients (memory vs variance).
    """

    guides: list[GuideModel]
    scale: float | GuidanceSchedule = 10.0
    cutouts: CutoutSpec = field(default_factory=CutoutSpec)
    loss: Literal["spherical", "cosine"] = "spherical"
    blend: bool = True
    range_weight: float = 0.03
    tv_weight: float = 0.0
    clamp_rms: float | None = 0.05
    grad_through_unet: bool = True
    grad_checkpoint: bool = False
    cut_batches: int = 1

    def __post_init__(self) -> None:
        if not self.guides:
            raise ValueError("cross-modal guidance needs at least one matching model in guides")
        self.guides = [GuideModel(**g) if isinstance(g, Mapping) else g for g in self.guides]
        if isinstance(self.cutouts, Mapping):
            self.cutouts = CutoutSpec(**self.cutouts)
        if self.loss not in ("spherical", "cosine"):
            raise ValueError(f"cross-modal loss must be 'spherical' or 'cosine', got {self.loss!r}")
        if self.cut_batches < 1:
            raise ValueError(f"cut_batches must be >= 1, got {self.cut_batches}")
        if self.clamp_rms is not None and not self.clamp_rms > 0:
            raise ValueError(f"clamp_rms must be > 0 or None, got {self.clamp_rms}")
        self.scale = as_schedule(self.scale)

    @property
    def active(self) -> bool:
        return not self.scale.always_zero  # type: ignore[union-attr]

    def with_text_key(self, key: str) -> CrossModalSpec:
        """A copy whose matching models all read the raw-condition entry ``key``."""
        return replace(self, guides=[replace(g, text_key=key) for g in self.guides])

    def prepare(self, raw: Mapping[str, Any] | None, seeds: Tensor, device: torch.device | str) -> Cond:
        """The guidance's condition entries for a request: ``guide{k}`` (B, M_k) normalised prompt embeddings of
        model k and ``guide_seed`` (B,) (the views' per-sample seeds)."""
        raw = raw or {}
        out: Cond = {GUIDE_SEED: torch.as_tensor(seeds, dtype=torch.long).to(device)}
        for k, guide in enumerate(self.guides):
            if guide.text_key not in raw:
                raise KeyError(
                    f"cross-modal guide {guide.source!r} reads prompts from {guide.text_key!r}, which the request "
                    f"does not have (it has {sorted(raw)})"
                )
            texts = list(raw[guide.text_key])
            if len(texts) != len(seeds):
                raise ValueError(f"{len(texts)} prompts under {guide.text_key!r} for {len(seeds)} seeds")
            with torch.no_grad():
                out[f"guide{k}"] = F.normalize(guide.load().encode_text(texts).float(), dim=-1).to(device)
        return out

    def wrap(self, denoiser: Denoiser, sigmas: Tensor) -> CrossModalDenoiser:
        return CrossModalDenoiser(denoiser, self, SigmaClock(sigmas))


class CrossModalDenoiser:
    """The cross-modally guided denoiser around ``denoiser`` (the module docstring gives the exact update)."""

    def __init__(self, denoiser: Denoiser, spec: CrossModalSpec, clock: SigmaClock) -> None:
        self.denoiser, self.spec, self.clock = denoiser, spec, clock
        self.models = [g.load() for g in spec.guides]
        self.calls = 0
        self.last: dict[str, Tensor] = {}  # diagnostics of the last guided call (loss, rms of the step)

    def _inner(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        if self.spec.grad_checkpoint:
            return checkpoint(self.denoiser, x, sigma, cond, use_reentrant=False)
        return self.denoiser(x, sigma, cond)

    def match_loss(self, image: Tensor, cond: Cond, tau: float, round_: int) -> Tensor:
        """Per-sample matching loss (B,) of ``image`` (B, C, H, W): weighted mean distance over the views."""
        seeds = cond[GUIDE_SEED].tolist()
        total = image.new_zeros(image.shape[0])
        dist = spherical_distance if self.spec.loss == "spherical" else cosine_distance
        for k, (guide, model) in enumerate(zip(self.spec.guides, self.models, strict=True)):
            gens = [make_generator(s, _VIEWS, self.calls, round_, k, device=image.device) for s in seeds]
            views = make_cutouts(image, model.image_size, self.spec.cutouts, tau, gens)  # (B, n, C, S, S)
            B, n = views.shape[:2]
            emb = model.encode_image(views.flatten(0, 1)).view(B, n, -1)
            total = total + guide.weight * dist(emb, cond[f"guide{k}"][:, None, :].to(emb)).mean(1)
        return total

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond | None = None) -> Tensor:
        cond = dict(cond or {})
        own_keys = {GUIDE_SEED, *(f"guide{k}" for k in range(len(self.spec.guides)))}
        own = {k: cond.pop(k) for k in list(cond) if k in own_keys}
        inner_cond = cond or None
        tau = self.clock(sigma).to(x.device)
        s = self.spec.scale(tau).to(x)  # type: ignore[operator]
        if not bool((s != 0).any()):
            return self.denoiser(x, sigma, inner_cond)
        if not own:
            raise KeyError("cross-modal guidance needs its prompt embeddings in the condition (GuidanceSpec.prepare)")
        spec = self.spec
        with torch.inference_mode(False), torch.enable_grad():
            x_req = x.detach().clone().requires_grad_(True)
            if spec.grad_through_unet:
                d = self._inner(x_req, sigma, inner_cond)
            else:
                with torch.no_grad():
                    d_const = self.denoiser(x, sigma, inner_cond)
                d = d_const + (x_req - x_req.detach())  # D held constant: d x0_hat / d x = I
            c = append_dims(torch.sqrt(1 + sigma.to(x).pow(2)), x.ndim)
            sigma_vp = append_dims(sigma.to(x), x.ndim) / c
            scored = sigma_vp * d + (1 - sigma_vp) * x_req / c if spec.blend else d
            leaf = scored.detach().float().requires_grad_(True)
            grad_scored = torch.zeros_like(leaf)
            loss_total = torch.zeros(x.shape[0], device=x.device)
            for r in range(spec.cut_batches):
                loss = self.match_loss(leaf, own, float(tau[0]), r) / spec.cut_batches
                if r == 0 and spec.tv_weight:
                    loss = loss + spec.tv_weight * tv_loss(leaf)
                grad_scored += torch.autograd.grad(loss.sum(), leaf)[0]
                loss_total += loss.detach()
            outputs, grads = [scored], [grad_scored.to(scored.dtype)]
            if spec.range_weight:
                d_leaf = d.detach().requires_grad_(True)
                r_loss = spec.range_weight * range_loss(d_leaf)
                outputs.append(d)
                grads.append(torch.autograd.grad(r_loss.sum(), d_leaf)[0])
                loss_total += r_loss.detach().float()
            g = torch.autograd.grad(outputs, x_req, grads)[0]
        g_vp = finite_or_zero(g.detach() * c)
        step = clamp_rms(append_dims(s, x.ndim) * g_vp, spec.clamp_rms)
        self.calls += 1
        self.last = {"loss": loss_total, "step_rms": step.pow(2).flatten(1).mean(1).sqrt(), "tau": tau}
        return d.detach() - append_dims(sigma.to(x), x.ndim) * sigma_vp * step


__all__ = [
    "GUIDE_SEED",
    "CrossModalDenoiser",
    "CrossModalSpec",
    "GuideModel",
    "MatchingModelLike",
    "clamp_rms",
    "cosine_distance",
    "finite_or_zero",
    "range_loss",
    "spherical_distance",
    "tv_loss",
]
