"""Differentiable cutouts and augmentations for cross-modal guidance.

Pixel gradients of a clean image-text matching model are adversarial (notes §7): CLIP-guided samplers therefore
score many randomly cropped and augmented views of the predicted image instead of the image itself (v-diffusion's
``MakeCutouts``; Disco Diffusion's overview views plus inner crops, flips, small affine jitter, grayscale and noise).
Here every view is one affine resampling (``affine_grid`` + ``grid_sample``, bilinear), so the whole set is a
single differentiable batched op at the matching model's input size:

- **overview** views: the whole image, randomly h-flipped;
- **inner** crops: squares of side ``(u ** cut_pow) * (1 - min_size) + min_size`` of the image side
  (u ~ U[0, 1]; ``cut_pow > 1`` favours small crops) at a uniform position inside the image;
- then per view: rotation by U[-rotate_deg, rotate_deg], translation by U[-translate, translate] of the side,
  grayscale with probability ``gray_p``, Gaussian noise of std ``noise_std`` (in [0, 1] image units).

Randomness comes from one generator per sample, so a sample's views do not depend on the rest of its batch.
Counts may be schedules of the normalised time tau (Disco's ``cut_overview="[12]*400+[4]*600"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor

from lightning_dpmot.diffusion.guidance_schedules import GuidanceSchedule, as_schedule

#: ITU-R 601 luma weights (grayscale views).
LUMA = (0.299, 0.587, 0.114)


@dataclass
class CutoutSpec:
    """How many views of the predicted image the matching model sees, and how they are augmented.

    Args:
        overview: whole-image views per sample (a number or a schedule of tau; rounded).
        inner: random square crops per sample (a number or a schedule of tau; rounded).
        cut_pow: crop-size exponent (1 = uniform sizes; > 1 favours small crops).
        min_size: smallest crop side as a fraction of the image side, in (0, 1].
        flip_p: probability of a horizontal flip per view.
        rotate_deg: maximal rotation (degrees) per view.
        translate: maximal shift per view, as a fraction of the side.
        gray_p: probability of a grayscale view.
        noise_std: std of Gaussian noise added to each view, in [0, 1] image units.
    """

    overview: float | GuidanceSchedule = 2
    inner: float | GuidanceSchedule = 6
    cut_pow: float = 1.0
    min_size: float = 0.5
    flip_p: float = 0.5
    rotate_deg: float = 10.0
    translate: float = 0.05
    gray_p: float = 0.1
    noise_std: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= 1:
            raise ValueError(f"cutouts: min_size must be in (0, 1], got {self.min_size}")
        for name in ("flip_p", "gray_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"cutouts: {name} must be a probability, got {getattr(self, name)}")
        if self.cut_pow <= 0 or self.rotate_deg < 0 or self.translate < 0 or self.noise_std < 0:
            raise ValueError("cutouts: cut_pow must be > 0 and rotate_deg, translate, noise_std >= 0")
        self.overview, self.inner = as_schedule(self.overview), as_schedule(self.inner)

    def counts(self, tau: float) -> tuple[int, int]:
        """(overview, inner) view counts at normalised time ``tau`` (at least one view in all)."""
        n_over = max(0, round(self.overview.at(tau)))  # type: ignore[union-attr]
        n_inner = max(0, round(self.inner.at(tau)))  # type: ignore[union-attr]
        if n_over + n_inner == 0:
            raise ValueError(f"cutouts: no view at tau={tau:.3f} (overview and inner are both 0)")
        return n_over, n_inner


def cutout_params(spec: CutoutSpec, n_over: int, n_inner: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random parameters of ``n = n_over + n_inner`` views of one image (all (n,) float64 on the generator's
    device): ``scale`` (crop side / image side), ``cx``, ``cy`` (crop centre in [-1, 1] coordinates), ``flip``
    (+-1), ``angle`` (radians), ``gray`` (0/1)."""
    n = n_over + n_inner
    dev = generator.device

    def u(k: int = n) -> Tensor:
        return torch.rand(k, generator=generator, device=dev, dtype=torch.float64)

    size = u(n_inner).pow(spec.cut_pow) * (1 - spec.min_size) + spec.min_size
    scale = torch.cat([torch.ones(n_over, dtype=torch.float64, device=dev), size])
    # centre such that the crop lies inside the image (before jitter): |c| <= 1 - scale
    cx = (u() * 2 - 1) * (1 - scale) + (u() * 2 - 1) * 2 * spec.translate
    cy = (u() * 2 - 1) * (1 - scale) + (u() * 2 - 1) * 2 * spec.translate
    flip = torch.where(u() < spec.flip_p, -1.0, 1.0).to(torch.float64)
    angle = (u() * 2 - 1) * math.radians(spec.rotate_deg)
    gray = (u() < spec.gray_p).to(torch.float64)
    return {"scale": scale, "cx": cx, "cy": cy, "flip": flip, "angle": angle, "gray": gray}


def affine_theta(p: dict[str, Tensor]) -> Tensor:
    """Sampling matrices (n, 2, 3): output coordinates -> input coordinates ``A u + c`` with
    ``A = scale * R(angle) * diag(flip, 1)``."""
    cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
    s, f = p["scale"], p["flip"]
    row0 = torch.stack([s * cos * f, -s * sin, p["cx"]], dim=-1)
    row1 = torch.stack([s * sin * f, s * cos, p["cy"]], dim=-1)
    return torch.stack([row0, row1], dim=-2)


def make_cutouts(images: Tensor, size: int, spec: CutoutSpec, tau: float, generators: list[torch.Generator]) -> Tensor:
    """Views of each image for the matching model, differentiable w.r.t. ``images``.

    Args:
        images: (B, C, H, W) in [-1, 1]; size: the views' side (the matching model's input size);
        spec: counts and augmentations; tau: normalised time (for scheduled counts);
        generators: one per sample (B,).
    Returns:
        (B, n, C, size, size) views in [-1, 1] units (noise may leave the range slightly).
    """
    B, C = images.shape[:2]
    if len(generators) != B:
        raise ValueError(f"make_cutouts needs one generator per image: {len(generators)} for {B} images")
    n_over, n_inner = spec.counts(tau)
    n = n_over + n_inner
    params = [cutout_params(spec, n_over, n_inner, g) for g in generators]
    stacked = {k: torch.cat([p[k] for p in params]).to(images.device) for k in params[0]}  # (B*n,)
    theta = affine_theta(stacked).to(images.dtype)
    flat = repeat(images, "b c h w -> (b n) c h w", n=n)
    grid = F.affine_grid(theta, [B * n, C, size, size], align_corners=False)
    views = F.grid_sample(flat, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if C == 3 and spec.gray_p > 0:
        luma = torch.tensor(LUMA, dtype=views.dtype, device=views.device).view(1, 3, 1, 1)
        gray = (views * luma).sum(1, keepdim=True).expand_as(views)
        g = stacked["gray"].to(views.dtype).view(-1, 1, 1, 1)
        views = g * gray + (1 - g) * views
    if spec.noise_std > 0:
        noise = torch.cat(
            [torch.randn((n, C, size, size), generator=g, device=g.device, dtype=torch.float64) for g in generators]
        ).to(views)
        views = views + 2 * spec.noise_std * noise  # [0, 1] units -> [-1, 1] units
    return rearrange(views, "(b n) c h w -> b n c h w", b=B)


__all__ = ["CutoutSpec", "affine_theta", "cutout_params", "make_cutouts"]
