"""The command line on real NIfTI files: every command, bad input, and the installed script."""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import typer
from typer.testing import CliRunner

from tests.volumes import (
    ball_and_shell,
    grid_affine,
    rotation,
    simpleitk_applies_flow,
    world_head,
    write,
)
from vitreg.cli import app
from vitreg.nets.vitvnet import VitVNet

runner = CliRunner()
SHAPE = (40, 44, 38)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Fixed (oblique, 2 mm) and moving (LPS, 2.2 mm) heads, the moving one shifted and bent in
    world space, each with a two-label map (2 and 41)."""
    folder = tmp_path_factory.mktemp("pair")
    fixed_affine = grid_affine(rotation(12, 2) * 2.0, SHAPE, (0, -10, 5))
    moving_shape = (36, 40, 36)
    moving_affine = grid_affine(np.diag([-2.2, -2.2, 2.2]), moving_shape, (3, -12, 6))
    fixed = write(folder / "fixed.nii.gz", world_head(fixed_affine, SHAPE), fixed_affine)
    # The same head moved and bent: a real correspondence for the registration to find.
    bent = world_head(moving_affine, moving_shape, shift_mm=(3, -2, 1.5), wave_mm=3.0)
    moving = write(folder / "moving.nii.gz", bent, moving_affine)
    for name, path in (("fixed", fixed), ("moving", moving)):
        image = nib.load(str(path))
        data = image.get_fdata()
        labels = (np.where(data > 150, 2, 0) + np.where(data > 600, 39, 0)).astype(np.uint8)
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
    # NCC is averaged over the whole (mostly empty) model frame: a relative gain.
    assert summary["ncc_after"] > 1.05 * summary["ncc_before"], summary
    # Dice of the label maps written beside the images, as the command measured it ...
    assert summary["dice_after"] > summary["dice_before"] + 0.02, summary
    # ... and as numpy counts it on the moving labels SimpleITK warps with the written flow.
    theirs = simpleitk_applies_flow(
        folder / "flow.nii.gz", folder / "moving_labels.nii.gz", folder / "fixed.nii.gz",
        nearest=True,
    )  # fmt: skip
    fixed_labels = nib.load(str(folder / "fixed_labels.nii.gz")).get_fdata()
    assert numpy_mean_dice(fixed_labels, theirs) == pytest.approx(summary["dice_after"], abs=0.01)


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


def numpy_mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the non-zero labels of either map, counted with numpy."""
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    scores = [2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()) for k in labels]
    return float(np.mean(scores))


def folding_flow(folder, spacing=(2.0, 1.5, 1.2), shape=(30, 28, 26)):
    """An ITK flow (LPS mm, axis-aligned grid) whose Gaussian bump folds space in its centre:
    u_x(p) = 12 exp(-|p - c|^2 / (2 (4 mm)^2)) mm, so du_x/dx < -1 on a shell around c."""
    spacing = np.asarray(spacing)
    index = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    offset_mm = (index - centre[:, None, None, None]) * spacing[:, None, None, None]
    bump = 12.0 * np.exp(-(offset_mm**2).sum(0) / (2 * 4.0**2))
    disp_lps = np.zeros((*shape, 1, 3), np.float32)
    disp_lps[..., 0, 0] = bump
    image = sitk.GetImageFromArray(disp_lps[:, :, :, 0, :].transpose(2, 1, 0, 3), isVector=True)
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(folder / "bump_flow.nii.gz"))
    return folder / "bump_flow.nii.gz", image


