"""DPM-OT target latents: clean samples pushed to the junction level sigma_s, with ids, labels and provenance.

All models of the project share sigma space, where a sample at noise level sigma is ``y + sigma * n``. DPM-OT's
"latents at t_s" are therefore model-agnostic: ``latent_i = y_i + sigma_s * n_i`` for clean samples y_i (dataset
images or a model's own samples) and unit Gaussian noise n_i. For a discrete VP model pick sigma_s on its grid
(``VPSchedule.sigmas[t_s]``) so that the reverse sampler can start exactly there.

Determinism: the noise of target (key, draw) comes from its own CPU generator
``make_generator(seed, tag, key, draw)`` (key = dataset index, or the generation seed of a generated sample), so
every rank builds bit-identical targets without communication, a rebuild is bit-identical, and subsetting
(``max_targets``) keeps each kept target's noise. :meth:`LatentTargets.fingerprint` (SHA-256 of latents, ids,
labels, draws and sigma_s) detects any difference.

Where the targets come from matters (dpm-ot.md §1): the released DPM-OT code uses the *test* split at
sigma ~ 0.014, so its "samples" are re-noised copies of test images. Build from the training split (and measure the
copy rate against it) or from generated samples, at a junction level well above 0.01.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_dpmot.utils.random import make_generator

if TYPE_CHECKING:
    from lightning_dpmot.models.base import DiffusionModule
    from lightning_dpmot.sampling.spec import SamplerSpec

#: Version tag of the saved file format.
TARGETS_FORMAT = "lightning_dpmot.LatentTargets/1"
# Generator purpose tags (large, so they never collide with the solver's Monte Carlo streams 0 and 1).
DATASET_NOISE, GENERATED_NOISE, SUBSET = 0x0D_A7A5E7, 0x06E_4E7, 0x5B_5E7
_PRIMITIVES = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` is built from dicts, lists, strings, numbers, booleans and None."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PRIMITIVES):
        raise ValueError(f"{where} must be plain data (str, int, float, bool, None, lists, dicts); got {value!r}")


@dataclass
class LatentTargets:
    """N target latents at level sigma_s and where they came from.

    Args:
        latents: (N, *S) float32 ``clean + sigma_s * noise``, finite.
        ids: (N,) int64 dataset index of each target's clean image, -1 for generated samples.
        labels: (N,) int64 class label, -1 if unknown or unlabelled.
        sigma_s: the junction noise level (>= 0).
        draws: (N,) int64 noise-draw index (several draws per image give several targets); default zeros.
        clean: (N, *S) float32 clean samples (the re-noising map needs them), or None to save memory.
        provenance: plain data describing the source (checkpoint, split, level, seed, num_draws, dataset, model).
    """

    latents: Tensor
    ids: Tensor
    labels: Tensor
    sigma_s: float
    draws: Tensor | None = None
    clean: Tensor | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.latents, Tensor) or self.latents.ndim < 2:
            shape = tuple(self.latents.shape) if isinstance(self.latents, Tensor) else type(self.latents).__name__
            raise ValueError(f"latents must be a tensor (N, *S) with at least 2 dims, got {shape}")
        n = self.latents.shape[0]
        if n == 0 or self.latents[0].numel() == 0:
            raise ValueError(f"the target set is empty: latents have shape {tuple(self.latents.shape)}")
        if not self.latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {self.latents.dtype}")
        self.latents = self.latents.detach().to(torch.float32).contiguous()
        bad = int((~torch.isfinite(self.latents)).sum())
        if bad:
            raise ValueError(f"latents contain NaN or infinite values ({bad} non-finite entries)")
        if not (math.isfinite(self.sigma_s) and self.sigma_s >= 0):
            raise ValueError(f"sigma_s must be finite and >= 0, got {self.sigma_s}")
        self.sigma_s = float(self.sigma_s)
        if self.draws is None:
            self.draws = torch.zeros(n, dtype=torch.int64)
        for name in ("ids", "labels", "draws"):
            value = torch.as_tensor(getattr(self, name))
            if value.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match the {n} latents, got {tuple(value.shape)}")
            setattr(self, name, value.detach().to(torch.int64).contiguous())
        if self.clean is not None:
            if tuple(self.clean.shape) != tuple(self.latents.shape):
                raise ValueError(
                    f"clean has shape {tuple(self.clean.shape)} but latents have shape {tuple(self.latents.shape)}"
                )
            self.clean = self.clean.detach().to(torch.float32).contiguous()
        _check_plain(self.provenance, "provenance")

    @property
    def num_targets(self) -> int:
        """N."""
        return self.latents.shape[0]

    @property
    def data_shape(self) -> tuple[int, ...]:
        """S, the shape of one latent."""
        return tuple(self.latents.shape[1:])

    @property
    def dim(self) -> int:
        """d = prod(S)."""
        return self.latents[0].numel()

    def flat(self) -> Tensor:
        """Latents as OT targets, (N, d) float32 (a view, no copy)."""
        return rearrange(self.latents, "n ... -> n (...)")

    def flat_clean(self) -> Tensor:
        """Clean samples as (N, d) float32; raises if they were not kept."""
        if self.clean is None:
            raise ValueError("these targets were built without their clean samples (clean=None)")
        return rearrange(self.clean, "n ... -> n (...)")

    def fingerprint(self) -> str:
        """SHA-256 (hex) of latents, ids, labels, draws, shape and sigma_s (not of clean or provenance)."""
        digest = hashlib.sha256()
        digest.update(repr((tuple(self.latents.shape), self.sigma_s)).encode())
        for t in (self.latents, self.ids, self.labels, self.draws):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def subset(self, index: Tensor) -> LatentTargets:
        """The targets at ``index`` (K,) int64, in that order (provenance kept)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        clean = None if self.clean is None else self.clean[index]
        return replace(
            self,
            latents=self.latents[index],
            ids=self.ids[index],
            labels=self.labels[index],
            draws=self.draws[index],
            clean=clean,
            provenance=dict(self.provenance),
        )

    # ---------------------------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and primitives (loads with ``torch.load(..., weights_only=True)``)."""
        out: dict[str, Any] = {
            "format": TARGETS_FORMAT,
            "latents": self.latents,
            "ids": self.ids,
            "labels": self.labels,
            "draws": self.draws,
            "sigma_s": self.sigma_s,
            "provenance": self.provenance,
            "sha256": self.fingerprint(),
        }
        if self.clean is not None:
            out["clean"] = self.clean
        return out

    @classmethod
    def from_dict(cls, state: dict[str, Any], source: str = "state") -> LatentTargets:
        """Inverse of :meth:`to_dict`; checks the format tag and the stored fingerprint."""
        if not isinstance(state, dict) or state.get("format") != TARGETS_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{source}: not a LatentTargets file (format {found!r}, expected {TARGETS_FORMAT!r})")
        try:
            targets = cls(
                latents=state["latents"],
                ids=state["ids"],
                labels=state["labels"],
                sigma_s=state["sigma_s"],
                draws=state["draws"],
                clean=state.get("clean"),
                provenance=state.get("provenance", {}),
            )
        except KeyError as err:
            raise ValueError(f"{source}: LatentTargets file lacks the entry {err}") from err
        if targets.fingerprint() != state.get("sha256"):
            raise ValueError(f"{source}: contents do not match the stored sha256 (file corrupted or edited)")
        return targets

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` with ``torch.save`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LatentTargets:
        """Read a file written by :meth:`save` (``weights_only=True``); clear errors if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"targets file {str(path)!r} does not exist")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # unpickling errors of many kinds: truncated, not a torch file, unsafe globals
            raise ValueError(f"{path}: not a readable LatentTargets file ({type(err).__name__}: {err})") from err
        return cls.from_dict(state, source=str(path))


# -------------------------------------------------------------------------------------------------------- builders
def target_noise(seed: int, tag: int, keys: Tensor, draws: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Unit Gaussian noise per target, (N, *shape) float32 on the CPU.

    Row n comes from ``make_generator(seed, tag, keys[n], draws[n])`` alone, so it does not depend on the other
    targets, the process, or the order of construction.
    """
    out = torch.empty(len(keys), *shape, dtype=torch.float32)
    for row, (key, draw) in enumerate(zip(keys.tolist(), draws.tolist())):
        out[row].normal_(generator=make_generator(seed, tag, key, draw))
    return out


