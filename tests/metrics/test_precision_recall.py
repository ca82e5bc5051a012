"""Improved precision/recall: identical sets, disjoint sets, a constructed case with known fractions."""

from __future__ import annotations

import pytest
import torch

from lightning_dpmot.metrics.precision_recall import inside_manifold, manifold_radii, precision_recall


def _line(n: int, y: float, x0: float = 0.0) -> torch.Tensor:
    """n points (x0 + i, y) with unit spacing."""
    return torch.stack([x0 + torch.arange(n, dtype=torch.float32), torch.full((n,), y)], dim=1)


def test_radii_on_a_lattice() -> None:
    radii = manifold_radii(_line(10, 0.0), k=3, chunk_size=4)
    # interior: neighbours at 1, 1, 2 -> radius 2; ends: 1, 2, 3 -> 3; second points: 1, 1, 2 -> 2
    assert radii.tolist() == [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0]


def test_boundary_counts_as_inside() -> None:
    manifold, radii = _line(1, 0.0), torch.tensor([2.0])
    inside = inside_manifold(torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.5]]), manifold, radii)
    assert inside.tolist() == [True, True, False]


def test_identical_sets_give_one_and_one() -> None:
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    result = precision_recall(x, x.clone(), chunk_size=64)
    assert (result.precision, result.recall, result.k) == (1.0, 1.0, 3)


def test_disjoint_far_sets_give_zero_and_zero() -> None:
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(150, 8, generator=g), torch.randn(120, 8, generator=g) + 100.0
    result = precision_recall(real, fake, chunk_size=50)
    assert (result.precision, result.recall) == (0.0, 0.0)


def test_known_fractions() -> None:
    # real: two lattice lines A (y=0) and C (y=1000); fake: a copy of A plus 150 points on a far line B
    line_a, line_c = _line(50, 0.0), _line(50, 1000.0)
    line_b = _line(150, -1000.0)
    real, fake = torch.cat([line_a, line_c]), torch.cat([line_a, line_b])
    result = precision_recall(real, fake, k=3, chunk_size=32)
    assert result.precision == pytest.approx(50 / 200)  # only the copy of A lies on the real manifold
    assert result.recall == pytest.approx(50 / 100)  # line C is not covered by the fake manifold
    swapped = precision_recall(fake, real, k=3, chunk_size=32)
    assert (swapped.precision, swapped.recall) == (result.recall, result.precision)


def test_precomputed_real_radii_and_chunking_do_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(130, 6, generator=g), 1.3 * torch.randn(90, 6, generator=g) + 0.4
    base = precision_recall(real, fake, k=5, chunk_size=1000)
    assert 0.0 < base.precision < 1.0 and 0.0 < base.recall < 1.0
    radii = manifold_radii(real, k=5)
    again = precision_recall(real, fake, k=5, chunk_size=17, real_radii=radii)
    assert (again.precision, again.recall) == (base.precision, base.recall)


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="a k=3 manifold needs more than 3 points, got 3"):
        manifold_radii(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"radii must have shape \(4,\)"):
        inside_manifold(torch.zeros(2, 2), torch.zeros(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="queries have 3 dims per point but the manifold has 2"):
        inside_manifold(torch.zeros(2, 3), torch.zeros(4, 2), torch.ones(4))
