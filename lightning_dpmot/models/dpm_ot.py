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
(``cond["label"]``) are used only for targets without a label (-1, e.g. unconditional generated targets); other
condition entries are passed to the inner model unchanged.

The module implements the generation protocol (:class:`~lightning_dpmot.models.generation.GenerativeModule`) and
nothing of training: ``dpmot fit`` fails at setup with a message saying so; ``dpmot test`` logs the inner model's
denoising loss.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.diffusion.conditioning import Cond
from lightning_dpmot.diffusion.guidance import GuidanceSpec
from lightning_dpmot.models.base import DiffusionModule
from lightning_dpmot.models.generation import PREDICT_STREAM, GenerativeModule
from lightning_dpmot.models.semidiscrete import load_ot_checkpoint
from lightning_dpmot.ot.semidiscrete_maps import MapName, build_map
from lightning_dpmot.sampling.samplers import SampleResult, StepCallback
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.checkpoint_io import load_lightning_module
from lightning_dpmot.utils.random import StackedGenerator, make_generator, mix_seed

_OT_NOISE, _RENOISE = 0x07_5EED, 0x2E_5EED  # per-seed stream tags of the source noise and the re-noising


def load_diffusion_module(path: str | Path, map_location: str | torch.device = "cpu") -> DiffusionModule:
    """Rebuild a diffusion model from a ``dpmot fit`` checkpoint, in eval mode.

    Read by the project's one checkpoint loader (``weights_only=True``; URLs refused unless explicitly allowed;
    errors name the file). The checkpoint's hyperparameters name the class (``_class_path``) and Lightning's CLI
    instantiator; weights are the checkpoint's ``state_dict`` (the EMA weights when EMAHalfLife was used).
    """
    import lightning_dpmot.models  # noqa: F401  (the class must be imported for Lightning's allowlist check)
    import lightning_dpmot.nets  # noqa: F401

    if "://" not in str(path) and not Path(path).is_file():
        raise FileNotFoundError(f"diffusion checkpoint {str(path)!r} does not exist")
    try:
        module = load_lightning_module(path, map_location=map_location)
    except Exception as err:
        raise ValueError(
            f"{path}: cannot rebuild the diffusion model ({type(err).__name__}: {err}); use a checkpoint written by "
            "`dpmot fit` (its hyperparameters carry the model's class_path)"
        ) from err
    if not isinstance(module, DiffusionModule):
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


class DPMOTModule(GenerativeModule):
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
        guidance: guidance of the reverse steps (default: the inner model's).
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
        guidance: GuidanceSpec | None = None,
    ) -> None:
        inner = load_diffusion_module(diffusion_ckpt)
        solver, targets, meta = load_ot_checkpoint(ot_ckpt, targets_file)
        super().__init__(
            data_shape=inner.data_shape,
            num_classes=inner.num_classes,
            sampler=sampler or inner.sampler,
            guidance=guidance or inner.guidance,
        )
        self.save_hyperparameters(ignore=["sampler", "guidance"])
        if tuple(data_shape) != inner.data_shape or targets.data_shape != inner.data_shape:
            raise ValueError(
                f"shapes differ: data {tuple(data_shape)}, diffusion model {inner.data_shape}, OT targets "
                f"{targets.data_shape}"
            )
        self.inner = inner
        self.conditioner = inner.conditioner
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
    def configure_callbacks(self) -> list[L.Callback]:
        """Refuse ``fit`` before Lightning's own loop checks (the first hook it calls on the module)."""
        if self._trainer is not None and self.trainer.state.fn == "fit":
            raise ValueError(
                "DPMOTModule cannot be trained: it only samples (dpmot predict / test). Train the diffusion model "
                "(e.g. EDMModule) and fit the OT potential (SemiDiscreteOTModule) with dpmot fit instead"
            )
        return []

    @override
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """The inner model's denoising loss on held-out data (the OT map has none)."""
        loss = self.inner.eval_loss(batch, batch_idx)
        self.log("test/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["x"]))

    # ------------------------------------------------------------------------------------------------ sampling
    def mapped_condition(self, index: Tensor, cond: Cond | None) -> Cond | None:
        """The inner model's condition: the mapped targets' labels (B,), else ``cond["label"]``, else -1; other
        entries of ``cond`` unchanged. None for an unconditional inner model."""
        if not self.conditioner.conditional:
            return None
        cond = dict(cond or {})
        if "label" in self.conditioner.keys:
            given = cond.get("label")
            fallback = given.to(index.device) if given is not None else torch.full_like(index, -1)
            mapped = self.target_labels[index]
            cond["label"] = torch.where(mapped >= 0, mapped, fallback)
        return cond

    def expressway(
        self,
        seeds: Tensor | list[int],
        cond: Cond | None = None,
        spec: SamplerSpec | None = None,
        guidance: GuidanceSpec | None = None,
        callback: StepCallback | None = None,
    ) -> ExpresswayResult:
        """Samples for per-sample seeds (B,) with everything the expressway decided (see the module docstring)."""
        seeds = torch.as_tensor(seeds, dtype=torch.long)
        guidance = guidance or self.guidance
        with self.sampling_mode(grad=guidance.needs_grad):
            return self._expressway(seeds, cond, spec or self.sampler, guidance, callback)

    def _expressway(
        self,
        seeds: Tensor,
        cond: Cond | None,
        spec: SamplerSpec,
        guidance: GuidanceSpec,
        callback: StepCallback | None,
    ) -> ExpresswayResult:
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
        used = self.mapped_condition(mapped.index, cond)
        churn = StackedGenerator(seeds + PREDICT_STREAM, device=device)
        result = self.inner.sample_from(
            latents.double(), sigmas, cond=used, spec=spec, guidance=guidance, generator=churn, callback=callback
        )
        labels = used["label"] if used and "label" in used else torch.full_like(mapped.index, -1)
        return ExpresswayResult(result.x.float().clamp(-1, 1), result.nfe, mapped.index, labels, latents, map_seconds)

    def sample(
        self,
        seeds: Tensor,
        cond: Cond | None,
        spec: SamplerSpec,
        guidance: GuidanceSpec,
        callback: StepCallback | None,
    ) -> SampleResult:
        """Expressway samples: SampleResult with x (B, *data_shape) in [-1, 1] and the reverse steps' NFE."""
        result = self._expressway(seeds, cond, spec, guidance, callback)
        return SampleResult(result.x, result.nfe)

    @override
    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        cond = {k: v for k, v in batch.items() if k != "seed"}
        result = self.expressway(batch["seed"], cond)
        return {
            "x": result.x,
            "seed": batch["seed"],
            "label": result.labels,
            "nfe": torch.tensor(result.nfe),
            "target_index": result.index,
            "target_id": self.target_ids[result.index],
            "map_seconds": torch.tensor(result.map_seconds),
        }
