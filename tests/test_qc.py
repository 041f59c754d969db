"""QC figures: the decoded PNG shows each image in its panel, neurological view; clean errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from tests.volumes import grid_affine, rotation, simpleitk_resamples, write
from vitreg.cli import app
from vitreg.errors import VitregError
from vitreg.field import DisplacementField, save_flow
from vitreg.image import load_image
from vitreg.qc import display_grid, qc_figure

runner = CliRunner()
SHAPE = (30, 34, 28)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VIEW_ROWS = ("axial", "coronal", "sagittal")
# Marker corner of each file, as signs along RAS: fixed and moving carry a bright cube in the
# subject's right-anterior-superior octant, the "warped" file the mirror image of it.
MARKER_SIGNS = {"fixed": (1, 1, 1), "moving": (1, 1, 1), "warped": (-1, -1, -1)}
EXPANSION = 0.5  # the flow's det J is 1 + EXPANSION * x / HALF_WIDTH_MM along R
HALF_WIDTH_MM = 30.0


def marked_head(affine: np.ndarray, shape, sign=(1, 1, 1)) -> np.ndarray:
    """A dim textured ellipsoid in world mm (radii 24, 28, 22) with a bright cube from -2 to
    +18 mm along each RAS axis times ``sign``: its asymmetry shows the display orientation."""
    index = np.indices(shape).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ index + affine[:3, 3:4]
    x, y, z = world
    radius = np.sqrt((x / 24) ** 2 + (y / 28) ** 2 + (z / 22) ** 2)
    head = (200 + 100 * np.cos(x / 6) * np.cos(y / 7)) * (radius < 1)
    in_cube = np.all([(-2 <= s * c) & (s * c <= 18) for s, c in zip(sign, world, strict=True)], 0)
    return np.where(in_cube, 1000.0, head).reshape(shape).astype(np.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Fixed (LPS on disk), moving (oblique), a mirrored 'warped' on the fixed grid, and a flow
    whose Jacobian determinant grows along R (1 - 0.5 on the left edge to 1 + 0.5 on the right)."""
    folder = tmp_path_factory.mktemp("qc")
    affines = {
        "fixed": grid_affine(np.diag([-2.0, -2.0, 2.0]), SHAPE),
        "moving": grid_affine(rotation(15, 2) * 2.1, SHAPE, (2, 0, -1)),
    }
    affines["warped"] = affines["fixed"]
    for name, affine in affines.items():
        write(folder / f"{name}.nii.gz", marked_head(affine, SHAPE, MARKER_SIGNS[name]), affine)
    fixed = load_image(folder / "fixed.nii.gz")
    index = np.indices(SHAPE).reshape(3, -1).astype(float)
    x_mm = (fixed.affine[:3, :3] @ index + fixed.affine[:3, 3:4])[0].reshape(SHAPE)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[0, 0] = torch.from_numpy(EXPANSION * x_mm**2 / (2 * HALF_WIDTH_MM)).float()
    save_flow(folder / "flow.nii.gz", DisplacementField(disp_mm=disp, grid=fixed))
    return folder


def assert_png(path, min_size):
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= min_size[0] and height >= min_size[1]
    return width, height


