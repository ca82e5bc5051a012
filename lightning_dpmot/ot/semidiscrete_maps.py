"""Ways to turn a fitted semi-discrete OT potential h into a map from noise to junction latents.

Every map has one interface, ``map(noise (B, d), generator) -> latents (B, d)`` (``forward`` also returns the
best power cell of each sample), and is built on a fitted :class:`~lightning_dpmot.ot.semidiscrete.SemiDiscreteOT`
whose targets y_i are the latents ``clean_i + sigma_s * n_i`` (:mod:`lightning_dpmot.ot.latent_targets`). The
score of noise x for target i is ``s_i(x) = <x, y_i> + h_i``; i*(x) = argmax_i s_i(x) is its power cell.

===========  ==========================================================  =============================================
map          output                                                      copy risk
===========  ==========================================================  =============================================
``hard``     y_{i*(x)}: the stored latent itself (DPM-OT as published)   total: only N distinct outputs; at small
                                                                         sigma_s the reverse process returns the
                                                                         target's clean image (dpm-ot.md §1)
``renoise``  clean_{i*} + sigma_s * fresh noise (x only picks the cell)  the reverse process samples p(y | that
                                                                         noisy copy): near-copies at small sigma_s,
                                                                         new samples of the cell's mode at large
``soft``     sum_j softmax(s_j / T) y_j over the top-k cells             interpolates latents: novel points, but
                                                                         blends (ghosting) and under-noised latents
                                                                         (noise std sigma_s ||w||_2) unless
                                                                         ``restore_noise``
``aeot``     y_{i1}, or (1 - lam) y_{i1} + lam y_{ij} for the best       AE-OT's piecewise-linear extension: new
             runner-up j whose facet angle passes the threshold          points only between "adjacent" cells;
                                                                         singular pairs (across modes) stay hard
===========  ==========================================================  =============================================

All GEMMs run in exact fp32 whatever the caller's autocast or matmul-precision settings (:func:`exact_fp32`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_dpmot.ot.latent_targets import LatentTargets
from lightning_dpmot.ot.power_cells import sample_source
from lightning_dpmot.ot.semidiscrete import SemiDiscreteOT
from lightning_dpmot.sampling.samplers import NoiseSource
from lightning_dpmot.utils.precision import exact_fp32
from lightning_dpmot.utils.random import make_generator

MapName = Literal["hard", "renoise", "soft", "aeot"]
MAP_NAMES: tuple[str, ...] = ("hard", "renoise", "soft", "aeot")
_CALIBRATION = 0xAE07  # generator tag of the AE-OT angle calibration samples


class MapResult(NamedTuple):
    """latents: (B, d) float32 mapped latents; index: (B,) int64 best power cell i*(x) of each noise sample."""

    latents: Tensor
    index: Tensor


def _fresh_noise(
    shape: tuple[int, ...], generator: torch.Generator | NoiseSource | None, device: torch.device
) -> Tensor:
    """Unit Gaussian noise (B, d): from a per-sample source (``randn_like``), a generator, or the global RNG."""
    template = torch.empty(shape, device=device, dtype=torch.float32)
    if generator is None:
        return torch.randn_like(template)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    return generator.randn_like(template)


class SemiDiscreteMap(nn.Module):
    """Base class: holds the fitted solver; subclasses implement :meth:`forward`.

    Args:
        solver: a fitted :class:`SemiDiscreteOT` (targets = junction latents, (N, d)).
    """

    name: ClassVar[str] = "base"

    def __init__(self, solver: SemiDiscreteOT) -> None:
        super().__init__()
        self.solver = solver

    @property
    def targets(self) -> Tensor:
        """(N, d) target latents y_i."""
        return self.solver.targets

    def sample_noise(self, generators: list[torch.Generator]) -> Tensor:
        """One source sample per generator, (B, d) fp32 (Gaussian or centred cube, as the solver was fitted)."""
        device = self.targets.device
        rows = [sample_source(self.solver.config.source, 1, self.solver.dim, g, device=device) for g in generators]
        return torch.cat(rows) if rows else torch.empty(0, self.solver.dim, device=device)

    def forward(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> MapResult:
        """noise (B, d) -> MapResult(latents (B, d), index (B,))."""
        raise NotImplementedError

    def map(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> Tensor:
        """noise (B, d) -> latents (B, d) at the junction level."""
        return self(noise, generator).latents


class HardMap(SemiDiscreteMap):
    """T(x) = y_{i*(x)}: the stored latent of x's power cell (the Brenier map; DPM-OT as published).

    Copy risk: total. Only N outputs exist; with targets at sigma_s ~ 0.01 the reverse process merely denoises
    them, so every sample is a copy of a target image.
    """

    name = "hard"

    @torch.no_grad()
    def forward(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> MapResult:
        with exact_fp32(self.targets.device):
            index = self.solver.assign(noise)
        return MapResult(self.targets[index], index)


class RenoiseMap(SemiDiscreteMap):
    """T(x) = clean_{i*(x)} + sigma_s * z with fresh z ~ N(0, I): x only chooses the cell.

    The output is an exact sample of the forward marginal at sigma_s conditioned on the clean image of the cell, so
    the reverse process samples the model's p(y | a fresh noisy copy). Copy risk: high at small sigma_s (the
    noisy copy pins the image down), falling as sigma_s grows (SDEdit-like variations of the cell's image).

    Args:
        solver: fitted solver.
        clean: (N, d) clean samples of the targets, in the solver's target order.
        sigma_s: junction level of the targets.
    """

    name = "renoise"
    clean: Tensor

    def __init__(self, solver: SemiDiscreteOT, clean: Tensor, sigma_s: float) -> None:
        super().__init__(solver)
        if tuple(clean.shape) != tuple(solver.targets.shape):
            raise ValueError(f"clean has shape {tuple(clean.shape)}, the targets {tuple(solver.targets.shape)}")
        self.register_buffer("clean", clean.detach().to(torch.float32).contiguous(), persistent=False)
        self.sigma_s = float(sigma_s)

    @torch.no_grad()
    def forward(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> MapResult:
        with exact_fp32(self.targets.device):
            index = self.solver.assign(noise)
        fresh = _fresh_noise((len(index), self.solver.dim), generator, self.clean.device)
        return MapResult(self.clean[index] + self.sigma_s * fresh, index)


class _TopKMap(SemiDiscreteMap):
    """Shared pieces of the interpolating maps: top-k scores and the optional noise top-up."""

    def __init__(self, solver: SemiDiscreteOT, k: int, restore_noise: bool, sigma_s: float | None) -> None:
        super().__init__(solver)
        if not 1 <= k <= solver.num_targets:
            raise ValueError(f"k must be in [1, {solver.num_targets}] (the number of targets), got {k}")
        if restore_noise and sigma_s is None:
            raise ValueError("restore_noise needs sigma_s, the junction level of the targets")
        self.k, self.restore_noise, self.sigma_s = int(k), bool(restore_noise), sigma_s

    def _top_up(self, latents: Tensor, weights: Tensor, generator: torch.Generator | NoiseSource | None) -> Tensor:
        """Add ``sigma_s sqrt(1 - ||w||^2) z``: a convex combination of latents with independent noises carries
        noise of std ``sigma_s ||w||_2``; the top-up restores std sigma_s (the level the sampler assumes)."""
        if not self.restore_noise:
            return latents
        scale = self.sigma_s * (1.0 - weights.square().sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt()
        return latents + scale * _fresh_noise(tuple(latents.shape), generator, latents.device)


class SoftMap(_TopKMap):
    """T(x) = sum_j w_j y_{i_j} with w = softmax(s_{i_j}(x) / T) over the k best cells (a barycentric map).

    As T -> 0 it becomes the hard map; for T > 0 it lies in the convex hull of the top-k latents. T is in score
    units (scores ``<x, y> + h``): gaps between a sample's best cells are far smaller than ``solver.score_scale``.
    Copy risk: lower (outputs are blends), at the price of blurred blends of neighbouring targets.

    Args:
        solver: fitted solver.
        k: number of cells mixed.
        temperature: T > 0.
        restore_noise: top the noise back up to sigma_s (see :meth:`_top_up`); needs ``sigma_s``.
        sigma_s: junction level of the targets.
    """

    name = "soft"

    def __init__(
        self,
        solver: SemiDiscreteOT,
        k: int = 8,
        temperature: float = 1.0,
        restore_noise: bool = False,
        sigma_s: float | None = None,
    ) -> None:
        super().__init__(solver, k, restore_noise, sigma_s)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def weights(self, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(w, idx)``: (B, k) softmax weights and the (B, k) cells, best first."""
        with exact_fp32(self.targets.device):
            scores, idx = self.solver.topk(noise, self.k)
        return torch.softmax(scores / self.temperature, dim=1), idx

    @torch.no_grad()
    def forward(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> MapResult:
        w, idx = self.weights(noise)
        with exact_fp32(self.targets.device):
            latents = torch.einsum("bk,bkd->bd", w, self.targets[idx])
        return MapResult(self._top_up(latents, w, generator), idx[:, 0])


class AEOTMap(_TopKMap):
    """AE-OT's piecewise-linear extension (An et al. 2020; pyOMT ``demo2.py::gen_P``), one output per sample.

    For the k best cells i_1 (best) .. i_k of x, the angle between the facet normals n_i = (y_i, -1) / ||(y_i, -1)||
    of the Brenier potential's graph is theta_j = arccos <n_{i_1}, n_{i_j}>. Angles are min-max normalised with the
    minimum and maximum over a fixed calibration batch of source samples (pyOMT normalises over each generated
    batch, which would make a sample depend on its batch-mates); pairs with normalised angle <= ``angle_threshold``
    are "regular" (the two cells share a smooth piece of the data manifold). The output is
    ``(1 - lam) y_{i_1} + lam y_{i_j}`` for the best-scoring regular runner-up j, else y_{i_1} (a singular
    neighbourhood: interpolating across modes would create off-manifold points).

    Copy risk: samples with no regular runner-up are stored latents (as ``hard``); the others are new points on
    segments between neighbouring latents.

    Args:
        solver: fitted solver.
        k: cells examined per sample (pyOMT: ``topk``).
        angle_threshold: threshold on the normalised angle (pyOMT: 0.7).
        lam: weight of the runner-up (pyOMT's ``dissim``: 0.75).
        calibration_samples: source samples of the fixed calibration batch.
        calibration_seed: seed of that batch.
        restore_noise: top the noise back up to sigma_s; needs ``sigma_s``.
        sigma_s: junction level of the targets.
    """

    name = "aeot"
    theta_range: Tensor

    def __init__(
        self,
        solver: SemiDiscreteOT,
        k: int = 5,
        angle_threshold: float = 0.7,
        lam: float = 0.75,
        calibration_samples: int = 4096,
        calibration_seed: int = 0,
        restore_noise: bool = False,
        sigma_s: float | None = None,
    ) -> None:
        super().__init__(solver, k, restore_noise, sigma_s)
        if k < 2:
            raise ValueError(f"aeot needs k >= 2 cells to form pairs, got {k}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        self.angle_threshold, self.lam = float(angle_threshold), float(lam)
        gen = make_generator(calibration_seed, _CALIBRATION)
        x = sample_source(solver.config.source, calibration_samples, solver.dim, gen).to(solver.targets.device)
        theta = self.angles(self.solver.topk(x, self.k)[1])
        self.register_buffer("theta_range", torch.stack([theta.min(), theta.max()]), persistent=False)

    def angles(self, idx: Tensor) -> Tensor:
        """Angles (B, k - 1) between the normal of cell ``idx[:, 0]`` and those of ``idx[:, 1:]`` (radians)."""
        with exact_fp32(self.targets.device):
            y = self.targets[idx]  # (B, k, d)
            dots = torch.einsum("bd,bjd->bj", y[:, 0], y[:, 1:]) + 1.0
            sq = y.square().sum(dim=2) + 1.0  # ||(y, -1)||^2, (B, k)
            cos = dots / (sq[:, :1] * sq[:, 1:]).sqrt()
        return torch.arccos(cos.clamp(-1.0, 1.0))

    def normalised_angles(self, idx: Tensor) -> Tensor:
        """Angles of :meth:`angles`, min-max normalised by the calibration range, (B, k - 1)."""
        lo, hi = self.theta_range[0], self.theta_range[1]
        return (self.angles(idx) - lo) / (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)

    @torch.no_grad()
    def forward(self, noise: Tensor, generator: torch.Generator | NoiseSource | None = None) -> MapResult:
        with exact_fp32(self.targets.device):
            _, idx = self.solver.topk(noise, self.k)
        regular = self.normalised_angles(idx) <= self.angle_threshold  # (B, k - 1)
        has_pair = regular.any(dim=1)
        partner = idx[:, 1:].gather(1, regular.to(torch.int64).argmax(dim=1, keepdim=True))[:, 0]  # first regular
        lam = torch.where(has_pair, self.lam, 0.0).unsqueeze(1)  # (B, 1)
        best = self.targets[idx[:, 0]]
        latents = torch.where(has_pair.unsqueeze(1), (1.0 - lam) * best + lam * self.targets[partner], best)
        weights = torch.cat([1.0 - lam, lam], dim=1)
        return MapResult(self._top_up(latents, weights, generator), idx[:, 0])


def build_map(
    name: MapName,
    solver: SemiDiscreteOT,
    targets: LatentTargets | None = None,
    *,
    k: int | None = None,
    temperature: float = 1.0,
    angle_threshold: float = 0.7,
    lam: float = 0.75,
    restore_noise: bool = False,
) -> SemiDiscreteMap:
    """The map called ``name`` over a fitted solver; ``targets`` supplies sigma_s and the clean samples."""
    if name not in MAP_NAMES:
        raise ValueError(f"unknown map {name!r}; expected one of {', '.join(MAP_NAMES)}")
    if targets is not None and targets.num_targets != solver.num_targets:
        raise ValueError(f"targets hold {targets.num_targets} latents but the solver has {solver.num_targets}")
    sigma_s = targets.sigma_s if targets is not None else None
    if name == "hard":
        return HardMap(solver)
    if name == "renoise":
        if targets is None or targets.clean is None:
            raise ValueError("the renoise map needs the targets' clean samples (LatentTargets.clean)")
        return RenoiseMap(solver, targets.flat_clean().to(solver.targets.device), targets.sigma_s)
    if name == "soft":
        return SoftMap(solver, min(k or 8, solver.num_targets), temperature, restore_noise, sigma_s)
    return AEOTMap(
        solver, min(k or 5, solver.num_targets), angle_threshold, lam, restore_noise=restore_noise, sigma_s=sigma_s
    )
