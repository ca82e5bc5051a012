"""DPM-OT expressway sampling: noise -> OT map -> latent at sigma_s -> the diffusion model's reverse steps -> image.

:class:`DPMOTModule` combines a trained diffusion checkpoint (any :class:`DiffusionModule` written by ``dpmot fit``)
with a fitted OT checkpoint (:class:`~lightning_dpmot.models.semidiscrete.SemiDiscreteOTModule`). For per-sample
seeds, :meth:`DPMOTModule.generate`

1. draws d-dimensional source noise z from the seed (Gaussian or the centred cube, as the potential was fitted);
2. maps it to a junction latent ``T(z)`` at level sigma_s (``hard``, ``renoise``, ``soft`` or ``aeot``; see
   :mod:`lightning_dpmot.ot.semidiscrete_maps`);
3. runs the inner model's sampler on ``sigmas_for(spec)`` started at sigma_s (``spec.sigma_max = sigma_s``).

NFE counts the reverse steps' network evaluations only: the map is a GEMM against the N targets (N d
multiply-adds per sample, timed separately as ``map_seconds``). So ``dpmot predict`` (SampleWriter) and
``dpmot test`` with NFESweep work unchanged: ``NFESweep``'s NFE axis is the number of steps *below* sigma_s.

Labels: a class-conditional inner model is conditioned on the label of the mapped target (the latent is a noisy
version of an image of that class; conditioning on another class contradicts it). Labels passed to ``generate``
are used only for targets without a label (-1, e.g. unconditional generated targets).

The module cannot be trained (``dpmot fit`` fails at setup); ``dpmot test`` logs the inner model's denoising loss.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.models.base import _PREDICT_STREAM, DiffusionModule
from lightning_dpmot.models.semidiscrete import load_ot_checkpoint
from lightning_dpmot.ot.semidiscrete_maps import MapName, build_map
from lightning_dpmot.sampling.samplers import SampleResult, StepCallback
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.random import StackedGenerator, make_generator, mix_seed

_OT_NOISE, _RENOISE = 0x07_5EED, 0x2E_5EED  # per-seed stream tags of the source noise and the re-noising


def load_diffusion_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a diffusion model from a ``dpmot fit`` checkpoint (``weights_only=True``), in eval mode.

    The checkpoint's hyperparameters name the class (``_class_path``) and Lightning's CLI instantiator; weights are
    the checkpoint's ``state_dict`` (the EMA weights when EMAHalfLife was used).
    """
    import lightning_dpmot.models  # noqa: F401  (the class must be imported for Lightning's allowlist check)
    import lightning_dpmot.nets  # noqa: F401

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"diffusion checkpoint {str(path)!r} does not exist")
    try:
        module = L.LightningModule.load_from_checkpoint(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: cannot rebuild the diffusion model ({type(err).__name__}: {err}); use a checkpoint written by "
            "`dpmot fit` (its hyperparameters carry the model's class_path)"
        ) from err
    if not isinstance(module, DiffusionModule) or isinstance(module, DPMOTModule):
        raise ValueError(f"{path}: holds a {type(module).__name__}, not a trained diffusion model")
    return module.eval()


class ExpresswayResult(NamedTuple):
    """x: (B, *S) samples in [-1, 1]; nfe: reverse-step network evaluations; index: (B,) mapped target (best cell);
    labels: (B,) conditioning labels used (-1: none); latents: (B, *S) junction latents; map_seconds: map time."""

    x: Tensor
    nfe: int
    index: Tensor
    labels: Tensor
    latents: Tensor
    map_seconds: float


