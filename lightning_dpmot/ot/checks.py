"""Input checks shared by the OT solvers: cost matrices and scalar settings, one ``ValueError`` naming the problem.

Every public solver entry point (``solve_assignment``, ``auction_assignment``, ``sinkhorn_assignment``,
``sinkhorn_potentials``, ``SemiDiscreteConfig``) validates through these helpers, so NaN, infinite, negative or
out-of-range settings fail at the call with the setting's name instead of hanging or returning garbage (a NaN
``reg`` made Sinkhorn's epsilon schedule loop forever; a NaN ``eps`` made every Adam step NaN).
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor


def check_cost_matrix(cost: Any) -> None:
    """Raise ``ValueError`` unless ``cost`` is a finite, real, square (n, n) tensor.

    Args:
        cost: the candidate (n, n) cost matrix.
    """
    if not isinstance(cost, Tensor):
        raise ValueError(f"cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 2:
        raise ValueError(f"cost must be a 2-D (n, n) matrix, got shape {tuple(cost.shape)}")
    if cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square (n, n) for a one-to-one assignment, got shape {tuple(cost.shape)}")
    if cost.dtype == torch.bool or cost.is_complex():
        raise ValueError(f"cost must be a real-valued matrix, got dtype {cost.dtype}")
    # one reduction in the common case; the entry count only when the sum is not finite (NaN/inf or overflow)
    if cost.is_floating_point() and not math.isfinite(float(cost.detach().sum(dtype=torch.float64))):
        bad = int((~torch.isfinite(cost)).sum())
        if bad:
            raise ValueError(f"cost contains NaN or inf entries ({bad} of {cost.numel()}); costs must be finite")


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite real number."""
    return _real(name, value)


def positive(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is finite and > 0."""
    value = _real(name, value)
    if not value > 0.0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def in_open_unit_interval(name: str, value: Any) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless 0 < value < 1."""
    value = _real(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return value


def integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int; ``ValueError`` naming ``name`` unless it is an integer >= ``minimum``.

    Integral floats (``8192.0``, e.g. from YAML) are accepted; booleans, fractions, NaN and inf are not.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if isinstance(value, Integral):
        result = int(value)
    elif isinstance(value, Real) and math.isfinite(float(value)) and float(value) == int(value):
        result = int(value)
    else:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if result < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {result}")
    return result


def finite_tensor(name: str, value: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` if the floating tensor ``value`` has NaN or infinite entries."""
    if value.is_floating_point():
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise ValueError(f"{name} contains NaN or infinite values ({bad} of {value.numel()} entries)")


__all__ = [
    "check_cost_matrix",
    "finite",
    "finite_tensor",
    "in_open_unit_interval",
    "integer",
    "positive",
]
