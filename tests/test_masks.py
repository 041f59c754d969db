"""Cost-function masks end to end, on files: a moving image with a bright synthetic lesion
that the fixed image lacks, registered without and with a moving mask that excludes it.

The field is read back from the written ITK files with nibabel and measured with numpy
(log-Jacobian spread near the lesion, departure from the lesion-free registration); the
labels are warped by SimpleITK with the written flow for Dice away from the lesion.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.volumes import grid_affine, simpleitk_applies_flow, world_head, write
from vitreg.cli import app
from vitreg.field import save_flow
from vitreg.frame import ModelFrame
from vitreg.image import load_image, load_labels
from vitreg.register import register
from vitreg.weights import load_model

SHAPE = (32, 32, 32)
SPACING = 2.0
FRAME = ModelFrame(orientation="RAS", spacing=(SPACING,) * 3, shape=SHAPE)
LESION_CENTRE = np.array([20.0, 14.0, 16.0])  # voxels, inside the head's tissue
LESION_RADIUS = 4.0  # voxels (8 mm)
MASK_MARGIN = 1.5  # voxels excluded around the lesion
NEAR, FAR = LESION_RADIUS + 4, LESION_RADIUS + 6  # voxels from the lesion's centre


def _distance() -> np.ndarray:
    index = np.indices(SHAPE).astype(float)
    return np.sqrt(sum((index[axis] - LESION_CENTRE[axis]) ** 2 for axis in range(3)))


def _labels(image: np.ndarray) -> np.ndarray:
    return ((image > 400).astype(np.int16) + (image > 700)).astype(np.int16)


@pytest.fixture(scope="module")
def lesion_pair(tmp_path_factory):
    """fixed; moving = the head bent by a smooth 3 mm wave; moving_lesion = moving with a
    bright ball 3x the head's maximum; lesion_mask on the moving grid (0 on the lesion and a
    margin); tissue labels of fixed and of moving (without the lesion)."""
    folder = tmp_path_factory.mktemp("lesion")
    affine = grid_affine(np.diag([SPACING] * 3), SHAPE)
    fixed = world_head(affine, SHAPE)
    moving = world_head(affine, SHAPE, wave_mm=3.0)
    lesion = moving.copy()
    lesion[_distance() < LESION_RADIUS] = 3 * moving.max()
    mask = (_distance() >= LESION_RADIUS + MASK_MARGIN).astype(np.uint8)
    for name, data in (
        ("fixed", fixed), ("moving", moving), ("moving_lesion", lesion), ("lesion_mask", mask),
        ("fixed_labels", _labels(fixed)), ("moving_labels", _labels(moving)),
    ):  # fmt: skip
        write(folder / f"{name}.nii.gz", data, affine)
    return folder


@pytest.fixture(scope="module")
def flows(lesion_pair):
    """The ITK flows of three registrations (greedy defaults, no affine, a 2 mm frame):
    'clean' (no lesion), 'lesion' (no mask) and 'masked' (the lesion masked out)."""
    folder = lesion_pair
    fixed = load_image(folder / "fixed.nii.gz")
    runs = {
        "clean": ("moving.nii.gz", None),
        "lesion": ("moving_lesion.nii.gz", None),
        "masked": ("moving_lesion.nii.gz", load_labels(folder / "lesion_mask.nii.gz")),
    }
    paths = {}
    for tag, (moving, mask) in runs.items():
        result = register(
            fixed, load_image(folder / moving), frame=FRAME, affine=False, moving_mask=mask
        )
        paths[tag] = save_flow(folder / f"{tag}_flow.nii.gz", result.field)
    return paths


def _flow_voxels(path) -> np.ndarray:
    """An ITK flow file (LPS mm, 5D) on the test's RAS 2 mm grid -> (3, X, Y, Z) voxels."""
    lps = np.asarray(nib.load(str(path)).dataobj)[:, :, :, 0, :].transpose(3, 0, 1, 2)
    return lps * np.array([-1.0, -1.0, 1.0]).reshape(3, 1, 1, 1) / SPACING


def _log_jacobian(flow_vox: np.ndarray) -> np.ndarray:
    gradient = np.stack([np.stack(np.gradient(flow_vox[i])) for i in range(3)])  # [i, j]
    jacobian = gradient.transpose(2, 3, 4, 0, 1) + np.eye(3)
    return np.log(np.clip(np.linalg.det(jacobian), 1e-3, None))