class DPMOTModule(DiffusionModule):
    """Generation by the DPM-OT expressway (sampling only).

    Args:
        diffusion_ckpt: checkpoint of the trained diffusion model (written by ``dpmot fit``).
        ot_ckpt: checkpoint of the fitted potential (``SemiDiscreteOTModule``, written by ``dpmot fit``).
        ot_map: "hard" (published DPM-OT: copies targets), "renoise", "soft" or "aeot".
        topk: cells used by soft / aeot (default 8 / 5).
        temperature: softmax temperature of the soft map (score units).
        angle_threshold: aeot's threshold on the normalised facet angle (0.7).
        lam: aeot's interpolation weight of the runner-up (0.75).
        restore_noise: soft / aeot: top the blended latent's noise back up to sigma_s.
        targets_file: the targets (default: the file recorded by the fitting run, checked by SHA-256).
        data_shape: linked from the DataModule; must match the model and the targets.
        num_classes: linked from the DataModule (the inner model's value is used).
        sampler: reverse sampler below sigma_s (default: the inner model's); its ``sigma_max`` is replaced by sigma_s.
        seed: unused (per-sample seeds drive generation); kept for the DiffusionModule interface.
    """

    def __init__(
        self,
        diffusion_ckpt: str,
        ot_ckpt: str,
        ot_map: MapName = "hard",
        topk: int | None = None,
        temperature: float = 1.0,
        angle_threshold: float = 0.7,
        lam: float = 0.75,
        restore_noise: bool = False,
        targets_file: str | None = None,
        data_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 0,
        sampler: SamplerSpec | None = None,
        seed: int | None = None,
    ) -> None:
        inner = load_diffusion_module(diffusion_ckpt)
        solver, targets, meta = load_ot_checkpoint(ot_ckpt, targets_file)
        super().__init__(
            inner.data_shape, inner.num_classes, inner.class_conditional, sampler=sampler or inner.sampler, seed=seed
        )
        self.save_hyperparameters(ignore=["sampler"])
        if tuple(data_shape) != inner.data_shape or targets.data_shape != inner.data_shape:
            raise ValueError(
                f"shapes differ: data {tuple(data_shape)}, diffusion model {inner.data_shape}, OT targets "
                f"{targets.data_shape}"
            )
        self.inner = inner
        self.sigma_s = targets.sigma_s
        self.targets_provenance = meta.get("provenance", {})
        self.ot_map = build_map(
            ot_map,
            solver,
            targets,
            k=topk,
            temperature=temperature,
            angle_threshold=angle_threshold,
            lam=lam,
            restore_noise=restore_noise,
        )
        self.register_buffer("target_labels", targets.labels, persistent=False)
        self.register_buffer("target_ids", targets.ids, persistent=False)
        self.requires_grad_(False)
        self.sigmas_for(self.sampler)  # fail now if the model cannot start at sigma_s

    # ------------------------------------------------------------------------------------ DiffusionModule API
    @property
    def denoiser(self) -> Any:
        return self.inner.denoiser

    def loss(self, x: Tensor, noise: Tensor, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """The inner model's per-sample denoising loss (for ``dpmot test``/``validate``; the OT map has none)."""
        return self.inner.loss(x, noise, labels, generator)

    def sigmas_for(self, spec: SamplerSpec) -> Tensor:
        """The inner model's levels for ``spec`` started at sigma_s, (N + 1,) float64, descending to 0."""
        try:
            sigmas = self.inner.sigmas_for(replace(spec, sigma_max=self.sigma_s))
        except ValueError as err:
            raise ValueError(
                f"cannot start {spec.tag} at the junction level sigma_s={self.sigma_s:.6g}: {err}"
            ) from err
        if abs(float(sigmas[0]) - self.sigma_s) > 1e-4 * self.sigma_s:
            raise ValueError(
                f"the {type(self.inner).__name__} schedule for {spec.tag} starts at {float(sigmas[0]):.6g}, not at "
                f"the junction level sigma_s={self.sigma_s:.6g}; for a discrete VP model fit the targets at a level "
                "of its grid, sigma_s = VPSchedule.sigmas[t_s]"
            )
        return sigmas

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit":
            raise ValueError(
                "DPMOTModule cannot be trained: it only samples (dpmot predict / test). Train the diffusion model "
                "(e.g. EDMModule) and fit the OT potential (SemiDiscreteOTModule) with dpmot fit instead"
            )

    # ------------------------------------------------------------------------------------------------ sampling
    def mapped_labels(self, index: Tensor, labels: Tensor | None) -> Tensor:
        """Conditioning labels (B,): the mapped targets' labels, else ``labels``, else -1 (unconditional)."""
        fallback = labels.to(index.device) if labels is not None else torch.full_like(index, -1)
        if not self.class_conditional:
            return torch.full_like(index, -1)
        mapped = self.target_labels[index]
        return torch.where(mapped >= 0, mapped, fallback)

    @torch.no_grad()
    def expressway(
        self,
        seeds: Tensor | list[int],
        labels: Tensor | None = None,
        spec: SamplerSpec | None = None,
        callback: StepCallback | None = None,
    ) -> ExpresswayResult:
        """Samples for per-sample seeds (B,) with everything the expressway decided (see the module docstring)."""
        spec = spec or self.sampler
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        device = self.device
        sigmas = self.sigmas_for(spec).to(device)
        noise = self.ot_map.sample_noise([make_generator(s, _OT_NOISE, device=device) for s in seeds.tolist()])
        renoise = StackedGenerator([mix_seed(s, _RENOISE) for s in seeds.tolist()], device=device)
        start = time.perf_counter()
        mapped = self.ot_map(noise, renoise)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        map_seconds = time.perf_counter() - start
        latents = mapped.latents.unflatten(1, self.data_shape)
        used = self.mapped_labels(mapped.index, labels)
        churn = StackedGenerator(seeds + _PREDICT_STREAM, device=device)
        was_training = self.training
        self.eval()
        try:
            result = self.inner.sample_from(
                latents.double(),
                sigmas,
                labels=used if self.class_conditional else None,
                spec=spec,
                generator=churn,
                callback=callback,
            )
        finally:
            self.train(was_training)
        return ExpresswayResult(result.x.float().clamp(-1, 1), result.nfe, mapped.index, used, latents, map_seconds)

    @torch.no_grad()
    def generate(
        self,
        seeds: Tensor | list[int],
        labels: Tensor | None = None,
        spec: SamplerSpec | None = None,
        callback: StepCallback | None = None,
    ) -> SampleResult:
        """Expressway samples: SampleResult with x (B, *data_shape) in [-1, 1] and the reverse steps' NFE."""
        result = self.expressway(seeds, labels, spec, callback)
        return SampleResult(result.x, result.nfe)

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        result = self.expressway(batch["seed"], batch.get("label"))
        return {
            "x": result.x,
            "seed": batch["seed"],
            "label": result.labels,
            "nfe": torch.tensor(result.nfe),
            "target_index": result.index,
            "target_id": self.target_ids[result.index],
            "map_seconds": torch.tensor(result.map_seconds),
        }
