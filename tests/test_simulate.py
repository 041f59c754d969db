"""Random deformations and intensity changes: seeded, of the stated size, diffeomorphic."""

from __future__ import annotations

import numpy as np
import torch

from vitreg.metrics import jacobian_determinant
from vitreg.simulate import (
    bias_field,
    max_displacement,
    random_contrast,
    random_deformation,
    random_intensity,
)

SHAPE = (32, 36, 30)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_deformation_is_reproducible_for_a_seed_and_differs_between_seeds():
    first = random_deformation(SHAPE, 5.0, generator=seeded(1))
    again = random_deformation(SHAPE, 5.0, generator=seeded(1))
    other = random_deformation(SHAPE, 5.0, generator=seeded(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_deformation_reaches_the_stated_maximum_in_mm_without_folding():
    spacing = (2.0, 1.5, 1.0)
    flow = random_deformation(
        SHAPE, 6.0, spacing, scales_mm=(32.0, 16.0), batch=2, generator=seeded(3)
    )
    assert flow.shape == (2, 3, *SHAPE)
    reached = max_displacement(flow, spacing)
    np.testing.assert_allclose(reached.numpy(), [6.0, 6.0], rtol=0.05)
    for item in flow:
        assert jacobian_determinant(item.numpy())[2:-2, 2:-2, 2:-2].min() > 0


def test_contrast_curve_is_monotonic_and_keeps_zero_and_the_maximum():
    ramp = torch.linspace(0, 100, 1000).view(1, 1, 10, 10, 10)
    curve = random_contrast(ramp, spread=0.8, generator=seeded(4)).flatten()
    assert (curve[1:] >= curve[:-1] - 1e-4).all()
    assert abs(float(curve[0])) < 1e-5 and abs(float(curve[-1]) - 100) < 1e-3
    assert not torch.allclose(curve, ramp.flatten(), atol=1.0)


def test_bias_field_is_positive_smooth_and_seeded():
    field = bias_field(SHAPE, 0.5, spacing_vox=16, batch=2, generator=seeded(5))
    assert field.shape == (2, 1, *SHAPE) and (field > 0).all()
    assert float(field.diff(dim=2).abs().max()) < 0.2
    assert torch.equal(field, bias_field(SHAPE, 0.5, 16, 2, generator=seeded(5)))


def test_intensity_changes_keep_the_shape_and_a_positive_correlation():
    image = torch.rand(1, 1, *SHAPE, generator=seeded(6)) * 100
    changed = random_intensity(image, generator=seeded(7))
    assert changed.shape == image.shape and torch.isfinite(changed).all()
    correlation = np.corrcoef(image.flatten().numpy(), changed.flatten().numpy())[0, 1]
    assert 0.5 < correlation < 0.9999
