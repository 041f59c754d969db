"""QC figures: a PNG of plausible size, a consistent display orientation, clean errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.cli import app
from vitreg.errors import VitregError
from vitreg.field import DisplacementField, save_flow
from vitreg.image import load_image
from vitreg.qc import display_grid, qc_figure

runner = CliRunner()
SHAPE = (30, 34, 28)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Fixed (LPS), moving (oblique), a 'warped' on the fixed grid and a smooth flow."""
    folder = tmp_path_factory.mktemp("qc")
    fixed_affine = grid_affine(np.diag([-2.0, -2.0, 2.0]), SHAPE)
    moving_affine = grid_affine(rotation(15, 2) * 2.1, SHAPE, (2, 0, -1))
    write(folder / "fixed.nii.gz", world_head(fixed_affine, SHAPE), fixed_affine)
    write(folder / "moving.nii.gz", world_head(moving_affine, SHAPE, (3, 0, 0)), moving_affine)
    write(folder / "warped.nii.gz", world_head(fixed_affine, SHAPE, (0.5, 0, 0)), fixed_affine)
    fixed = load_image(folder / "fixed.nii.gz")
    index = torch.from_numpy(np.indices(SHAPE).astype(np.float32))
    disp = 3 * torch.sin(index[0] / 5)[None].repeat(3, 1, 1, 1)[None]
    save_flow(folder / "flow.nii.gz", DisplacementField(disp_mm=disp, grid=fixed))
    return folder


def assert_png(path, min_size):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= min_size[0] and height >= min_size[1]
    assert width > height  # three rows of views, four or six columns
    return width, height


def test_qc_writes_a_png_with_and_without_flow(images):
    full = runner.invoke(app, [str(a) for a in (
        "qc", images / "fixed.nii.gz", images / "moving.nii.gz", images / "warped.nii.gz",
        "--flow", images / "flow.nii.gz", "-o", images / "qc.png")])  # fmt: skip
    assert full.exit_code == 0, full.output
    plain = runner.invoke(app, [str(a) for a in (
        "qc", images / "fixed.nii.gz", images / "moving.nii.gz", images / "warped.nii.gz",
        "-o", images / "plain.png")])  # fmt: skip
    assert plain.exit_code == 0, plain.output
    full_size = assert_png(images / "qc.png", (900, 450))
    plain_size = assert_png(images / "plain.png", (600, 450))
    assert plain_size[0] < full_size[0]  # no grid and det J columns
    assert 10_000 < (images / "qc.png").stat().st_size < 1_000_000


def test_display_grid_turns_arrays_as_nibabel_canonical_does(images):
    fixed = load_image(images / "fixed.nii.gz")
    grid = display_grid(fixed)
    canonical = nib.as_closest_canonical(nib.load(str(images / "fixed.nii.gz")))
    np.testing.assert_array_equal(grid.turn(fixed.data), canonical.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(grid.spacing, canonical.header.get_zooms()[:3])
    # A world displacement of (1, 2, 3) mm RAS is (0.5, 1, 1.5) voxels along the turned axes.
    disp = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)
    field = DisplacementField(disp_mm=disp.clone(), grid=fixed)
    turned = grid.turn_vectors(field.to_voxels()[0].numpy())
    np.testing.assert_allclose(turned[:, 3, 4, 5], [0.5, 1.0, 1.5], atol=1e-5)


def test_qc_api_refuses_images_off_the_fixed_grid(images, tmp_path):
    fixed = load_image(images / "fixed.nii.gz")
    moving = load_image(images / "moving.nii.gz")
    with pytest.raises(VitregError, match="moving.nii.gz"):
        qc_figure(tmp_path / "qc.png", fixed, moving, moving)
    assert not list(tmp_path.iterdir())


def test_bad_qc_inputs_give_one_line_and_exit_2(images, tmp_path):
    fixed, moving = images / "fixed.nii.gz", images / "moving.nii.gz"
    warped = images / "warped.nii.gz"
    other = write(tmp_path / "other.nii.gz", np.random.rand(8, 8, 8).astype(np.float32), np.eye(4))
    out = tmp_path / "qc.png"
    cases = [
        (["qc", fixed, moving, warped, "-o", tmp_path / "qc.jpg"], "must end in one of .png"),
        (["qc", fixed, moving, tmp_path / "none.nii.gz", "-o", out], "none.nii.gz: no such file"),
        (["qc", fixed, moving, other, "-o", out], "other.nii.gz"),
        (["qc", fixed, moving, warped, "--flow", other, "-o", out], "other.nii.gz"),
        (["qc", fixed, moving, warped, "-o", tmp_path / "no" / "qc.png"], "does not exist"),
        (["register", fixed, moving, "-o", tmp_path / "w.nii.gz", "--qc", tmp_path / "q.pdf"],
         "must end in one of .png"),
    ]  # fmt: skip
    for args, expected in cases:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("vitreg: error:"), result.output
        assert expected in lines[0], (args, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.nii.gz"]


def test_register_writes_a_qc_figure(images, tiny_checkpoint, tmp_path):
    result = runner.invoke(app, [str(a) for a in (
        "register", images / "fixed.nii.gz", images / "moving.nii.gz",
        "-o", tmp_path / "warped.nii.gz", "--weights", tiny_checkpoint,
        "--qc", tmp_path / "qc.png", "--json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "qc.png", (600, 450))