def test_jacobian_matches_simpleitk_and_counts_folds_in_the_mask(tmp_path):
    flow, image = folding_flow(tmp_path)
    theirs = sitk.GetArrayFromImage(
        sitk.DisplacementFieldJacobianDeterminant(image, True)
    ).transpose(2, 1, 0)
    inside = np.zeros(theirs.shape, np.uint8)
    inside[2:-2, 2:-2, 2:-2] = 1  # SimpleITK differs from ours only on the border voxels
    mask = write(tmp_path / "inside.nii.gz", inside, nib.load(str(flow)).affine)
    result = invoke("jacobian", flow, "-o", tmp_path / "jacdet.nii.gz", "--mask", mask, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    ours = nib.load(str(tmp_path / "jacdet.nii.gz")).get_fdata()
    region = inside > 0
    np.testing.assert_allclose(ours[region], theirs[region], atol=1e-4)
    folded = int((theirs[region] <= 0).sum())
    assert folded > 50  # the bump does fold: the count is not trivially zero
    assert summary["count_nonpositive"] == folded and summary["voxels"] == int(region.sum())
    assert summary["percent_nonpositive"] == pytest.approx(100 * folded / region.sum(), abs=1e-5)


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


ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = (
    ("register",),
    ("warp",),
    ("warp-labels",),
    ("jacobian",),
    ("dice",),
    ("qc",),
    ("register-batch",),
    ("batch-merge",),
    ("evaluate",),
    ("train",),
    ("weights", "list"),
    ("weights", "import"),
    ("weights", "fetch"),
    ("weights", "info"),
)
"""Every command, in an order where each example finds the files earlier ones wrote."""
OUTPUT_FLAGS = ("-o", "--flow", "--out-dir", "--out", "--csv")


def help_example(command: tuple[str, ...]) -> list[str]:
    """The words of the example a command's --help shows (after 'Example:', to a blank line)."""
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Example:" in result.stdout, command
    lines = result.stdout.split("Example:", 1)[1].splitlines()
    text = " ".join(itertools.takewhile(str.strip, (line.strip() for line in lines)))
    return shlex.split(text)


def test_every_command_takes_quiet_and_json():
    for command in EXAMPLES:
        text = invoke(*command, "--help").stdout
        assert "--quiet" in text and "-q" in text and "--json" in text, command


def test_every_help_example_runs_as_written(tmp_path, monkeypatch):
    """Each command's --help example, run as written from a folder that holds the shipped
    examples/, succeeds and writes the files it names."""
    group = typer.main.get_command(app)
    listed = {command for command in EXAMPLES}
    assert listed == {(name,) for name in group.commands if name != "weights"} | {
        ("weights", name) for name in group.commands["weights"].commands
    }
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITREG_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("VITREG_REGISTRY", raising=False)
    monkeypatch.delenv("VITREG_OFFLINE", raising=False)
    # The authors' file that the import example names: an untrained model of the published
    # architecture, saved as their training script saves its checkpoints.
    torch.manual_seed(0)
    torch.save({"state_dict": VitVNet().state_dict(), "epoch": 0}, "dsc0.734.pth.tar")
    for command in EXAMPLES:
        words = help_example(command)
        assert words[: len(command) + 1] == ["vitreg", *command], words
        if command == ("batch-merge",):  # it joins the shards of a job array: one here
            shard = "examples/pairs.csv --out-dir shards --shard 0/1 --weights none --optimize 0"
            shard_run = runner.invoke(app, ["register-batch", *shard.split(), "--no-affine", "-q"])
            assert shard_run.exit_code == 0, shard_run.output
        result = runner.invoke(app, words[1:])
        assert result.exit_code == 0, (words, result.output)
        for flag in OUTPUT_FLAGS:
            if flag in words:
                assert Path(words[words.index(flag) + 1]).exists(), (words, flag)
    assert (tmp_path / "cache" / "vitvnet-ixi-official.safetensors").is_file()


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


def test_bare_register_without_a_checkpoint_optimises_and_says_so_once(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("VITREG_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("VITREG_REGISTRY", raising=False)
    args = ["register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", tmp_path / "w.nii.gz"]
    result = invoke(*args, "--flow", tmp_path / "f.nii.gz", "--iterations", "4,2,0", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("no trained checkpoint is installed") == 1
    report = json.loads(result.stdout)
    assert report["network"] is False
    assert report["optimisation"] == {"optimizer": "greedy", "levels": [4, 2, 1],
                                      "iterations": [4, 2, 0]}  # fmt: skip
    assert (tmp_path / "w.nii.gz").is_file() and (tmp_path / "f.nii.gz").is_file()
    quiet = invoke(*args, "--iterations", "4,2,0", "-q")
    assert quiet.exit_code == 0 and quiet.output.strip() == ""


def test_bare_register_with_the_default_installed_runs_the_network_then_a_short_optimisation(
    pair, tmp_path, monkeypatch, tiny_checkpoint
):
    from tests.conftest import TINY_CONFIG, TINY_FRAME

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(tiny_checkpoint, cache / "small.safetensors")
    body = (cache / "small.safetensors").read_bytes()
    entry = {
        "description": "tiny", "urls": ["http://127.0.0.1:9/never-downloaded"],
        "sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "licence": "test",
        "config": TINY_CONFIG.to_dict(), "frame": TINY_FRAME.to_dict(),
    }  # fmt: skip
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": "small", "checkpoints": {"small": entry}}))
    monkeypatch.setenv("VITREG_HOME", str(cache))
    monkeypatch.setenv("VITREG_REGISTRY", str(registry))
    result = invoke(
        "register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", tmp_path / "w.nii.gz",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no trained checkpoint" not in result.stderr
    report = json.loads(result.stdout)
    assert report["network"] is True
    assert report["optimisation"] == {"optimizer": "greedy", "levels": [2, 1],
                                      "iterations": [20, 5]}  # fmt: skip
    network_only = invoke(
        "register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", tmp_path / "n.nii.gz",
        "--optimize", "0", "--json",
    )  # fmt: skip
    assert json.loads(network_only.stdout)["optimisation"] == {}