def panels(path) -> tuple[np.ndarray, list[list[tuple[slice, slice]]]]:
    """The decoded figure (H, W, 3) uint8 and its panels' insides, [row][column] -> (rows,
    cols) slices: connected non-white regions of panel size (each panel is framed by its
    axes' spines), the colour bar (taller than a row) left out."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    regions, _ = ndimage.label((rgb < 235).any(axis=2))
    boxes = [box for box in ndimage.find_objects(regions) if box is not None]
    heights = np.array([box[0].stop - box[0].start for box in boxes])
    widths = np.array([box[1].stop - box[1].start for box in boxes])
    large = [b for b, h, w in zip(boxes, heights, widths, strict=True) if h > 60 and w > 60]
    row_height = np.median([b[0].stop - b[0].start for b in large])
    framed = [b for b in large if b[0].stop - b[0].start < 1.5 * row_height]
    framed = [b for b in framed if not any(_inside(b, other) for other in framed if other != b)]
    framed.sort(key=lambda b: (b[0].start + b[0].stop) / 2)
    rows = [framed[i : i + len(framed) // 3] for i in range(0, len(framed), len(framed) // 3)]
    inside = []
    for row in rows:
        row.sort(key=lambda b: b[1].start)
        inside.append([(slice(b[0].start + 3, b[0].stop - 3), slice(b[1].start + 3, b[1].stop - 3))
                       for b in row])  # fmt: skip
    return rgb, inside


def _inside(box: tuple[slice, slice], other: tuple[slice, slice]) -> bool:
    """Whether ``box`` lies within ``other`` (a panel's drawing inside its own frame)."""
    return all(o.start <= b.start and b.stop <= o.stop for b, o in zip(box, other, strict=True))


def bright_centroid(panel: np.ndarray) -> np.ndarray:
    """Centroid of the white marker in a panel, (right, up) in [-1, 1] from its centre; the
    yellow edge letters (blue channel low) are not counted."""
    grey = (panel[..., 2] > 200) & (panel[..., 0] > 200)
    rows, cols = np.nonzero(grey)
    assert rows.size > 50, "no marker visible in the panel"
    height, width = grey.shape
    return np.array([2 * cols.mean() / (width - 1) - 1, 1 - 2 * rows.mean() / (height - 1)])


def expected_slices(folder, name: str) -> dict[str, np.ndarray]:
    """The slices a panel must show, from nibabel alone: the file (moving first read onto the
    fixed grid by SimpleITK through world coordinates) turned RAS+ by as_closest_canonical,
    cut through the middle of the head, as (up, right) image rows and columns."""
    fixed_image = nib.load(str(folder / "fixed.nii.gz"))
    data = np.asarray(nib.load(str(folder / f"{name}.nii.gz")).dataobj, dtype=np.float32)
    if name == "moving":
        data = simpleitk_resamples(folder / "moving.nii.gz", folder / "fixed.nii.gz")
    ras = nib.as_closest_canonical(nib.Nifti1Image(data, fixed_image.affine)).get_fdata()
    centre = [int(np.mean(np.nonzero(ras.max(axis=tuple(a for a in range(3) if a != axis)))))
              for axis in range(3)]  # fmt: skip
    return {
        "axial": ras[:, :, centre[2]].T[::-1],  # right along columns, anterior up
        "coronal": ras[:, centre[1], :].T[::-1],  # right along columns, superior up
        "sagittal": ras[centre[0], :, :].T[::-1],  # anterior along columns, superior up
    }


def correlation_with(panel: np.ndarray, expected: np.ndarray) -> float:
    """Correlation of a panel's grey levels with ``expected`` scaled to the panel's pixels."""
    letters = panel[..., 2] < 0.5 * panel[..., 0]
    grey = panel[..., 0].astype(float)
    height, width = grey.shape
    scaled = Image.fromarray(expected.astype(np.float32)).resize((width, height), Image.NEAREST)
    scaled = np.asarray(scaled, dtype=float)
    return float(np.corrcoef(grey[~letters], scaled[~letters])[0, 1])


def test_qc_panels_show_the_images_in_neurological_orientation(images):
    result = runner.invoke(app, [str(a) for a in (
        "qc", images / "fixed.nii.gz", images / "moving.nii.gz", images / "warped.nii.gz",
        "--flow", images / "flow.nii.gz", "-o", images / "qc.png")])  # fmt: skip
    assert result.exit_code == 0, result.output
    rgb, grid = panels(images / "qc.png")
    assert [len(row) for row in grid] == [6, 6, 6]  # 3 views x (4 images + grid + det J)
    for name, column in (("fixed", 0), ("moving", 1), ("warped", 2)):
        expected = expected_slices(images, name)
        sign = np.sign(MARKER_SIGNS[name][0])
        for row, view in enumerate(VIEW_ROWS):
            panel = rgb[grid[row][column]]
            # The marker lies right (or anterior, sagittal) and up for the fixed and moving
            # heads, left and down for the mirrored one: the neurological view.
            assert np.all(sign * bright_centroid(panel) > 0.1), (name, view)
            correct = correlation_with(panel, expected[view])
            mirrored = correlation_with(panel, expected[view][:, ::-1])
            assert correct > 0.9 and correct > mirrored + 0.3, (name, view, correct, mirrored)
    for row in range(3):  # the checkerboard shows tiles of both markers
        board = rgb[grid[row][3]]
        middle_row, middle_col = board.shape[0] // 2, board.shape[1] // 2
        white = (board[..., 2] > 200) & (board[..., 0] > 200)
        assert white[:middle_row, middle_col:].sum() > 50  # fixed: upper right
        assert white[middle_row:, :middle_col].sum() > 50  # warped: lower left
    for row in (0, 1):  # axial and coronal: det J > 1 (red) on the right, < 1 (blue) left
        jacobian = rgb[grid[row][5]]
        redness = jacobian[..., 0] - jacobian[..., 2]
        half = jacobian.shape[1] // 2
        assert redness[:, half + 5 :].mean() > 20 and redness[:, : half - 5].mean() < -20
    for row in range(3):  # yellow letters in the middle of the four edges of every panel
        for column in range(6):
            panel = rgb[grid[row][column]]
            yellow = (panel[..., 0] > 200) & (panel[..., 1] > 200) & (panel[..., 2] < 100)
            h, w = yellow.shape
            band_h, band_w = h // 8, w // 8
            edges = {
                "left": yellow[h // 2 - band_h : h // 2 + band_h, :band_w],
                "right": yellow[h // 2 - band_h : h // 2 + band_h, -band_w:],
                "bottom": yellow[-band_h:, w // 2 - band_w : w // 2 + band_w],
                "top": yellow[:band_h, w // 2 - band_w : w // 2 + band_w],
            }
            assert all(edge.sum() > 3 for edge in edges.values()), (row, column)


def test_qc_without_a_flow_has_four_columns(images):
    plain = runner.invoke(app, [str(a) for a in (
        "qc", images / "fixed.nii.gz", images / "moving.nii.gz", images / "warped.nii.gz",
        "-o", images / "plain.png")])  # fmt: skip
    assert plain.exit_code == 0, plain.output
    assert_png(images / "plain.png", (600, 450))
    _, grid = panels(images / "plain.png")
    assert [len(row) for row in grid] == [4, 4, 4]


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
        "--no-affine", "--qc", tmp_path / "qc.png", "--json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert_png(tmp_path / "qc.png", (600, 450))
    rgb, grid = panels(tmp_path / "qc.png")
    assert [len(row) for row in grid] == [6, 6, 6]  # with the flow's two columns
    assert np.all(bright_centroid(rgb[grid[0][0]]) > 0.1)  # fixed, axial: right and anterior
