"""Affine pre-alignment: a known rotation and shift recovered, ITK files, bad pairs refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.volumes import ball_and_shell, grid_affine, rotation, world_head, write
from vitreg.affine import (
    RAS_TO_LPS,
    estimate_affine,
    from_sitk,
    itk_threads,
    load_affine,
    save_affine,
    to_sitk,
)
from vitreg.errors import VitregError
from vitreg.image import load_image, load_labels

SHAPE = (48, 52, 44)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def known_affine() -> np.ndarray:
    """Fixed world -> moving world: 10 deg about S, 6 deg about A, then a shift, in RAS mm."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(10, 2) @ rotation(6, 1)
    affine[:3, 3] = [4.0, -3.0, 2.5]
    return affine


def apply(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ affine[:3, :3].T + affine[:3, 3]


def test_known_rotation_and_shift_is_recovered(tmp_path):
    fixed_affine = grid_affine(np.diag([2.0, 2.0, 2.0]), SHAPE)
    truth = known_affine()
    # The moving grid is the fixed one moved by the known map: moving content at A(x) is the
    # fixed content at x, so the pull map fixed -> moving is A itself.
    moving_affine = truth @ fixed_affine
    data = world_head(fixed_affine, SHAPE)
    fixed = load_image(write(tmp_path / "fixed.nii.gz", data, fixed_affine))
    moving = load_image(write(tmp_path / "moving.nii.gz", data, moving_affine))
    result = estimate_affine(fixed, moving)
    assert result.failure is None, result.failure
    assert result.metric_final < result.metric_centred
    corners = np.array([[x, y, z] for x in (-24, 24) for y in (-28, 28) for z in (-22, 22)])
    error = np.linalg.norm(apply(result.affine_ras, corners) - apply(truth, corners), axis=1)
    assert error.max() < 1.0, error  # mm, at the corners of the head's bounding box


def test_small_head_on_other_grids_keeps_its_shift(tmp_path):
    # A 5 cm head, fixed oblique at 2 mm, moving LPS at 2.2 mm, moved by a pure shift: the
    # affine stage once halved its scales on its first step (then refused as worse than the
    # centring); the shift must come back within 0.2 mm and the linear part stay the identity.
    shape, shift = (26, 30, 24), np.array([3.0, -2.0, 1.0])
    fixed_affine = grid_affine(rotation(10, 2) * 2.0, shape)
    moving_affine = grid_affine(np.diag([-2.2, -2.2, 2.2]), shape, (1, -1, 0))
    fixed = load_image(write(tmp_path / "f.nii.gz", world_head(fixed_affine, shape), fixed_affine))
    moving_data = world_head(moving_affine, shape, tuple(shift))
    moving = load_image(write(tmp_path / "m.nii.gz", moving_data, moving_affine))
    result = estimate_affine(fixed, moving)
    assert result.failure is None, result.failure
    assert np.abs(result.affine_ras[:3, :3] - np.eye(3)).max() < 0.01
    assert np.abs(result.affine_ras[:3, 3] - shift).max() < 0.2


@pytest.mark.parametrize("suffix", [".mat", ".tfm", ".txt"])
def test_affine_file_read_back_by_simpleitk_maps_points_as_ours(tmp_path, suffix):
    affine = known_affine()
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.05, 0.95, 1.02])
    path = save_affine(tmp_path / f"affine{suffix}", affine)
    transform = sitk.ReadTransform(str(path))
    points_ras = np.array([[0.0, 0.0, 0.0], [30.0, -20.0, 10.0], [-15.0, 40.0, -35.0]])
    for point in points_ras:
        theirs_lps = np.array(transform.TransformPoint((RAS_TO_LPS @ point).tolist()))
        np.testing.assert_allclose(
            RAS_TO_LPS @ theirs_lps, apply(affine, point[None])[0], atol=1e-6
        )
    np.testing.assert_allclose(load_affine(path), affine, atol=1e-9)


def test_centred_itk_transform_converts_to_the_same_map():
    euler = sitk.Euler3DTransform((5.0, -7.0, 3.0), 0.1, -0.2, 0.3, (1.0, 2.0, -4.0))
    affine_ras = from_sitk(euler)
    point_lps = np.array([12.0, -3.0, 40.0])
    expected = np.array(euler.TransformPoint(point_lps.tolist()))
    got = RAS_TO_LPS @ apply(affine_ras, (RAS_TO_LPS @ point_lps)[None])[0]
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(from_sitk(to_sitk(affine_ras)), affine_ras, atol=1e-12)


def test_a_moving_mask_keeps_a_bright_object_outside_the_head_from_pulling_the_affine(tmp_path):
    """A bright object beside the moving head (a marker, a lead) pulls the centring and the
    MI registration far from the known shift; masked out, it does not."""
    shape = (40, 40, 40)
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), shape)
    shift = np.array([4.0, -3.0, 2.0])  # moving content at x + shift is fixed content at x
    moving = world_head(affine, shape, shift_mm=shift)
    marker = np.zeros(shape, dtype=bool)
    marker[0:12, 0:12, 26:40] = True  # a corner of the field of view, outside the head
    moving[marker] = 6 * moving.max()
    fixed_path = write(tmp_path / "fixed.nii.gz", world_head(affine, shape), affine)
    moving_path = write(tmp_path / "moving.nii.gz", moving, affine)
    mask_path = write(tmp_path / "mask.nii.gz", (~marker).astype(np.uint8), affine)
    fixed, moving_volume = load_image(fixed_path), load_image(moving_path)

    def translation_error(mask) -> float:
        result = estimate_affine(fixed, moving_volume, moving_mask=mask)
        if result.failure is not None:  # pulled so far that the estimate was refused
            return np.inf
        return float(np.linalg.norm(result.affine_ras[:3, 3] - shift))

    # unmasked: 13 mm off, or (ITK's threads vary the optimum) refused as implausible
    assert translation_error(None) > 5.0
    assert translation_error(load_labels(mask_path)) < 0.2  # 0.02 mm when written


def test_heads_that_do_not_overlap_after_centring_are_refused(tmp_path):
    ball, shell = ball_and_shell()
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), ball.shape)
    fixed = load_image(write(tmp_path / "ball.nii.gz", ball, affine))
    moving = load_image(write(tmp_path / "shell.nii.gz", shell, affine))
    with pytest.raises(VitregError, match=r"ball\.nii\.gz, .*shell\.nii\.gz: .*do not overlap"):
        estimate_affine(fixed, moving)


def test_unreadable_affine_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.mat"
    path.write_text("not a transform")
    with pytest.raises(VitregError, match="broken.mat"):
        load_affine(path)


def test_the_affine_is_the_same_on_every_run_whatever_itk_threads_are_set():
    # The shipped example pair (1.5 mm brains): with ITK's metric on several threads its
    # affines came out up to ~0.002 apart from run to run; estimate_affine runs ITK on one.
    fixed = load_image(EXAMPLES / "fixed.nii.gz")
    moving = load_image(EXAMPLES / "moving.nii.gz")
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
    try:
        runs = [estimate_affine(fixed, moving).affine_ras for _ in range(3)]
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 4  # restored
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
    assert not np.allclose(runs[0], np.eye(4), atol=1e-3)  # it did move the moving image
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


def test_itk_threads_blocks_that_overlap_in_threads_restore_the_setting_once_all_close():
    # Two threads' blocks need not close in the order they opened (A opens, B opens, A
    # closes, B closes): the setting must hold until the last closes, then come back.
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(3)
    try:
        first, second = itk_threads(1), itk_threads(1)
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        second.__exit__(None, None, None)
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 3
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
