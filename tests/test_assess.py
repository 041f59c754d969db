"""Assessment of a field against exact answers: det J of linear maps, Dice of shifted boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.volumes import grid_affine, rotation
from vitreg.assess import assess, end_point_error
from vitreg.field import DisplacementField
from vitreg.image import Volume

SHAPE = (20, 24, 18)


def volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(data=data, affine=affine, header=None, path="grid")


def linear_field(grid: Volume, matrix: np.ndarray) -> DisplacementField:
    """d(x) = B x in RAS mm at every voxel centre x of ``grid``: the map x -> (I + B) x."""
    index = np.indices(grid.shape).reshape(3, -1)
    world = grid.affine[:3, :3] @ index + grid.affine[:3, 3:4]
    disp = (matrix @ world).reshape(3, *grid.shape)
    return DisplacementField(disp_mm=torch.from_numpy(disp[None]).float(), grid=grid)


@pytest.mark.parametrize("diagonal", [(0.2, -0.1, 0.05), (-1.5, 0.0, 0.0)])
def test_det_j_of_a_linear_map_is_its_determinant_on_any_grid(diagonal):
    """x -> (I + B) x has det J = det(I + B) everywhere, whatever the voxel axes and sizes
    (the voxel-frame Jacobian is similar to the world one)."""
    grid = volume(np.ones(SHAPE), grid_affine(rotation(25, 1) @ np.diag([1.2, 2.0, 1.5]), SHAPE))
    matrix = np.diag(diagonal) + 0.05 * np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    expected = float(np.linalg.det(np.eye(3) + matrix))
    measured = assess(linear_field(grid, matrix), grid)
    np.testing.assert_allclose(measured.jacdet, expected, rtol=1e-4)
    head = measured.voxels  # the foreground of a constant image: every voxel
    assert head == np.prod(SHAPE)
    folded = expected <= 0
    assert measured.folding.count_nonpositive == (head if folded else 0)
    assert measured.folding.sdlogj == pytest.approx(0.0, abs=1e-4)


def test_dice_before_and_after_of_a_box_moved_by_whole_voxels():
    """A 10-voxel box and its copy 3 voxels (6 mm) along x: Dice (10 - 3) / 10 before, 1 after
    the true pull field d = +6 mm; its end-point error is 0, that of no motion 6 mm."""
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), SHAPE)
    fixed_labels = np.zeros(SHAPE, np.int64)
    fixed_labels[5:15, 6:16, 4:12] = 7
    moving_labels = np.roll(fixed_labels, 3, axis=0)
    fixed = volume(fixed_labels.astype(np.float32) + 1, affine)
    labels = (volume(fixed_labels, affine), volume(moving_labels, affine))
    shift = torch.zeros(1, 3, *SHAPE)
    shift[:, 0] = 6.0  # fixed point x -> moving point x + 6 mm (the RAS x axis is axis 0)
    truth = DisplacementField(disp_mm=shift, grid=fixed)
    measured = assess(truth, fixed, labels, true_field=truth)
    assert measured.dice_before.scores == {7: pytest.approx(0.7)}
    assert measured.dice_after.scores == {7: pytest.approx(1.0)}
    assert measured.epe_mm == pytest.approx(0.0)
    still = DisplacementField(disp_mm=torch.zeros_like(shift), grid=fixed)
    assert end_point_error(still, truth) == pytest.approx(6.0)
    assert assess(still, fixed, labels, true_field=truth).summary()["dice_after"] == 0.7
