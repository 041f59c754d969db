"""World-grid displacement fields: ITK files that SimpleITK applies exactly as vitreg does."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from tests.volumes import blob_image, grid_affine, rotation, write
from vitreg.errors import VitregError
from vitreg.field import (
    DisplacementField,
    check_flow_writable,
    load_flow,
    save_flow,
    warp_image,
    warp_labels_linear,
    warp_labels_nearest,
)
from vitreg.image import load_image, load_labels, save


def smooth_disp(shape, amplitude_mm=3.0, seed=1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *shape))
    disp = np.stack([ndimage.gaussian_filter(c, 4.0) for c in noise])
    disp = amplitude_mm * disp / np.abs(disp).max()
    return torch.from_numpy(disp.astype(np.float32))[None]


@pytest.fixture()
def oblique_pair(tmp_path):
    """A fixed grid (oblique, 1.5 mm) and a moving image on another grid (LPS-ish, 1.2 mm)."""
    fixed_shape, moving_shape = (30, 34, 28), (40, 36, 38)
    fixed_affine = grid_affine(rotation(15, 2) @ rotation(-10, 0) * 1.5, fixed_shape, (2, -3, 5))
    moving_affine = grid_affine(np.diag([-1.2, -1.2, 1.2]), moving_shape, (1, -2, 4))
    fixed = write(tmp_path / "fixed.nii.gz", blob_image(fixed_shape, 3), fixed_affine)
    moving = write(tmp_path / "moving.nii.gz", blob_image(moving_shape, 4), moving_affine)
    return load_image(fixed), load_image(moving)


def test_itk_flow_applied_by_simpleitk_matches_vitreg_warp(tmp_path, oblique_pair):
    fixed, moving = oblique_pair
    field = DisplacementField(disp_mm=smooth_disp(fixed.shape), grid=fixed)
    ours = warp_image(moving, field)
    flow_path = save_flow(tmp_path / "flow.nii.gz", field, "itk")

    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(flow_path)), sitk.sitkVectorFloat64)
    )
    theirs = sitk.Resample(
        sitk.ReadImage(str(moving.path)),
        sitk.ReadImage(str(fixed.path)),
        transform,
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    # SimpleITK arrays are (z, y, x); ours are (x, y, z).
    theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
    inside = (ours > 0) & (theirs > 0)
    assert inside.mean() > 0.2
    assert np.corrcoef(ours[inside], theirs[inside])[0, 1] > 0.9999
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=1e-3, atol=0.5)


def test_itk_flow_file_is_5d_vector_lps_on_the_fixed_header(tmp_path, oblique_pair):
    fixed, _ = oblique_pair
    disp = torch.zeros(1, 3, *fixed.shape)
    disp[:, 0] = 2.0  # 2 mm towards Right (RAS) is -2 in LPS
    path = save_flow(tmp_path / "flow.nii.gz", DisplacementField(disp, fixed), "itk")
    image = nib.load(str(path))
    assert image.shape == (*fixed.shape, 1, 3)
    assert image.header.get_intent()[0] == "vector"
    np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-5)
    np.testing.assert_allclose(image.get_fdata()[..., 0, 0], -2.0)
    assert int(image.header["sform_code"]) == int(fixed.header["sform_code"])


@pytest.mark.parametrize("flow_format", ["itk", "voxel", "freesurfer"])
def test_flow_round_trips_through_every_format(tmp_path, oblique_pair, flow_format):
    fixed, _ = oblique_pair
    field = DisplacementField(disp_mm=smooth_disp(fixed.shape), grid=fixed)
    path = save_flow(tmp_path / f"{flow_format}.nii.gz", field, flow_format)
    loaded = load_flow(path, flow_format)
    torch.testing.assert_close(loaded.disp_mm, field.disp_mm, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(loaded.grid.affine, fixed.affine, atol=1e-5)
    if flow_format != "freesurfer":  # 'auto' tells these two apart by their shape
        torch.testing.assert_close(load_flow(path).disp_mm, field.disp_mm, atol=1e-4, rtol=1e-4)


def test_a_freesurfer_flow_must_be_named_and_is_not_an_itk_one(tmp_path, oblique_pair):
    fixed, _ = oblique_pair
    field = DisplacementField(disp_mm=smooth_disp(fixed.shape), grid=fixed)
    itk = save_flow(tmp_path / "itk.nii.gz", field, "itk")
    with pytest.raises(VitregError, match="itk.nii.gz.*not a displacement field in freesurfer"):
        load_flow(itk, "freesurfer")
    with pytest.raises(VitregError, match="flow_format='ras': expected auto or one of"):
        load_flow(itk, "ras")


def test_images_saved_on_a_flow_grid_are_plain_3d_images(tmp_path, oblique_pair):
    fixed, _ = oblique_pair
    field = DisplacementField(disp_mm=smooth_disp(fixed.shape), grid=fixed)
    grid = load_flow(save_flow(tmp_path / "flow.nii.gz", field, "itk")).grid
    path = save(tmp_path / "image.nii.gz", np.ones(grid.shape, np.float32), grid)
    header = nib.load(path).header
    assert header.get_intent()[0] == "none" and header["dim"][0] == 3


def test_zero_flow_matches_simpleitk_identity_resampling(oblique_pair):
    fixed, moving = oblique_pair
    field = DisplacementField(disp_mm=torch.zeros(1, 3, *fixed.shape), grid=fixed)
    ours = warp_image(moving, field)
    theirs = sitk.Resample(
        sitk.ReadImage(str(moving.path)),
        sitk.ReadImage(str(fixed.path)),
        sitk.Transform(),
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
    inside = (ours > 0) & (theirs > 0)
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=1e-3, atol=0.5)


def test_label_warps_keep_values_and_agree_with_simpleitk_nearest(tmp_path, oblique_pair):
    fixed, moving = oblique_pair
    labels = np.zeros(moving.shape, dtype=np.int16)
    labels[moving.data > 0] = 2
    labels[moving.data > np.percentile(moving.data[moving.data > 0], 60)] = 1041
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels, moving.affine), str(path))
    source = load_labels(path)
    field = DisplacementField(disp_mm=smooth_disp(fixed.shape), grid=fixed)
    nearest = warp_labels_nearest(source, field)
    linear = warp_labels_linear(source, field)
    assert set(np.unique(nearest)) <= {0, 2, 1041}
    assert set(np.unique(linear)) <= {0, 2, 1041}

    flow_path = save_flow(tmp_path / "flow.nii.gz", field, "itk")
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(flow_path)), sitk.sitkVectorFloat64)
    )
    theirs = sitk.Resample(
        sitk.ReadImage(str(path)),
        sitk.ReadImage(str(fixed.path)),
        transform,
        sitk.sitkNearestNeighbor,
        0,
    )
    theirs = sitk.GetArrayFromImage(theirs).transpose(2, 1, 0)
    assert (nearest == theirs).mean() > 0.995
    assert (linear == theirs).mean() > 0.97


def test_flow_of_the_wrong_shape_is_refused(tmp_path):
    path = write(tmp_path / "bad_flow.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    with pytest.raises(VitregError, match="bad_flow.nii.gz.*not a displacement field"):
        load_flow(path)


def test_an_itk_flow_cannot_go_to_mgz_but_a_voxel_flow_can(tmp_path):
    with pytest.raises(VitregError, match="flow.mgz: an ITK flow is 5D"):
        check_flow_writable(tmp_path / "flow.mgz", "itk")
    assert check_flow_writable(tmp_path / "flow.mgz", "voxel") == tmp_path / "flow.mgz"
