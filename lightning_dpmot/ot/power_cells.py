"""Blocked power-diagram (Laguerre-cell) queries: argmax, top-k and Monte Carlo source samples.

For targets ``y_i`` (rows of Y, (N, d)) and heights ``h`` (N,), the score of a point x is
``s_i(x) = <x, y_i> + h_i`` and x lies in the power cell ``W_i(h)`` of the best-scoring target. These kernels
never materialise the full (B, N) score matrix: the targets are visited in blocks of ``target_chunk_size``
rows, each block costs one fp32 GEMM with h folded in as the bias (``addmm``), and a running (value, index)
maximum is merged across blocks. Peak extra memory is one (B, target_chunk_size) score block.

Ties resolve to the lowest target index, both inside a block (``max`` returns the first maximum) and across
blocks (a later block must be strictly better), so the result does not depend on the block size as long as the
GEMM rounds each score identically.

Precision: the GEMMs run in fp32. TF32 or bf16 matmuls (``torch.backends.cuda.matmul.allow_tf32``, Lightning's
``torch.set_float32_matmul_precision("high")``) round scores to ~1e-3 relative and mis-assign samples near
cell faces; GPU users should call ``torch.set_float32_matmul_precision("highest")``. Nothing here changes
global settings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_dpmot.utils.random import make_generator

Source = Literal["gaussian", "uniform"]

#: Standard deviation of one coordinate of each source: N(0, 1) and the centred cube U[-1/2, 1/2].
SOURCE_STD: dict[str, float] = {"gaussian": 1.0, "uniform": 1.0 / math.sqrt(12.0)}

#: Stream tags mixed into the Monte Carlo seeds: optimisation samples and held-out evaluation samples.
TRAIN_STREAM, EVAL_STREAM = 0, 1


def check_source(source: str) -> None:
    """Raise ``ValueError`` unless ``source`` is ``"gaussian"`` or ``"uniform"``."""
    if source not in SOURCE_STD:
        raise ValueError(f"source must be 'gaussian' or 'uniform' (centred cube [-1/2, 1/2]^d), got {source!r}")


def check_targets(targets: Tensor) -> None:
    """Raise ``ValueError`` unless ``targets`` is a non-empty, finite, floating (N, d) tensor."""
    if not isinstance(targets, Tensor) or targets.ndim != 2:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 2-D tensor (N, d), got {shape}")
    if targets.shape[0] == 0 or targets.shape[1] == 0:
        raise ValueError(
            f"targets is empty: need at least one point of dimension >= 1, got shape {tuple(targets.shape)}"
        )
    if not targets.is_floating_point():
        raise ValueError(f"targets must be a floating-point tensor, got {targets.dtype}")
    bad = (~torch.isfinite(targets)).sum().item()
    if bad:
        raise ValueError(f"targets contain NaN or infinite values ({bad} non-finite entries)")


def check_masses(masses: Tensor, n: int) -> Tensor:
    """Validate target masses (N,): positive, finite, summing to 1; returns them in float64, renormalised."""
    masses = torch.as_tensor(masses, dtype=torch.float64)
    if masses.shape != (n,):
        raise ValueError(f"masses must have shape ({n},) to match the {n} targets, got {tuple(masses.shape)}")
    if not torch.isfinite(masses).all():
        raise ValueError("masses contain NaN or infinite values")
    if (masses <= 0).any():
        raise ValueError(f"masses must be positive, got minimum {masses.min().item():.3g}")
    total = masses.sum().item()
    if abs(total - 1.0) > 1e-4:
        raise ValueError(f"masses must sum to 1, got {total:.6g}")
    return masses / masses.sum()


def chunk_generator(
    seed: int, stream: int, iteration: int, chunk: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Generator of Monte Carlo chunk ``chunk`` at ``iteration``.

    Mixing rule: ``torch.Generator(device).manual_seed(mix_seed(seed, stream, iteration, chunk))`` with
    :func:`lightning_dpmot.utils.random.mix_seed` (SplitMix64 chaining of the four integers). The samples of a
    chunk therefore depend only on these four numbers (and the device type), not on which process draws them
    or on what was drawn before: resuming needs no RNG state and any rank can draw any chunk.
    """
    return make_generator(seed, stream, iteration, chunk, device=device)


def sample_source(
    source: Source,
    num: int,
    dim: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    out: Tensor | None = None,
) -> Tensor:
    """Draw ``num`` source samples, (num, dim) fp32: N(0, I) or uniform on the cube [-1/2, 1/2]^dim.

    ``out``, a (num, dim) fp32 tensor on ``device``, is filled in place instead of allocating (same numbers).
    """
    check_source(source)
    if out is None:
        out = torch.empty(num, dim, device=device, dtype=torch.float32)
    if source == "gaussian":
        return out.normal_(generator=generator)
    return out.uniform_(generator=generator).sub_(0.5)


