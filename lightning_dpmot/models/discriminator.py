"""Training the time-dependent discriminator of Discriminator Guidance (Kim et al., ICML 2023) with ``dpmot fit``.

Real data: the DataModule's batches ``x`` (B, *S) in [-1, 1]. Fake data: samples of the score model written by
``dpmot predict`` (``fake``: a ``samples.npz``, a ``.pt`` or a PNG directory, :func:`~lightning_dpmot.data.
sample_files.load_samples`), split once by a seeded permutation into a training part and a held-out part
(``val_fake_fraction``). Each step draws B fakes (with replacement) beside the B reals and noises all 2B with the
score model's own forward process and training distribution of noise levels (EDM):

    x_sigma = x_0 + sigma n,   ln sigma ~ N(P_mean, P_std^2),   n ~ N(0, I)

(``sigma_sampling: loguniform``: ln sigma uniform on [ln sigma_min, ln sigma_max] instead, covering the sampler's
whole range as DG's importance-sampled VP times do) and minimises the binary cross-entropy of the logit
l(x_sigma, sigma) with label 1 for real, 0 for fake (DG's ``train.py``; Adam 3e-4, weight decay 1e-7).

``noise_coupling: ot`` re-pairs the noises of the real batch and, separately, of the fake batch with their data by
the minibatch OT assignment (``coupling_cost`` between x_0 and n): AOT's coupling applied to the discriminator's
training pairs; the noise marginal is unchanged (a permutation of i.i.d. noise). Logged: ``{train,val}/bce``
(= ``loss``), ``{train,val}/acc`` and, with OT, the mean pair cost before/after the assignment.

The feature trunk starts from pretrained weights (``feature: classifier`` copies the digits' FID classifier,
fitted or read from the cache on the training split, in :meth:`setup`) and is frozen (only the head trains) unless
``freeze_features: false``. Checkpoints hold the whole net, so
:func:`~lightning_dpmot.diffusion.discriminator_guidance.load_discriminator` needs neither data nor classifier cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_dpmot.data.sample_files import load_samples
from lightning_dpmot.diffusion.denoiser import append_dims
from lightning_dpmot.metrics.extractors import DEFAULT_CACHE_DIR, build_feature_extractor
from lightning_dpmot.nets.discriminator import FeatureName, TimeDiscriminator
from lightning_dpmot.ot.costs import pairwise_cost
from lightning_dpmot.ot.coupling import coupling_permutation
from lightning_dpmot.utils.random import make_generator

_TRAIN, _VAL, _SPLIT = 0xD15C, 0xD15D, 0xD15E  # generator purpose tags

Coupling = Literal["independent", "ot"]


def ot_coupled_noise(x0: Tensor, noise: Tensor, cost: str = "l2", solver: str = "exact") -> tuple[Tensor, Tensor]:
    """Noise re-paired with the data by the minimum-cost assignment: (B, *S), (B, *S) -> (noise[perm] (B, *S),
    (cost before, cost after) as a (2,) tensor of mean pair costs)."""
    c = pairwise_cost(x0, noise, cost)  # type: ignore[arg-type]
    perm = coupling_permutation(c, solver)
    rows = torch.arange(len(x0), device=c.device)
    return noise[perm.to(noise.device)], torch.stack([c[rows, rows].mean(), c[rows, perm].mean()])


class DiscriminatorModule(L.LightningModule):
    """BCE training of a :class:`~lightning_dpmot.nets.discriminator.TimeDiscriminator` (module docstring).

    Args:
        fake: the generated samples (``dpmot predict`` output).
        feature, hidden, emb_channels, sigma_data, freeze_features: the network (:class:`TimeDiscriminator`).
        P_mean, P_std: the log-normal noise-level distribution (EDM's training one).
        sigma_sampling: ``lognormal`` (P_mean, P_std) or ``loguniform`` on [sigma_min, sigma_max].
        noise_coupling: ``independent`` or ``ot`` (AOT-assigned perturbation noise).
        coupling_cost, coupling_solver: cost (``l2``, ``sqeuclidean``) and assignment solver of the OT coupling.
        val_fake_fraction: fraction of the fakes held out for validation.
        lr, weight_decay: Adam's.
        seed: seed of the fake split, the fake draws, the noise levels and the noise.
        cache_dir, inception_weights: where the classifier trunk is cached; Inception's weights file.
        data_shape, num_classes: linked from the DataModule by the CLI (classes unused: unconditional).
    """

    def __init__(
        self,
        fake: str,
        feature: FeatureName = "classifier",
        hidden: int = 256,
        emb_channels: int = 64,
        sigma_data: float = 0.5,
        freeze_features: bool = True,
        P_mean: float = -1.2,
        P_std: float = 1.2,
        sigma_sampling: Literal["lognormal", "loguniform"] = "lognormal",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        noise_coupling: Coupling = "independent",
        coupling_cost: Literal["l2", "sqeuclidean"] = "l2",
        coupling_solver: str = "exact",
        val_fake_fraction: float = 0.15,
        lr: float = 3e-4,
        weight_decay: float = 1e-7,
        seed: int = 0,
        cache_dir: str = DEFAULT_CACHE_DIR,
        inception_weights: str | None = None,
        data_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        if noise_coupling not in ("independent", "ot"):
            raise ValueError(f"noise_coupling must be 'independent' or 'ot', got {noise_coupling!r}")
        if sigma_sampling not in ("lognormal", "loguniform") or not 0 < sigma_min < sigma_max:
            raise ValueError("sigma_sampling must be 'lognormal' or 'loguniform' with 0 < sigma_min < sigma_max")
        if not 0.0 < val_fake_fraction < 1.0:
            raise ValueError(f"val_fake_fraction must be in (0, 1), got {val_fake_fraction}")
        self.save_hyperparameters()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.net = TimeDiscriminator(
            self.data_shape, feature, hidden, emb_channels, sigma_data, inception_weights, freeze_features
        )
        self.fake_train: Tensor | None = None
        self.fake_val: Tensor | None = None

    # ------------------------------------------------------------------------------------------------ data
    @override
    def setup(self, stage: str) -> None:
        """Read and split the fakes; copy the frozen classifier trunk (``feature: classifier``)."""
        hp = self.hparams
        fakes = load_samples(hp.fake, self.data_shape)
        if len(fakes) < 2:
            raise ValueError(f"need at least 2 fake samples in {hp.fake}, got {len(fakes)}")
        order = torch.randperm(len(fakes), generator=make_generator(hp.seed, _SPLIT))
        n_val = max(1, round(hp.val_fake_fraction * len(fakes)))
        self.fake_val, self.fake_train = fakes[order[:n_val]], fakes[order[n_val:]]
        if hp.feature == "classifier":
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if datamodule is None:
                raise ValueError("feature 'classifier' needs a DataModule: the classifier trains on its training split")
            train = datamodule.dataset("train")
            classifier = build_feature_extractor("classifier", self.data_shape, train, hp.cache_dir)
            self.net.features.copy_from(classifier)  # type: ignore[union-attr,operator]

    # ------------------------------------------------------------------------------------------------ loss
    def draw_sigma(self, n: int, generator: torch.Generator) -> Tensor:
        """(n,) noise levels from the training distribution (``sigma_sampling``)."""
        hp = self.hparams
        if hp.sigma_sampling == "loguniform":
            lo, hi = math.log(hp.sigma_min), math.log(hp.sigma_max)
            return (lo + (hi - lo) * torch.rand(n, generator=generator)).exp()
        return (torch.randn(n, generator=generator) * hp.P_std + hp.P_mean).exp()

    def noised_logits(
        self, x0: Tensor, is_real: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (2B,) of x0 (2B, *S) noised at log-normal levels; real and fake rows coupled apart under OT."""
        hp = self.hparams
        sigma = self.draw_sigma(len(x0), generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        extra: dict[str, Tensor] = {}
        if hp.noise_coupling == "ot":
            costs = []
            for part in (is_real, ~is_real):
                noise[part], c = ot_coupled_noise(x0[part], noise[part], hp.coupling_cost, hp.coupling_solver)
                costs.append(c * part.sum())
            before, after = torch.stack(costs).sum(0) / len(x0)
            extra = {"ot_cost_before": before, "ot_cost_after": after}
        x = x0 + append_dims(sigma, x0.ndim) * noise
        return self.net(x, sigma), extra

    def _step(self, real: Tensor, fake: Tensor, generator: torch.Generator, stage: str) -> Tensor:
        x0 = torch.cat([real.float(), fake.to(real.device, torch.float32)])
        is_real = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).bool().to(real.device)
        logits, extra = self.noised_logits(x0, is_real, generator)
        loss = F.binary_cross_entropy_with_logits(logits, is_real.float())
        acc = ((logits > 0) == is_real).float().mean()
        n = len(x0)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}/bce", loss, batch_size=n, sync_dist=stage != "train")
        self.log(f"{stage}/acc", acc, prog_bar=True, batch_size=n, sync_dist=stage != "train")
        for key, value in extra.items():
            self.log(f"{stage}/{key}", value, batch_size=n, sync_dist=stage != "train")
        return loss

    def _fakes(self, split: str) -> Tensor:
        fakes = self.fake_train if split == "train" else self.fake_val
        if fakes is None:
            raise RuntimeError("DiscriminatorModule: fakes not loaded (setup() has not run)")
        return fakes

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        real = batch["x"]
        gen = make_generator(self.hparams.seed, _TRAIN, self.global_rank, self.global_step)
        fakes = self._fakes("train")
        fake = fakes[torch.randint(len(fakes), (len(real),), generator=gen)]
        return self._step(real, fake, gen, "train")

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        real = batch["x"]
        fakes = self._fakes("val")
        idx = (torch.arange(len(real)) + batch_idx * len(real)) % len(fakes)  # the same fakes every validation
        self._step(real, fakes[idx], make_generator(self.hparams.seed, _VAL, self.global_rank, batch_idx), "val")

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


__all__ = ["Coupling", "DiscriminatorModule", "ot_coupled_noise"]