def choose_subset(num_items: int, max_targets: int | None, seed: int) -> Tensor:
    """Sorted positions of a seeded random subset of ``max_targets`` out of ``num_items`` (all if None or larger)."""
    if max_targets is not None and max_targets < 1:
        raise ValueError(f"max_targets must be >= 1 or None, got {max_targets}")
    if max_targets is None or max_targets >= num_items:
        return torch.arange(num_items)
    return torch.randperm(num_items, generator=make_generator(seed, SUBSET))[:max_targets].sort().values


def _check_level(sigma_s: float, num_draws: int) -> None:
    if not (math.isfinite(sigma_s) and sigma_s >= 0):
        raise ValueError(f"sigma_s must be finite and >= 0, got {sigma_s}")
    if num_draws < 1:
        raise ValueError(f"num_draws must be >= 1, got {num_draws}")


def _iterate(dataset: Dataset, batch_size: int) -> Iterator[dict[str, Tensor]]:
    yield from DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def targets_from_dataset(
    dataset: Dataset,
    sigma_s: float,
    *,
    num_draws: int = 1,
    seed: int = 0,
    max_targets: int | None = None,
    keep_clean: bool = True,
    batch_size: int = 1024,
    provenance: dict[str, Any] | None = None,
) -> LatentTargets:
    """Targets ``x_i + sigma_s * n_{i,k}`` from a dataset split (items ``{"x", "label", "index"}``).

    Args:
        dataset: the split's dataset (e.g. ``datamodule.dataset("train")``).
        sigma_s: junction noise level in sigma space.
        num_draws: noise draws per image (targets are ordered image-major: image 0 draw 0, image 0 draw 1, ...).
        seed: seed of the noise and of the subset.
        max_targets: keep a seeded random subset of this many (image, draw) pairs (None: all).
        keep_clean: store the clean images (needed by the re-noising map).
        batch_size: loading batch size (no effect on the result).
        provenance: extra plain-data fields (split, dataset name, ...).

    Returns:
        LatentTargets with ``ids`` = the items' ``index`` and ``labels`` = their ``label`` (-1 if absent).
    """
    _check_level(sigma_s, num_draws)
    num_images = len(dataset)  # type: ignore[arg-type]
    if num_images == 0:
        raise ValueError("the dataset is empty: no targets to build")
    pairs = choose_subset(num_images * num_draws, max_targets, seed)
    positions, draws = pairs // num_draws, pairs % num_draws
    unique_pos, inverse = torch.unique(positions, return_inverse=True)
    xs, labels, ids = [], [], []
    for batch in _iterate(Subset(dataset, unique_pos.tolist()), batch_size):
        x = batch["x"]
        xs.append(x.to(torch.float32))
        labels.append(batch.get("label", torch.full((len(x),), -1, dtype=torch.int64)))
        ids.append(batch["index"] if "index" in batch else torch.full((len(x),), -1, dtype=torch.int64))
    clean = torch.cat(xs)[inverse]
    ids_t, labels_t = torch.cat(ids).to(torch.int64)[inverse], torch.cat(labels).to(torch.int64)[inverse]
    if bool((ids_t < 0).any()):
        raise ValueError("dataset items need an 'index' entry (their position in the split) to key the noise")
    noise = target_noise(seed, DATASET_NOISE, ids_t, draws, tuple(clean.shape[1:]))
    info = {"source": "dataset", "sigma_s": float(sigma_s), "seed": seed, "num_draws": num_draws}
    info.update(max_targets=max_targets, num_targets=len(pairs), **(provenance or {}))
    return LatentTargets(
        latents=clean + sigma_s * noise,
        ids=ids_t,
        labels=labels_t,
        sigma_s=sigma_s,
        draws=draws,
        clean=clean if keep_clean else None,
        provenance=info,
    )