def score_workspace(
    rows: int, num_targets: int, target_chunk_size: int, antithetic: bool, device: torch.device
) -> Tensor:
    """Flat fp32 buffer for the score blocks of :func:`power_argmax` (two blocks when ``antithetic``)."""
    return torch.empty((2 if antithetic else 1) * rows * min(num_targets, target_chunk_size), device=device)


def _merge_max(best: tuple[Tensor, Tensor] | None, val: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Merge a block's (value, index) maxima into the running maxima; ties keep the earlier block."""
    if best is None:
        return val, idx
    best_val, best_idx = best
    better = val > best_val
    return torch.where(better, val, best_val), torch.where(better, idx, best_idx)


def _fp32_gemms(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(x, ...)`` with autocast disabled on x's device: the cell-deciding score differences are O(1)
    against scores of O(||x|| ||y||), which bf16/fp16 (and TF32) GEMMs would mis-rank (dpm-ot.md 6.3)."""

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return fn(x, *args, **kwargs)

    return wrapper


@_fp32_gemms
def power_argmax(
    x: Tensor,
    targets: Tensor,
    h: Tensor,
    target_chunk_size: int,
    antithetic: bool = False,
    workspace: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Best score and cell index per point, blocked over targets.

    Args:
        x: (B, d) fp32 points.
        targets: (N, d) fp32 targets Y.
        h: (N,) fp32 heights.
        target_chunk_size: targets per GEMM block.
        antithetic: also score the reflected points ``-x`` from the same GEMM (``s_i(-x) = h_i - <x, y_i>``).
        workspace: optional buffer from :func:`score_workspace` to hold the score blocks (no allocation).

    Returns:
        ``(values, indices)``: ``max_i <x_b, y_i> + h_i`` (fp32) and its argmax (int64), each (B,), or (2B,)
        for ``[x; -x]`` when ``antithetic``.
    """
    rows = x.shape[0]
    if workspace is None:
        workspace = score_workspace(rows, targets.shape[0], target_chunk_size, antithetic, x.device)
    best: tuple[Tensor, Tensor] | None = None
    best_neg: tuple[Tensor, Tensor] | None = None
    for start in range(0, targets.shape[0], target_chunk_size):
        y_b, h_b = targets[start : start + target_chunk_size], h[start : start + target_chunk_size]
        scores = workspace[: rows * len(h_b)].view(rows, len(h_b))  # (B, Bt), contiguous
        if antithetic:
            gram = torch.mm(x, y_b.T, out=workspace[rows * len(h_b) : 2 * rows * len(h_b)].view(rows, len(h_b)))
            val, idx = torch.add(gram, h_b, out=scores).max(dim=1)
            best = _merge_max(best, val, idx + start)
            val, idx = torch.sub(h_b, gram, out=scores).max(dim=1)
            best_neg = _merge_max(best_neg, val, idx + start)
        else:
            val, idx = torch.addmm(h_b, x, y_b.T, out=scores).max(dim=1)
            best = _merge_max(best, val, idx + start)
    assert best is not None
    if best_neg is None:
        return best
    return torch.cat([best[0], best_neg[0]]), torch.cat([best[1], best_neg[1]])


@_fp32_gemms
def power_topk(x: Tensor, targets: Tensor, h: Tensor, k: int, target_chunk_size: int) -> tuple[Tensor, Tensor]:
    """The k best scores and their cell indices per point, blocked over targets.

    Args:
        x: (B, d) fp32 points; targets: (N, d); h: (N,); k: 1 <= k <= N; target_chunk_size: targets per block.

    Returns:
        ``(scores, indices)``, each (B, k), sorted by decreasing score; ``indices[:, 0]`` is the power cell.
    """
    best: tuple[Tensor, Tensor] | None = None
    for start in range(0, targets.shape[0], target_chunk_size):
        y_b, h_b = targets[start : start + target_chunk_size], h[start : start + target_chunk_size]
        val, idx = torch.addmm(h_b, x, y_b.T).topk(min(k, y_b.shape[0]), dim=1)
        idx = idx + start
        if best is not None:
            val, pos = torch.cat([best[0], val], dim=1).topk(min(k, best[0].shape[1] + val.shape[1]), dim=1)
            idx = torch.cat([best[1], idx], dim=1).gather(1, pos)
        best = (val, idx)
    assert best is not None
    return best
