"""Shared helpers of the DPM-OT experiment: unclamped expressway sampling and small file utilities."""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_dpmot.models.dpm_ot import _OT_NOISE, _RENOISE, DPMOTModule
from lightning_dpmot.models.generation import PREDICT_STREAM
from lightning_dpmot.sampling.spec import SamplerSpec
from lightning_dpmot.utils.random import StackedGenerator, make_generator, mix_seed

EXP_DIR = Path(__file__).resolve().parent


def expressway_unclamped(module: DPMOTModule, seeds: Tensor, spec: SamplerSpec) -> tuple[Tensor, Tensor, float, float]:
    """DPMOTModule.expressway without the final clamp to [-1, 1] (needed for 2-D points).

    Uses the module's own per-seed streams, so for images the result equals ``expressway`` before clamping.
    Returns (x (B, *S) float32, target index (B,), map seconds, reverse-process seconds).
    """
    sigmas = module.sigmas_for(spec)
    noise = module.ot_map.sample_noise([make_generator(s, _OT_NOISE) for s in seeds.tolist()])
    renoise = StackedGenerator([mix_seed(s, _RENOISE) for s in seeds.tolist()])
    start = time.perf_counter()
    mapped = module.ot_map(noise, renoise)
    map_seconds = time.perf_counter() - start
    latents = mapped.latents.unflatten(1, module.data_shape)
    churn = StackedGenerator(seeds + PREDICT_STREAM)
    start = time.perf_counter()
    result = module.inner.sample_from(latents.double(), sigmas, spec=spec, generator=churn)
    return result.x.float(), mapped.index, map_seconds, time.perf_counter() - start


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write dict rows (union of keys, in first-seen order) to a CSV file."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def fmt(value: Any, digits: int = 3) -> str:
    """Format a table cell: floats to ``digits`` significant places, None as a dash."""
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
    """A GitHub markdown table of ``columns`` from dict rows."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