def targets_from_samples(
    samples: Tensor,
    sample_seeds: Tensor,
    labels: Tensor | None,
    sigma_s: float,
    *,
    num_draws: int = 1,
    seed: int = 0,
    max_targets: int | None = None,
    keep_clean: bool = True,
    provenance: dict[str, Any] | None = None,
) -> LatentTargets:
    """Targets ``x_j + sigma_s * n_{j,k}`` from generated samples x_j (B, *S) with their generation seeds (B,).

    The noise is keyed by the generation seed, so it does not depend on how the samples were batched or gathered.
    ``ids`` are -1 (no dataset image); ``labels`` are the conditioning labels (or -1).
    """
    _check_level(sigma_s, num_draws)
    if samples.ndim < 2 or len(samples) == 0:
        raise ValueError(f"samples must be a non-empty batch (B, *S), got shape {tuple(samples.shape)}")
    sample_seeds = torch.as_tensor(sample_seeds, dtype=torch.int64)
    if sample_seeds.shape != (len(samples),):
        raise ValueError(f"sample_seeds must have shape ({len(samples)},), got {tuple(sample_seeds.shape)}")
    if len(torch.unique(sample_seeds)) != len(sample_seeds):
        raise ValueError("sample_seeds must be distinct (they key the noise of each target)")
    if labels is None:
        labels = torch.full((len(samples),), -1, dtype=torch.int64)
    pairs = choose_subset(len(samples) * num_draws, max_targets, seed)
    rows, draws = pairs // num_draws, pairs % num_draws
    clean = samples.detach().cpu().to(torch.float32)[rows]
    noise = target_noise(seed, GENERATED_NOISE, sample_seeds[rows], draws, tuple(clean.shape[1:]))
    info = {"source": "generated", "sigma_s": float(sigma_s), "seed": seed, "num_draws": num_draws}
    info.update(max_targets=max_targets, num_targets=len(pairs), **(provenance or {}))
    return LatentTargets(
        latents=clean + sigma_s * noise,
        ids=torch.full((len(pairs),), -1, dtype=torch.int64),
        labels=torch.as_tensor(labels, dtype=torch.int64).cpu()[rows],
        sigma_s=sigma_s,
        draws=draws,
        clean=clean if keep_clean else None,
        provenance=info,
    )


