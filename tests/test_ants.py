"""ANTs (antspyx) reads vitreg's files: the ITK flow reproduces the warped image, and the
``.mat`` affine maps points as vitreg's affine does. Skipped where antspyx is not installed
(it is the ``bench`` extra)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.volumes import rotated_pair, simpleitk_resamples
from vitreg.affine import save_affine
from vitreg.field import save_flow
from vitreg.frame import ModelFrame
from vitreg.image import save
from vitreg.register import register

ants = pytest.importorskip("ants")

SMALL_FRAME = ModelFrame(orientation="RAS", spacing=(1.0, 1.0, 1.0), shape=(64, 64, 64))
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A rotated, shifted pair registered with the affine step and 20 optimisation steps, its
    outputs written as ``vitreg register`` writes them: warped, ITK flow, ANTs .mat affine."""
    folder = tmp_path_factory.mktemp("ants")
    fixed, moving, truth = rotated_pair(folder)
    torch.manual_seed(0)
    result = register(fixed, moving, frame=SMALL_FRAME, optimize=20)
    save(folder / "warped.nii.gz", result.warped, fixed)
    save_flow(folder / "flow.nii.gz", result.field)
    save_affine(folder / "affine.mat", result.affine_ras)
    return folder, fixed, result, truth


def test_ants_apply_transforms_with_the_flow_reproduces_the_warped_image(registered):
    folder, fixed, result, _ = registered
    assert float(result.flow_vox.abs().max()) > 0.5  # a dense part besides the affine
    theirs = ants.apply_transforms(
        fixed=ants.image_read(str(folder / "fixed.nii.gz")),
        moving=ants.image_read(str(folder / "moving.nii.gz")),
        transformlist=[str(folder / "flow.nii.gz")],
        interpolator="linear",
    ).numpy()
    warped = ants.image_read(str(folder / "warped.nii.gz")).numpy()
    assert theirs.shape == warped.shape == fixed.shape
    head = fixed.data > 0.2 * fixed.data.max()
    np.testing.assert_allclose(theirs[head], warped[head], rtol=1e-3, atol=0.5)
    assert np.corrcoef(theirs[head], warped[head])[0, 1] > 0.9999


def test_ants_reads_the_mat_affine_and_maps_points_as_vitreg_does(registered):
    folder, _, result, truth = registered
    transform = ants.read_transform(str(folder / "affine.mat"))
    points_ras = np.array([[x, y, z] for x in (-20, 20) for y in (-25, 25) for z in (-18, 18)])
    ours = points_ras @ result.affine_ras[:3, :3].T + result.affine_ras[:3, 3]
    # ANTs works in LPS: a fixed point in, the moving point it reads out.
    theirs = np.array(
        [RAS_TO_LPS @ transform.apply_to_point(tuple(RAS_TO_LPS @ p)) for p in points_ras]
    )
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    expected = points_ras @ truth[:3, :3].T + truth[:3, 3]
    assert np.abs(theirs - expected).max() < 1.0  # and that is the true motion, within 1 mm
    # The .mat alone through antsApplyTransforms resamples as SimpleITK does with the affine.
    affine_only = ants.apply_transforms(
        fixed=ants.image_read(str(folder / "fixed.nii.gz")),
        moving=ants.image_read(str(folder / "moving.nii.gz")),
        transformlist=[str(folder / "affine.mat")],
        interpolator="linear",
    ).numpy()
    reference = simpleitk_resamples(
        folder / "moving.nii.gz", folder / "fixed.nii.gz", result.affine_ras
    )
    head = reference > 0.2 * reference.max()
    np.testing.assert_allclose(affine_only[head], reference[head], rtol=1e-3, atol=0.5)
