"""The model frame against nibabel and scipy: grids, resampling, labels, intensities, fields."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to
from scipy import ndimage

from tests.volumes import blob_image, grid_affine, rotation, write
from vitreg.errors import VitregError
from vitreg.frame import (
    ModelFrame,
    flow_to_native_mm,
    foreground_center_mm,
    frame_affine,
    frame_image,
    frame_labels,
    frame_mask,
    frame_pair,
    grid_coordinates,
    normalise,
    on_lattice,
    resample,
)
from vitreg.image import load_image, load_labels

SMALL = ModelFrame(orientation="LIA", spacing=(1.5, 1.25, 1.0), shape=(32, 32, 64))
SOURCE_SHAPE = (30, 34, 26)
SOURCE_AFFINE = grid_affine(rotation(12, 2) @ rotation(-7, 0) @ np.diag([2.0, 1.8, 2.2]),
                            SOURCE_SHAPE, (3.0, -4.0, 2.0))  # fmt: skip


@pytest.mark.parametrize("orientation", ["LIA", "RAS", "PSL", "ILP"])
def test_frame_affine_has_the_codes_spacing_and_centre_nibabel_reads(orientation):
    frame = ModelFrame(orientation=orientation, spacing=(1.5, 1.25, 2.0), shape=(32, 64, 96))
    centre = np.array([10.0, -20.0, 5.0])
    affine = frame_affine(frame, centre)
    assert nib.aff2axcodes(affine) == tuple(orientation)
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), frame.spacing)
    middle = nib.affines.apply_affine(affine, (np.array(frame.shape) - 1) / 2)
    np.testing.assert_allclose(middle, centre)


def test_frame_round_trips_through_a_dict_and_refuses_bad_values():
    assert ModelFrame.from_dict(SMALL.to_dict()) == SMALL
    assert "intensity_divisor" not in SMALL.to_dict()  # old checkpoints and caches unchanged
    fixed_scale = ModelFrame(intensity_divisor=255.0)
    assert ModelFrame.from_dict(fixed_scale.to_dict()) == fixed_scale
    assert ModelFrame.from_dict({"orientation": "LIA", "spacing": [1, 1, 1], "shape": [32] * 3})
    with pytest.raises(VitregError, match="malformed model frame"):
        ModelFrame.from_dict({"orientation": "LIA", "spacing": [1, 1, 1]})
    with pytest.raises(VitregError, match="L/R, A/P and S/I"):
        ModelFrame(orientation="LLA")
    with pytest.raises(VitregError, match="intensity_divisor"):
        ModelFrame(intensity_divisor=0.0)


def test_foreground_centre_is_the_middle_of_the_head_box(tmp_path):
    data = np.zeros(SOURCE_SHAPE, dtype=np.float32)
    data[4:20, 10:31, 3:12] = 100.0
    data[0, 0, 0] = 5.0  # below 10 % of the head's level: not foreground
    volume = load_image(write(tmp_path / "box.nii.gz", data, SOURCE_AFFINE))
    expected = volume.affine @ np.array([(4 + 19) / 2, (10 + 30) / 2, (3 + 11) / 2, 1.0])
    np.testing.assert_allclose(foreground_center_mm(volume), expected[:3], atol=1e-9)


def test_grid_coordinates_are_the_inverse_source_affine_times_the_target_one():
    target_shape = (5, 6, 7)
    target = frame_affine(SMALL, np.array([1.0, 2.0, 3.0]))
    coords = grid_coordinates(SOURCE_AFFINE, target, target_shape)[0].numpy()
    index = np.indices(target_shape).reshape(3, -1)
    homogeneous = np.vstack([index, np.ones(index.shape[1])])
    expected = (np.linalg.inv(SOURCE_AFFINE) @ target @ homogeneous)[:3].reshape(3, *target_shape)
    np.testing.assert_allclose(coords, expected, atol=1e-4)


def test_resample_equals_scipy_map_coordinates_through_world_coordinates():
    data = blob_image(SOURCE_SHAPE, seed=3)
    target = frame_affine(SMALL, np.array([2.0, -3.0, 1.0]))
    ours = resample(data, SOURCE_AFFINE, target, SMALL.shape)[0, 0].numpy()
    index = np.indices(SMALL.shape).reshape(3, -1)
    world = target[:3, :3] @ index + target[:3, 3:4]
    source_index = np.linalg.inv(SOURCE_AFFINE[:3, :3]) @ (world - SOURCE_AFFINE[:3, 3:4])
    expected = ndimage.map_coordinates(data, source_index, order=1, mode="constant", cval=0.0)
    expected = expected.reshape(SMALL.shape)
    inside = np.all((source_index > 0) & (source_index < np.array(SOURCE_SHAPE)[:, None] - 1), 0)
    assert inside.mean() > 0.3  # the comparison covers much of the frame
    inside = inside.reshape(SMALL.shape)
    np.testing.assert_allclose(ours[inside], expected[inside], rtol=1e-4, atol=1e-2)
    # Beyond the source grid's outer voxel centres by more than a voxel: zero.
    outside = np.any((source_index < -1) | (source_index > np.array(SOURCE_SHAPE)[:, None]), 0)
    assert np.all(ours[outside.reshape(SMALL.shape)] == 0)


def test_frame_image_is_nibabel_resampling_then_percentile_scaling(tmp_path):
    data = blob_image(SOURCE_SHAPE, seed=4)
    volume = load_image(write(tmp_path / "image.nii.gz", data, SOURCE_AFFINE))
    grid = frame_affine(SMALL, foreground_center_mm(volume))
    ours = frame_image(SMALL, volume, grid)[0, 0].numpy()
    theirs = resample_from_to(
        nib.Nifti1Image(data, SOURCE_AFFINE), (SMALL.shape, grid), order=1, cval=0.0
    ).get_fdata()
    foreground = theirs[theirs > 0]
    low, high = np.percentile(foreground, SMALL.percentiles)
    expected = np.clip((theirs - low) / (high - low), 0, 1)
    assert ours.shape == SMALL.shape and ours.min() == 0.0 and ours.max() == 1.0
    assert np.abs(ours - expected).mean() < 1e-3
    assert np.abs(ours - expected).max() < 0.05  # where nibabel's edge handling differs


def test_intensity_divisor_scales_by_a_fixed_number_instead_of_percentiles():
    image = torch.tensor([0.0, 55.0, 110.0, 255.0, 400.0]).view(1, 1, 5, 1, 1)
    fixed_scale = ModelFrame(intensity_divisor=255.0)
    np.testing.assert_allclose(
        normalise(fixed_scale, image).flatten().numpy(), [0, 55 / 255, 110 / 255, 1, 1]
    )
    # The same brain twice as bright: percentiles hide it, a fixed divisor does not.
    assert torch.equal(normalise(ModelFrame(), image), normalise(ModelFrame(), 2 * image))
    assert not torch.equal(normalise(fixed_scale, image), normalise(fixed_scale, 2 * image))


def test_frame_labels_is_nibabel_nearest_neighbour_with_values_kept(tmp_path):
    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 5, (8, 9, 7)), 4, order=0)[:30, :34, :26]
    labels = np.where(labels == 4, 1035, labels).astype(np.int32)  # a cortical parcel number
    path = write(tmp_path / "labels.nii.gz", labels, SOURCE_AFFINE)
    volume = load_labels(path)
    grid = frame_affine(SMALL, np.array([0.3, -0.7, 0.45]))  # no sample point on a mid-voxel
    ours = frame_labels(SMALL, volume, grid)[0, 0].numpy()
    theirs = resample_from_to(
        nib.Nifti1Image(labels, volume.affine), (SMALL.shape, grid), order=0, cval=0
    ).get_fdata()
    index = np.indices(SMALL.shape).reshape(3, -1).T
    source = nib.affines.apply_affine(np.linalg.inv(volume.affine) @ grid, index)
    size = np.array(SOURCE_SHAPE)
    inside = np.all((source >= 0) & (source <= size - 1), axis=1).reshape(SMALL.shape)
    outside = np.any((source < -0.5) | (source > size - 0.5), axis=1).reshape(SMALL.shape)
    assert inside.mean() > 0.3 and outside.any()
    assert set(np.unique(ours)) <= {0, 1, 2, 3, 1035}
    assert (ours == 1035).sum() > 100
    assert np.array_equal(ours[inside], theirs[inside])
    assert np.all(ours[outside] == 0)


def test_frame_mask_is_nibabel_trilinear_of_the_binary_mask_above_one_half(tmp_path):
    rng = np.random.default_rng(1)
    mask = ndimage.zoom(rng.integers(0, 2, (6, 7, 5)), 5, order=0)[:30, :34, :26] * 3
    volume = load_labels(write(tmp_path / "mask.nii.gz", mask.astype(np.uint8), SOURCE_AFFINE))
    grid = frame_affine(SMALL, np.array([0.3, -0.7, 0.45]))
    ours = frame_mask(SMALL, volume, grid)[0, 0].numpy()
    binary = nib.Nifti1Image((mask > 0).astype(np.float32), volume.affine)
    share = resample_from_to(binary, (SMALL.shape, grid), order=1, cval=0).get_fdata()
    index = np.indices(SMALL.shape).reshape(3, -1).T
    source = nib.affines.apply_affine(np.linalg.inv(volume.affine) @ grid, index)
    inside = np.all((source >= 0) & (source <= np.array(SOURCE_SHAPE) - 1), axis=1)
    clear = inside.reshape(SMALL.shape) & (np.abs(share - 0.5) > 1e-3)  # away from ties
    assert set(np.unique(ours)) == {0.0, 1.0} and 0.1 < ours.mean() < 0.8
    assert np.array_equal(ours[clear], (share[clear] > 0.5).astype(np.float32))


def test_frame_pair_puts_both_images_on_one_grid_centred_on_the_fixed_head(tmp_path):
    data = blob_image(SOURCE_SHAPE, seed=5)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", data, SOURCE_AFFINE))
    moving_affine = SOURCE_AFFINE.copy()
    moving_affine[:3, 3] += [4.0, 0.0, 0.0]
    moving = load_image(write(tmp_path / "moving.nii.gz", data, moving_affine))
    frame = ModelFrame(orientation="LIA", spacing=(2.5, 2.5, 2.5), shape=(32, 32, 32))
    pair = frame_pair(frame, fixed, moving)
    np.testing.assert_allclose(pair.affine, frame_affine(frame, foreground_center_mm(fixed)))
    assert pair.fixed.shape == pair.moving.shape == (1, 1, *frame.shape)
    # The moving head is the fixed one 4 mm further right (+x): frame axis 0 points Left
    # with 2.5 mm voxels, so its content sits 4 / 2.5 voxels lower along axis 0.
    weights = [t[0, 0].numpy() for t in (pair.fixed, pair.moving)]
    assert all(w[0].max() == w[-1].max() == 0 for w in weights)  # whole heads in the frame
    centres = [ndimage.center_of_mass(w) for w in weights]
    assert centres[1][0] - centres[0][0] == pytest.approx(-4 / 2.5, abs=0.1)
    assert centres[1][1:] == pytest.approx(centres[0][1:], abs=0.15)


def test_frame_pair_puts_the_frame_on_the_fixed_voxels_so_the_fixed_image_is_copied(tmp_path):
    shape = (30, 34, 26)
    affine = grid_affine(np.diag([-1.0, 1.0, 1.0]), shape, (0.3, -0.2, 0.1))  # LAS, 1 mm
    fixed = load_image(write(tmp_path / "fixed.nii.gz", blob_image(shape, seed=3), affine))
    frame = ModelFrame(
        orientation="LIA", spacing=(1.0, 1.0, 1.0), shape=(32, 36, 30), intensity_divisor=2000.0
    )
    centred = frame_affine(frame, foreground_center_mm(fixed))
    # An even frame centred on the head puts its voxels half-way between the fixed ones ...
    assert not np.allclose((np.linalg.inv(affine) @ centred)[:3, 3] % 1, 0)
    pair = frame_pair(frame, fixed, fixed)
    # ... frame_pair moves it by less than a voxel, onto them, and reads voxels unblended:
    # the same as nibabel's nearest-neighbour resampling.
    assert np.abs(pair.affine - centred).max() <= 0.5 + 1e-9
    np.testing.assert_allclose(pair.affine[:3, :3], centred[:3, :3])
    nearest = resample_from_to(
        nib.load(str(fixed.path)), (frame.shape, pair.affine), order=0, cval=0.0
    )
    expected = normalise(frame, torch.from_numpy(nearest.get_fdata().astype(np.float32)))
    np.testing.assert_allclose(pair.fixed[0, 0].numpy(), expected.numpy(), atol=1e-5)


def test_on_lattice_leaves_a_grid_of_other_axes_or_spacing_alone():
    frame = frame_affine(ModelFrame(shape=(32, 36, 30)), np.array([0.3, 0.1, 0.0]))
    rotated = grid_affine(rotation(10, 2), (30, 34, 26))
    coarser = grid_affine(np.diag([2.0, 2.0, 2.0]), (30, 34, 26))
    for lattice in (rotated, coarser):
        np.testing.assert_array_equal(on_lattice(frame, lattice), frame)


def test_a_frame_voxel_flow_becomes_the_world_vector_of_its_axis(tmp_path):
    fixed_shape = (40, 44, 38)
    fixed_affine = grid_affine(np.diag([-2.0, -2.0, 2.0]), fixed_shape)  # LPS on disk
    fixed = load_image(write(tmp_path / "fixed.nii.gz", blob_image(fixed_shape), fixed_affine))
    grid = frame_affine(SMALL, np.zeros(3))
    flow = torch.zeros(1, 3, *SMALL.shape)
    flow[0, 0], flow[0, 1], flow[0, 2] = 1.0, 2.0, -1.0  # voxels along L, I, A
    disp = flow_to_native_mm(flow, grid, fixed)[0].numpy()
    # L is -x, I is -z, A is +y in RAS mm: +1 L-voxel of 1.5 mm is x - 1.5, +2 I-voxels of
    # 1.25 mm are z - 2.5, -1 A-voxel of 1 mm is y - 1.
    expected = np.array([-1.5, -1.0, -2.5])
    world = nib.affines.apply_affine(fixed_affine, np.indices(fixed_shape).reshape(3, -1).T)
    frame_index = nib.affines.apply_affine(np.linalg.inv(grid), world)
    inside = np.all((frame_index > 0.5) & (frame_index < np.array(SMALL.shape) - 1.5), axis=1)
    outside = np.any((frame_index < -1) | (frame_index > np.array(SMALL.shape)), axis=1)
    assert inside.any() and outside.any()
    vectors = disp.reshape(3, -1).T
    np.testing.assert_allclose(vectors[inside], np.tile(expected, (inside.sum(), 1)), atol=1e-5)
    assert np.all(vectors[outside] == 0)
