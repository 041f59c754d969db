"""The command line on real NIfTI files: every command, bad input, and the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from tests.volumes import (
    ball_and_shell,
    blob_image,
    grid_affine,
    rotation,
    simpleitk_applies_flow,
    write,
)
from vitreg.cli import app

runner = CliRunner()
SHAPE = (40, 44, 38)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Fixed (oblique, 2 mm) and moving (LPS, 2.2 mm) heads, shifted in world space, with labels."""
    folder = tmp_path_factory.mktemp("pair")
    fixed_affine = grid_affine(rotation(12, 2) * 2.0, SHAPE, (0, -10, 5))
    moving_shape = (36, 40, 36)
    moving_affine = grid_affine(np.diag([-2.2, -2.2, 2.2]), moving_shape, (3, -12, 6))
    fixed = write(folder / "fixed.nii.gz", blob_image(SHAPE, 11), fixed_affine)
    moving = write(folder / "moving.nii.gz", blob_image(moving_shape, 11), moving_affine)
    for name, path in (("fixed", fixed), ("moving", moving)):
        image = nib.load(str(path))
        data = image.get_fdata()
        labels = np.zeros(data.shape, np.uint8)
        labels[data > 0] = 2
        labels[data > np.percentile(data[data > 0], 50)] = 41
        nib.save(nib.Nifti1Image(labels, image.affine), str(folder / f"{name}_labels.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def registered(pair):
    """Run 'vitreg register' once (optimisation only) and keep its outputs."""
    torch.manual_seed(0)
    result = invoke(
        "register", pair / "fixed.nii.gz", pair / "moving.nii.gz",
        "-o", pair / "warped.nii.gz", "--flow", pair / "flow.nii.gz",
        "--weights", "none", "--optimize", "30", "--json",
        "--affine-out", pair / "affine.mat", "--inverse-flow", pair / "inverse.nii.gz",
        "--fixed-labels", pair / "fixed_labels.nii.gz",
        "--moving-labels", pair / "moving_labels.nii.gz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return pair, json.loads(result.stdout.strip().splitlines()[-1])


def test_register_writes_warped_on_the_fixed_header(registered):
    folder, summary = registered
    fixed, warped = nib.load(str(folder / "fixed.nii.gz")), nib.load(str(folder / "warped.nii.gz"))
    assert warped.shape == fixed.shape
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    for field in ("qform_code", "sform_code"):
        assert int(warped.header[field]) == int(fixed.header[field])
    assert summary["ncc_after"] > summary["ncc_before"]
    assert summary["dice_after"] >= summary["dice_before"] - 0.01


def test_simpleitk_applying_the_itk_flow_reproduces_warped(registered):
    folder, _ = registered
    # The flow includes the affine pre-alignment: applied alone, it reproduces WARPED.
    theirs = simpleitk_applies_flow(
        folder / "flow.nii.gz", folder / "moving.nii.gz", folder / "fixed.nii.gz"
    )
    ours = nib.load(str(folder / "warped.nii.gz")).get_fdata()
    head = nib.load(str(folder / "fixed.nii.gz")).get_fdata() > 0
    assert np.corrcoef(ours[head], theirs[head])[0, 1] > 0.999


def test_warp_and_warp_labels_reuse_the_flow(registered):
    folder, _ = registered
    result = invoke(
        "warp", folder / "moving.nii.gz", folder / "flow.nii.gz", "-o", folder / "again.nii.gz",
        "--reference", folder / "fixed.nii.gz",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    again = nib.load(str(folder / "again.nii.gz")).get_fdata()
    np.testing.assert_allclose(
        again, nib.load(str(folder / "warped.nii.gz")).get_fdata(), atol=1e-3
    )
    for method in ("nearest", "linear"):
        out = folder / f"labels_{method}.nii.gz"
        result = invoke(
            "warp-labels", folder / "moving_labels.nii.gz", folder / "flow.nii.gz", "-o", out,
            "--method", method,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        warped = nib.load(str(out))
        assert warped.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(warped.dataobj))) <= {0, 2, 41}


def test_dice_prints_a_table_json_and_csv(registered):
    folder, _ = registered
    args = [folder / "fixed_labels.nii.gz", folder / "labels_nearest.nii.gz"]
    table = invoke("dice", *args)
    assert table.exit_code == 0 and "Left-Cerebral-White-Matter" in table.stdout
    as_json = invoke("dice", *args, "--json", "--csv", folder / "dice.csv")
    report = json.loads(as_json.stdout)
    assert {row["label"] for row in report["labels"]} == {2, 41}
    assert 0.5 < report["mean"] <= 1.0
    assert (folder / "dice.csv").read_text().splitlines()[0] == "label,name,dice"


def test_jacobian_reports_folding(registered):
    folder, _ = registered
    result = invoke("jacobian", folder / "flow.nii.gz", "-o", folder / "jacdet.nii.gz", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    jacdet = nib.load(str(folder / "jacdet.nii.gz")).get_fdata()
    assert jacdet.shape == SHAPE
    assert summary["count_nonpositive"] == int((jacdet <= 0).sum())
    assert 0.5 < float(np.median(jacdet)) < 1.5


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_bad_inputs_give_one_line_exit_2_and_no_output(pair, tmp_path):
    fixed, moving = pair / "fixed.nii.gz", pair / "moving.nii.gz"
    flat = write(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32), np.eye(4))
    constant = write(tmp_path / "constant.nii.gz", np.ones((8, 8, 8), np.float32), np.eye(4))
    nan = np.ones((8, 8, 8), np.float32)
    nan[2, 2, 2] = np.nan
    nan_path = write(tmp_path / "nan.nii.gz", nan, np.eye(4))
    not_image = tmp_path / "notes.nii.gz"
    not_image.write_text("hello")
    bad_flow = write(tmp_path / "bad_flow.nii.gz", np.zeros((8, 8, 8, 2), np.float32), np.eye(4))
    other_grid = write(tmp_path / "other.nii.gz", np.ones((8, 8, 8), np.uint8), np.eye(4))
    out = tmp_path / "out.nii.gz"
    cases = [
        (["register", tmp_path / "missing.nii.gz", moving, "-o", out], "missing.nii.gz"),
        (["register", fixed, not_image, "-o", out], "notes.nii.gz"),
        (["register", flat, moving, "-o", out, "--weights", "none"], "2D image"),
        (["register", fixed, constant, "-o", out, "--weights", "none"], "constant"),
        (["register", nan_path, moving, "-o", out, "--weights", "none"], "NaN"),
        (["warp", moving, bad_flow, "-o", out], "bad_flow.nii.gz"),
        (["dice", pair / "fixed_labels.nii.gz", other_grid], "other.nii.gz"),
        (
            [
                "register",
                fixed,
                moving,
                "-o",
                out,
                "--weights",
                "none",
                "--fixed-labels",
                other_grid,
                "--moving-labels",
                other_grid,
            ],
            "other.nii.gz",
        ),
        (["register", fixed, moving, "-o", tmp_path / "no" / "out.nii.gz"], "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["register", fixed, moving, "-o", out, "--device", "cuda"], "CUDA is not available")
        )
    for args, expected in cases:
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        line = error_line(result)
        assert line.startswith("vitreg: error:") and expected in line, (args, line)
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_train_lists_every_bad_csv_row_in_one_line_exit_2(pair, tmp_path):
    shutil.copy(pair / "fixed.nii.gz", tmp_path / "good.nii.gz")
    write(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32), np.eye(4))
    csv = tmp_path / "subjects.csv"
    csv.write_text("image\ngood.nii.gz\nmissing.nii.gz\nflat.nii.gz\ngood.nii.gz\n")
    result = invoke("train", csv, "-o", tmp_path / "run", "--val-fraction", "0", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert line.startswith("vitreg: error:") and "2 bad row(s)" in line
    assert "subjects.csv line 3: " in line and "missing.nii.gz: no such file" in line
    assert "subjects.csv line 4: " in line and "2D image" in line
    assert not (tmp_path / "run").exists()


def test_every_command_help_has_an_example():
    for command in (
        "register",
        "register-batch",
        "warp",
        "warp-labels",
        "jacobian",
        "dice",
        "qc",
        "evaluate",
        "train",
    ):
        result = invoke(command, "--help")
        assert result.exit_code == 0
        assert "Example:" in result.stdout and f"vitreg {command}" in result.stdout


def test_installed_entry_point_runs(pair, tmp_path):
    executable = shutil.which("vitreg")
    if executable is None:
        pytest.skip("the vitreg script is not installed (pip install -e .)")
    help_text = subprocess.run([executable, "--help"], capture_output=True, text=True, check=True)
    assert "register" in help_text.stdout
    result = subprocess.run(
        [executable, "dice", pair / "fixed_labels.nii.gz", pair / "fixed_labels.nii.gz", "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mean"] == 1.0
    missing = subprocess.run(
        [executable, "jacobian", tmp_path / "none.nii.gz", "-o", tmp_path / "j.nii.gz"],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "vitreg: error:" in missing.stderr


def test_register_writes_the_affine_and_an_inverse_flow(registered):
    folder, summary = registered
    affine = np.array(summary["affine_ras"])
    assert not np.allclose(affine, np.eye(4), atol=1e-3)  # the flow above includes an affine
    transform = sitk.ReadTransform(str(folder / "affine.mat"))
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
    point = np.array([10.0, -20.0, 30.0])
    theirs = flip @ np.array(transform.TransformPoint((flip @ point).tolist()))
    np.testing.assert_allclose(theirs, affine[:3, :3] @ point + affine[:3, 3], atol=1e-3)
    inverse = nib.load(str(folder / "inverse.nii.gz"))
    moving = nib.load(str(folder / "moving.nii.gz"))
    assert inverse.shape == (*moving.shape, 1, 3)
    np.testing.assert_allclose(inverse.affine, moving.affine, atol=1e-6)
    assert summary["inverse_residual_mean_mm"] < 0.5
    # The fixed labels pulled onto the moving grid through the inverse overlap the moving ones.
    out = folder / "fixed_labels_on_moving.nii.gz"
    result = invoke("warp-labels", folder / "fixed_labels.nii.gz", folder / "inverse.nii.gz",
                    "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    moving_labels = nib.load(str(folder / "moving_labels.nii.gz")).get_fdata()
    pulled = nib.load(str(out)).get_fdata()
    both = (pulled > 0) & (moving_labels > 0)
    assert 2 * both.sum() / ((pulled > 0).sum() + (moving_labels > 0).sum()) > 0.8


def test_heads_that_do_not_overlap_exit_2_unless_affine_failure_is_allowed(tmp_path):
    ball, shell = ball_and_shell((32, 32, 32))
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), ball.shape)
    fixed = write(tmp_path / "ball.nii.gz", ball, affine)
    moving = write(tmp_path / "shell.nii.gz", shell, affine)
    out = tmp_path / "out.nii.gz"
    result = invoke("register", fixed, moving, "-o", out, "--weights", "none")
    assert result.exit_code == 2, result.output
    # The direction line comes first (the affine runs after it); the error is one line.
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0] == result.output.strip().splitlines()[-1]
    line = errors[0]
    assert line.startswith("vitreg: error:")
    assert "ball.nii.gz" in line and "shell.nii.gz" in line and "do not overlap" in line
    assert not out.exists()
    result = invoke(
        "register", fixed, moving, "-o", out, "--weights", "none", "--allow-affine-failure",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and out.exists()