def _mean_dice(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    scores = []
    for label in (1, 2):
        x, y = (a == label) & region, (b == label) & region
        scores.append(2 * (x & y).sum() / (x.sum() + y.sum()))
    return float(np.mean(scores))


def test_with_the_lesion_masked_the_field_near_it_stays_smooth(flows):
    near = _distance() < NEAR
    spread = {
        tag: float(_log_jacobian(_flow_voxels(path))[near].std()) for tag, path in flows.items()
    }
    clean = _flow_voxels(flows["clean"])
    departure = {
        tag: float(np.linalg.norm(_flow_voxels(flows[tag]) - clean, axis=0)[near].mean())
        for tag in ("lesion", "masked")
    }
    # Written with: SDlogJ near the lesion 0.028 (clean), 0.109 (lesion), 0.030 (masked);
    # mean departure from the clean field there 0.51 voxel (lesion), 0.14 voxel (masked).
    assert spread["lesion"] > 2 * spread["clean"]
    assert spread["masked"] < 1.3 * spread["clean"]
    assert departure["masked"] < 0.4 * departure["lesion"]


def test_dice_away_from_the_lesion_is_unchanged_by_the_mask(lesion_pair, flows):
    folder = lesion_pair
    far = _distance() > FAR
    fixed_labels = np.asarray(nib.load(str(folder / "fixed_labels.nii.gz")).dataobj)
    moving_labels = np.asarray(nib.load(str(folder / "moving_labels.nii.gz")).dataobj)
    before = _mean_dice(fixed_labels, moving_labels, far)
    after = {
        tag: _mean_dice(
            fixed_labels,
            simpleitk_applies_flow(
                path, folder / "moving_labels.nii.gz", folder / "fixed_labels.nii.gz", nearest=True
            ),
            far,
        )
        for tag, path in flows.items()
    }
    # Written with: 0.50 before; 0.824 (clean), 0.824 (lesion), 0.825 (masked).
    assert after["clean"] > before + 0.2
    assert abs(after["masked"] - after["clean"]) < 0.01
    assert abs(after["masked"] - after["lesion"]) < 0.01


runner = CliRunner()


def test_register_command_passes_both_masks_to_the_registration(
    lesion_pair, tmp_path, tiny_checkpoint
):
    """`vitreg register --fixed-mask --moving-mask` gives the field the Python API gives with
    the same masks and checkpoint (a tiny untrained one on a 2 mm frame, for speed), and the
    masks change it."""
    folder = lesion_pair
    result = runner.invoke(
        app,
        [
            str(a) for a in (
                "register", folder / "fixed.nii.gz", folder / "moving_lesion.nii.gz",
                "-o", tmp_path / "warped.nii.gz", "--flow", tmp_path / "flow.nii.gz",
                "--weights", tiny_checkpoint, "--iterations", "10,5", "--levels", "2,1",
                "--no-affine", "--json",
                "--fixed-mask", folder / "fixed_labels.nii.gz",
                "--moving-mask", folder / "lesion_mask.nii.gz",
            )
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"]["flow"] == str(tmp_path / "flow.nii.gz")
    network, frame = load_model(tiny_checkpoint)
    fixed, moving = load_image(folder / "fixed.nii.gz"), load_image(folder / "moving_lesion.nii.gz")
    options = dict(model=network, frame=frame, iterations=(10, 5), levels=(2, 1), affine=False)
    masks = {
        "fixed_mask": load_labels(folder / "fixed_labels.nii.gz"),  # the head: nonzero inside
        "moving_mask": load_labels(folder / "lesion_mask.nii.gz"),
    }
    expected = register(fixed, moving, **options, **masks).field.disp_mm[0].numpy()
    unmasked = register(fixed, moving, **options).field.disp_mm[0].numpy()
    written_mm = _flow_voxels(tmp_path / "flow.nii.gz") * SPACING  # RAS mm
    np.testing.assert_allclose(written_mm, expected, atol=1e-4)
    assert np.abs(expected - unmasked).max() > 0.1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--moving-mask", "{folder}/fixed_small.nii.gz"], "fixed_small.nii.gz: grid"),
        (["--fixed-mask", "{folder}/empty.nii.gz"], "empty.nii.gz: the fixed mask is empty"),
        (
            ["--moving-mask", "{folder}/lesion_mask.nii.gz", "--optimizer", "adam"],
            "--moving-mask",
        ),
    ],
)
def test_bad_masks_are_one_line_user_errors(lesion_pair, tmp_path, extra, message):
    folder = lesion_pair
    affine = grid_affine(np.diag([SPACING] * 3), (16, 16, 16))
    write(folder / "fixed_small.nii.gz", np.ones((16, 16, 16), np.uint8), affine)
    write(folder / "empty.nii.gz", np.zeros(SHAPE, np.uint8), grid_affine(np.eye(3) * 2, SHAPE))
    args = [
        "register", str(folder / "fixed.nii.gz"), str(folder / "moving_lesion.nii.gz"),
        "-o", str(tmp_path / "warped.nii.gz"), "--weights", "none",
        *(word.format(folder=folder) for word in extra),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "vitreg: error:" in result.output and message in " ".join(result.output.split())
    assert not (tmp_path / "warped.nii.gz").exists()
