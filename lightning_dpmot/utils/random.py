"""Counter-based randomness: generators derived from (seed, rank, step, ...) instead of a global RNG stream.

``seed_everything`` gives every DDP rank the same ``torch.randn`` stream, which would give every rank the same
diffusion noise (and shrink a global OT coupling's noise pool). Deriving a fresh generator from
(seed, global rank, step) keeps ranks independent, makes a resumed run draw exactly the noise the uninterrupted
run would have drawn, and needs no RNG state in checkpoints.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*keys: int) -> int:
    """Hash integers into one 63-bit seed (SplitMix64 chaining); different key tuples give unrelated seeds."""
    h = 0x2545F4914F6CDD1D
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


def global_seed(default: int = 0) -> int:
    """The run's seed: ``PL_GLOBAL_SEED`` (set by ``seed_everything`` / the CLI), else ``default``."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def make_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``mix_seed(*keys)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(*keys))
    return gen


class StackedGenerator:
    """One generator per sample (EDM's per-image seeds): sample i's noise depends only on ``seeds[i]``, so results
    do not depend on batch size, batch composition or device count.

    Args:
        seeds: (B,) int64 per-sample seeds.
        device: where the noise is created.
    """

    def __init__(self, seeds: Tensor | list[int], device: torch.device | str = "cpu") -> None:
        seeds = seeds.tolist() if isinstance(seeds, Tensor) else list(seeds)
        self.generators = [make_generator(s, device=device) for s in seeds]
        self.device = torch.device(device)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard normal noise, row i from generator i."""
        return torch.stack([torch.randn(shape, generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} but {len(self.generators)} per-sample generators")
        return self.randn(tuple(x.shape[1:]), dtype=x.dtype).to(x.device)