@torch.no_grad()
def generate_samples(
    module: DiffusionModule, seeds: Tensor, spec: SamplerSpec | None = None, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """A model's samples for ``seeds`` (B,): ``(x (B, *S) on the CPU, labels (B,))`` via ``module.generate_many``.

    Labels are the generation conditions' ``"label"`` entries for a class-conditional model, else -1.
    """
    xs, labels = [], []
    for chunk, cond, result in module.generate_many(torch.as_tensor(seeds, dtype=torch.int64), batch_size, spec):
        xs.append(result.x.float().cpu())
        used = cond.get("label") if module.conditioner.conditional else None
        labels.append(used.cpu() if used is not None else torch.full_like(chunk, -1))
    if not xs:
        raise ValueError("no seeds given: no samples to generate")
    return torch.cat(xs), torch.cat(labels)


def targets_from_model(
    module: DiffusionModule,
    num_samples: int,
    sigma_s: float,
    *,
    seed_offset: int = 0,
    spec: SamplerSpec | None = None,
    batch_size: int = 256,
    num_draws: int = 1,
    seed: int = 0,
    max_targets: int | None = None,
    keep_clean: bool = True,
    provenance: dict[str, Any] | None = None,
) -> LatentTargets:
    """Targets from a model's own samples (seeds ``seed_offset ..``), pushed to sigma_s (single process)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seeds = torch.arange(seed_offset, seed_offset + num_samples, dtype=torch.int64)
    x, labels = generate_samples(module, seeds, spec, batch_size)
    info = {"model_class": f"{type(module).__module__}.{type(module).__qualname__}", "seed_offset": seed_offset}
    info.update(sampler=getattr(spec, "tag", None), **(provenance or {}))
    return targets_from_samples(
        x,
        seeds,
        labels,
        sigma_s,
        num_draws=num_draws,
        seed=seed,
        max_targets=max_targets,
        keep_clean=keep_clean,
        provenance=info,
    )
