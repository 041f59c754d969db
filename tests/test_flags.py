"""Automatic QC flags: each indicator against an exact answer, each rule, and registrations of
a normal pair and of broken ones (a left-right flipped and a cropped moving image) on files."""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.flags import (
    Indicators,
    affine_parts,
    fixed_uncovered,
    moving_outside_fov,
    qc_flag,
)
from vitreg.frame import ModelFrame
from vitreg.image import Volume, load_image
from vitreg.pairs import Pair
from vitreg.register import RegisterSettings
from vitreg.workflow import OutputPaths, register_pair

GOOD = Indicators(
    head_ncc_before=0.4, head_ncc_after=0.8, percent_nonpositive=0.0, jacobian_p1=0.7,
    jacobian_p99=1.4, affine_scales=(1.05, 0.97, 1.0), affine_shear=0.02, affine_flip=False,
    affine_fallback=False, moving_outside_fov=0.01, fixed_uncovered=0.02,
)  # fmt: skip


def test_affine_parts_recover_the_scales_shear_and_flip_it_was_built_from():
    scales = np.diag([1.2, 0.8, 1.05])
    shear = np.array([[1.0, 0.1, -0.25], [0.0, 1.0, 0.05], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation(25, 2) @ rotation(-10, 0) @ scales @ shear
    affine[:3, 3] = [5.0, -3.0, 7.0]
    found_scales, found_shear, flip = affine_parts(affine)
    np.testing.assert_allclose(found_scales, [1.2, 0.8, 1.05], atol=1e-12)
    assert found_shear == pytest.approx(0.25, abs=1e-12) and not flip
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine
    assert affine_parts(mirrored)[2] and affine_parts(mirrored)[0] == pytest.approx(found_scales)


def _volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(data=data, affine=affine, header=nib.Nifti1Header(), path="test")


def test_moving_outside_fov_counts_the_head_voxels_beyond_the_fixed_grid():
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), (40, 40, 40))
    moving = np.zeros((40, 40, 40), np.float32)
    moving[10:30, 10:30, 10:30] = 100.0
    fixed = _volume(np.zeros((40, 40, 40), np.float32), affine)
    to_moving = np.eye(4)
    to_moving[2, 3] = -40.0  # fixed point x reads the moving image at x - 40 mm along S
    # Every head voxel, by nibabel: where does the moving head land on the fixed grid?
    index = np.argwhere(moving > 0)
    to_fixed_index = np.linalg.inv(affine) @ np.linalg.inv(to_moving) @ affine
    points = nib.affines.apply_affine(to_fixed_index, index)
    expected = np.any((points < -0.5) | (points > 39.5), axis=1).mean()
    assert expected == pytest.approx(0.5)  # the upper half of the head lies above the grid
    outside = moving_outside_fov(fixed, _volume(moving, affine), to_moving)
    assert outside == pytest.approx(expected, abs=0.02)
    assert moving_outside_fov(fixed, _volume(moving, affine), np.eye(4)) == 0.0


def test_fixed_uncovered_is_the_share_of_the_head_that_lands_off_the_moving_head():
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), (40, 40, 40))
    head = np.zeros((40, 40, 40), dtype=bool)
    head[10:30, 10:30, 10:30] = True
    fixed = _volume(head.astype(np.float32) * 100, affine)
    # The moving image holds the head's lower half only, on a grid cut at slice 20 ...
    lower = _volume(np.full((40, 40, 20), 100.0, np.float32), affine)
    assert fixed_uncovered(fixed, lower, np.eye(4), head) == pytest.approx(0.5)
    # ... or on the whole grid with its upper half zeroed (and 6 mm lower, which the affine
    # takes into account: the fixed head's slices 10-29 read moving slices 13-32).
    zeroed = np.zeros((40, 40, 40), np.float32)
    zeroed[:, :, :23] = 100.0
    to_moving = np.eye(4)
    to_moving[2, 3] = 6.0
    expected = np.mean(np.arange(10, 30, 2) + 3 > 22.5)  # every 2nd slice is counted
    found = fixed_uncovered(fixed, _volume(zeroed, affine), to_moving, head)
    assert found == pytest.approx(expected) and expected == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("change", "flag", "words"),
    [
        ({}, "ok", ""),
        ({"head_ncc_after": 0.2}, "fail", "NCC in the head 0.200"),
        ({"head_ncc_after": 0.35, "head_ncc_before": 0.45}, "check", "NCC fell"),
        ({"percent_nonpositive": 2.0}, "fail", "folds"),
        ({"jacobian_p99": 6.0}, "check", "percentiles"),
        ({"jacobian_p1": 0.05}, "check", "percentiles 0.05-1.40 beyond 0.1-3.0"),
        ({"affine_flip": True}, "fail", "flips"),
        ({"affine_scales": (1.7, 1.0, 1.0)}, "check", "scales 1.70"),
        ({"affine_shear": 0.5}, "check", "shear 0.50"),
        ({"affine_fallback": True}, "check", "refused"),
        ({"moving_outside_fov": 0.7}, "fail", "70% of the moving head outside"),
        ({"fixed_uncovered": 0.3}, "check", "30% of the fixed head not covered"),
        ({"mirror_advantage": 0.06}, "check", "mirrored moving image fits 6.0% better"),
        ({"mirror_advantage": 0.03}, "ok", ""),
        ({"head_correlation": -0.6}, "check", "correlate -0.60 in the head"),
        ({"head_correlation": 0.7}, "ok", ""),
    ],
)
def test_each_rule_gives_its_flag_and_names_the_indicator(change, flag, words):
    verdict = qc_flag(dataclasses.replace(GOOD, **change))
    assert verdict.flag == flag
    assert (words in " ".join(verdict.reasons)) if words else verdict.reasons == ()


