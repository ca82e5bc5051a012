"""Cutouts: shapes, the identity view, crops inside the image, per-sample randomness, differentiability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_dpmot.diffusion.cutouts import CutoutSpec, make_cutouts
from lightning_dpmot.diffusion.guidance_schedules import Piecewise
from lightning_dpmot.utils.random import make_generator

PLAIN = dict(flip_p=0.0, rotate_deg=0.0, translate=0.0, gray_p=0.0, noise_std=0.0)


def gens(n: int, offset: int = 0) -> list[torch.Generator]:
    return [make_generator(offset + i) for i in range(n)]


def test_shapes_and_scheduled_counts() -> None:
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    spec = CutoutSpec(overview=Piecewise([[1, 4], [1, 1]]), inner=3)
    assert make_cutouts(images, 8, spec, tau=1.0, generators=gens(3)).shape == (3, 7, 3, 8, 8)
    assert make_cutouts(images, 24, spec, tau=0.2, generators=gens(3)).shape == (3, 4, 3, 24, 24)
    with pytest.raises(ValueError, match="no view"):
        CutoutSpec(overview=0, inner=0).counts(0.5)
    with pytest.raises(ValueError, match="one generator per image"):
        make_cutouts(images, 8, spec, 1.0, gens(2))


def test_plain_overview_is_the_bilinear_resize() -> None:
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    views = make_cutouts(images, 8, CutoutSpec(overview=1, inner=0, **PLAIN), 0.5, gens(2))
    reference = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(views[:, 0], reference, atol=1e-6)
    same = make_cutouts(images, 16, CutoutSpec(overview=1, inner=0, **PLAIN), 0.5, gens(2))
    assert torch.allclose(same[:, 0], images, atol=1e-6)


def test_inner_crops_stay_inside_the_image_and_are_smaller() -> None:
    ramp = torch.linspace(-1, 1, 64).expand(1, 3, 64, 64).clone()  # value = horizontal position
    views = make_cutouts(ramp, 16, CutoutSpec(overview=0, inner=32, min_size=0.25, **PLAIN), 0.5, gens(1))
    spans = views[0, :, 0].amax((1, 2)) - views[0, :, 0].amin((1, 2))
    assert (spans < 2.0).all() and (spans > 0.2).all()  # crops, none the whole image, none degenerate
    assert views.amin() >= -1 and views.amax() <= 1
    assert spans.std() > 0.05  # random sizes


def test_views_of_a_sample_do_not_depend_on_its_batch() -> None:
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    spec = CutoutSpec()  # all augmentations on
    batch = make_cutouts(images, 8, spec, 0.7, gens(3))
    alone = make_cutouts(images[1:2], 8, spec, 0.7, gens(1, offset=1))
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])


def test_views_are_differentiable_and_grayscale_has_equal_channels() -> None:
    images = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    views = make_cutouts(images, 8, CutoutSpec(overview=2, inner=2, gray_p=1.0, noise_std=0.0), 0.5, gens(1))
    assert torch.allclose(views[:, :, 0], views[:, :, 1]) and torch.allclose(views[:, :, 1], views[:, :, 2])
    views.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