SHAPE = (36, 40, 34)
FRAME = ModelFrame(orientation="RAS", spacing=(2.0, 2.0, 2.0), shape=(48, 48, 48))


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A fixed head; the same head moved and bent ('moving'); that head left-right mirrored;
    and its superior half alone (the grid cut there). (An unrelated image is left to
    benchmarks/qc_flags.py: in a head this small, most NCC windows hold the head's edge,
    which any head-shaped image shares.)"""
    folder = tmp_path_factory.mktemp("flags")
    affine = grid_affine(np.diag([2.0] * 3), SHAPE)
    write(folder / "fixed.nii.gz", world_head(affine, SHAPE), affine)
    moving = world_head(affine, SHAPE, shift_mm=(3, -2, 1), wave_mm=2.0)
    write(folder / "moving.nii.gz", moving, affine)
    write(folder / "flipped.nii.gz", moving[::-1].copy(), affine)  # axis 0 is R-L
    inverted = np.where(moving > 0.1 * moving.max(), moving.max() - moving, 0)
    write(folder / "inverted.nii.gz", inverted.astype(np.float32), affine)  # T2-like contrast
    half = affine.copy()
    half[:3, 3] += affine[:3, :3] @ [0, 0, SHAPE[2] // 2]
    write(folder / "cropped.nii.gz", moving[:, :, SHAPE[2] // 2 :], half)
    return folder


@pytest.mark.parametrize(
    ("moving", "flags"),
    [
        ("moving", {"ok"}),
        ("flipped", {"check"}),
        ("inverted", {"check", "fail"}),
        ("cropped", {"check", "fail"}),
    ],
)
def test_a_normal_pair_is_ok_and_broken_ones_are_flagged(heads, tmp_path, moving, flags):
    pair = Pair(0, moving, heads / "fixed.nii.gz", heads / f"{moving}.nii.gz")
    settings = RegisterSettings(
        levels=(2, 1), iterations=(30, 10), allow_affine_failure=True, check_flip=True
    )
    result = register_pair(pair, OutputPaths(tmp_path / "warped.nii.gz"), None, FRAME, settings)
    summary = result.summary()
    assert summary["qc_flag"] in flags, summary
    assert result.indicators.head_ncc_after == pytest.approx(summary["head_ncc_after"], abs=1e-4)
    if moving == "cropped":
        assert result.indicators.fixed_uncovered > 0.3, result.indicators
    if moving == "flipped":
        assert result.indicators.mirror_advantage > 0.1, result.indicators
    if moving == "inverted":
        assert result.indicators.head_correlation < 0, result.indicators
    if moving == "moving":
        assert result.indicators.head_correlation > 0.5, result.indicators
    fixed = load_image(heads / "fixed.nii.gz")
    assert result.assessment.jacdet.shape == fixed.shape


def test_register_shows_the_flag_and_its_reasons_in_its_table_and_json(heads, tiny_checkpoint):
    from typer.testing import CliRunner

    from vitreg.cli import app

    args = [
        "register", heads / "fixed.nii.gz", heads / "flipped.nii.gz", "-o",
        heads / "flipped_warped.nii.gz", "--weights", tiny_checkpoint, "--levels", "2,1",
        "--iterations", "10,5", "--check-flip",
    ]  # fmt: skip
    table = CliRunner().invoke(app, [str(arg) for arg in args])
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "QC flag" in text and "check" in text and "flipped?" in text
    report = CliRunner().invoke(app, [str(arg) for arg in [*args, "--json"]])
    summary = json.loads(report.stdout)
    assert summary["qc_flag"] == "check"
    assert any("mirrored" in reason for reason in summary["qc_reasons"])
    assert summary["mirror_advantage"] > 0.1 and len(summary["affine_scales"]) == 3
