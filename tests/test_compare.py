"""benchmarks/compare.py's greedy rows read greedy's outputs in the right conventions: its
matrices against SimpleITK, its composed field against greedy's own reslicing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.evaluate import Pair, load_pair
from vitreg.field import DisplacementField, warp_image, warp_labels_nearest, with_affine
from vitreg.image import load_image
from vitreg.metrics import dice_per_label

needs_greedy = pytest.mark.skipif(
    importlib.util.find_spec("picsl_greedy") is None, reason="picsl_greedy is not installed"
)
needs_ants = pytest.mark.skipif(
    importlib.util.find_spec("ants") is None, reason="antspyx is not installed"
)

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    """A textured head on an oblique LAS 2 mm 32^3 fixed grid, and the same head shifted by
    (5, -3, 2) mm and stretched on a RAS 2.5 mm 28^3 moving grid; labels: 3 intensity
    classes of each."""
    folder = tmp_path_factory.mktemp("greedy_pair")
    fixed_affine = grid_affine(rotation(8, 2) @ np.diag([-2.0, 2.0, 2.0]), (32,) * 3, (1, -2, 3))
    moving_affine = grid_affine(np.diag([2.5, 2.5, 2.5]), (28,) * 3)
    fixed = world_head(fixed_affine, (32,) * 3)
    stretch = np.diag([1.12, 0.95, 1.0, 1.0])  # world content stretched about the origin
    moving = world_head(stretch @ moving_affine, (28,) * 3, shift_mm=(5.0, -3.0, 2.0))
    paths = {}
    for name, image, affine in (("fixed", fixed, fixed_affine), ("moving", moving, moving_affine)):
        paths[name] = write(folder / f"{name}.nii.gz", image, affine)
        labels = (image > 300).astype(np.int16) + (image > 600) + (image > 900)
        paths[f"{name}_labels"] = write(folder / f"{name}_labels.nii.gz", labels, affine)
    return paths


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path), sitk.sitkFloat32)


def greedy_reslice(fixed: Path, moving: Path, interpolation: str, *chain: Path) -> np.ndarray:
    """greedy's own reslicing of ``moving`` onto ``fixed`` through the transform files
    ``chain`` (``-r``, in greedy's order), as an (X, Y, Z) array."""
    from picsl_greedy import Greedy3D

    greedy = Greedy3D()
    transforms = " ".join(str(path) for path in chain)
    greedy.execute(
        f"-d 3 -rf {fixed} -ri {interpolation} -rm {moving} resliced -r {transforms}",
        resliced=None,
    )
    return sitk.GetArrayFromImage(greedy["resliced"]).transpose(2, 1, 0)


def write_matrix(path: Path, matrix: np.ndarray) -> Path:
    """A 4x4 matrix as a greedy/c3d ``.mat`` text file."""
    np.savetxt(path, matrix)
    return path


@needs_greedy
def test_greedy_matrix_maps_fixed_ras_to_moving_ras(pair, tmp_path):
    """A given matrix resliced by greedy equals SimpleITK's resampling with that matrix read as
    fixed RAS -> moving RAS (flipped to ITK's LPS), and not with it read as LPS."""
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(6, 0) @ np.diag([1.05, 0.97, 1.0])
    matrix[:3, 3] = [4.0, -3.0, 2.5]
    mat = write_matrix(tmp_path / "given.mat", matrix)
    greedy_image = greedy_reslice(pair["fixed"], pair["moving"], "LINEAR", mat)

    def simpleitk(matrix_lps: np.ndarray) -> np.ndarray:
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(matrix_lps[:3, :3].ravel().tolist())
        transform.SetTranslation(matrix_lps[:3, 3].tolist())
        image = sitk.Resample(read(pair["moving"]), read(pair["fixed"]), transform, sitk.sitkLinear)
        return sitk.GetArrayFromImage(image).transpose(2, 1, 0)

    def correlation(image: np.ndarray) -> float:
        return float(np.corrcoef(image.ravel(), greedy_image.ravel())[0, 1])

    # The two differ only at the moving grid's edge, which greedy and ITK pad differently.
    as_ras = simpleitk(LPS @ matrix @ LPS)
    assert correlation(as_ras) > 0.9999
    assert np.median(np.abs(as_ras - greedy_image)) < 1e-3 * greedy_image.max()
    assert correlation(simpleitk(matrix)) < 0.9  # read as LPS
    assert correlation(simpleitk(LPS @ np.linalg.inv(matrix) @ LPS)) < 0.9  # moving -> fixed


@needs_greedy
@pytest.mark.parametrize("stationary_velocity", [False, True], ids=["greedy", "greedy-sv"])
def test_greedy_field_reproduces_greedy_reslicing(compare, pair, tmp_path, stationary_velocity):
    """The composed field, read as a vitreg DisplacementField, warps the moving image and
    labels as greedy's reslicer does through its warp and affine; it is the warp then the
    affine (read as RAS); and the registration did improve the overlap."""
    outputs = compare.greedy_registration(
        read(pair["fixed"]), read(pair["moving"]), threads=2,
        stationary_velocity=stationary_velocity, iterations="40x20x10",
    )  # fmt: skip
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    field = compare.itk_displacement_to_field(outputs["composed"], fixed, tmp_path)
    assert field.disp_mm.shape == (1, 3, 32, 32, 32)

    warp_file = tmp_path / "warp.nii.gz"
    sitk.WriteImage(outputs["warp"], str(warp_file))
    chain = (warp_file, write_matrix(tmp_path / "affine.mat", outputs["affine"]))
    theirs = greedy_reslice(pair["fixed"], pair["moving"], "LINEAR", *chain)
    mine = warp_image(moving, field)
    assert np.corrcoef(mine.ravel(), theirs.ravel())[0, 1] > 0.9999
    assert np.abs(mine - theirs).max() < 1e-4 * theirs.max()

    labels = load_image(pair["moving_labels"])
    their_labels = greedy_reslice(pair["fixed"], pair["moving_labels"], "NN", *chain)
    my_labels = warp_labels_nearest(labels, field)
    assert (my_labels == their_labels).mean() > 0.999

    # The warp alone (LPS, ITK) then the affine (RAS) gives the composed field.
    warp = compare.itk_displacement_to_field(outputs["warp"], fixed, tmp_path)
    chained = with_affine(warp, outputs["affine"])
    assert torch.allclose(chained.disp_mm, field.disp_mm, atol=1e-3)

    fixed_labels = load_image(pair["fixed_labels"]).data
    identity = DisplacementField(torch.zeros_like(field.disp_mm), fixed)
    before = dice_per_label(fixed_labels, warp_labels_nearest(labels, identity)).mean
    after = dice_per_label(fixed_labels, my_labels).mean
    assert after > before + 0.1


@needs_greedy
def test_greedy_rows_return_the_pull_field_on_the_fixed_grid(compare, pair, tmp_path):
    """Both greedy rows of METHODS run on a loaded pair and return a field on its fixed grid."""
    loaded = load_pair(
        Pair(row=0, name="p", set="s", fixed=pair["fixed"], moving=pair["moving"],
             fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"])
    )  # fmt: skip
    options = compare.Options(None, 0, 2, "cpu", tmp_path)
    for name in ("greedy", "greedy -sv"):
        field = compare.METHODS[name](loaded, options)
        assert field.grid is loaded.fixed
        warped = warp_labels_nearest(loaded.labels[1], field)
        assert dice_per_label(loaded.labels[0].data, warped).mean > 0.6


@needs_ants
def test_ants_cc_field_reproduces_ants_own_warping(compare, pair, tmp_path):
    """The ANTs CC row (few iterations here) runs the recipe's stages and returns the field
    with which vitreg warps the moving image and labels as antsApplyTransforms does with
    ANTs' own transforms; the registration improves the overlap."""
    import ants

    loaded = load_pair(
        Pair(row=0, name="p", set="s", fixed=pair["fixed"], moving=pair["moving"],
             fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"])
    )  # fmt: skip
    options = compare.Options(None, 0, 2, "cpu", tmp_path)
    field = compare.ants_syn_cc(loaded, options, cc_radius=2, syn_iterations="20x10x5x0")
    assert field.grid is loaded.fixed
    transforms = [
        str(tmp_path / "antscc_1Warp.nii.gz"),
        str(tmp_path / "antscc_0GenericAffine.mat"),
    ]
    fixed_image = ants.image_read(str(pair["fixed"]))

    theirs = ants.apply_transforms(fixed_image, ants.image_read(str(pair["moving"])), transforms)
    mine = warp_image(loaded.moving, field)
    assert np.corrcoef(mine.ravel(), theirs.numpy().ravel())[0, 1] > 0.9999

    their_labels = ants.apply_transforms(
        fixed_image, ants.image_read(str(pair["moving_labels"])), transforms,
        interpolator="nearestNeighbor",
    ).numpy()  # fmt: skip
    my_labels = warp_labels_nearest(loaded.labels[1], field)
    assert (my_labels == their_labels).mean() > 0.995

    identity = DisplacementField(torch.zeros_like(field.disp_mm), loaded.fixed)
    fixed_labels = loaded.labels[0].data
    before = dice_per_label(fixed_labels, warp_labels_nearest(loaded.labels[1], identity))
    assert dice_per_label(fixed_labels, my_labels).mean > before.mean + 0.1


def test_default_rows_hold_the_anchors_and_fit_the_methods_option(compare):
    """--methods splits on commas, so no name holds one; the default rows are known methods,
    with the greedy and ANTs anchors; SyNCC (hours per pair) and the vitreg variants are
    optional."""
    assert not [name for name in compare.METHODS if "," in name]
    assert set(compare.DEFAULT_METHODS) == set(compare.METHODS) - set(compare.OPTIONAL_METHODS)
    assert "ANTs SyNCC" in compare.OPTIONAL_METHODS
    for name in ("greedy", "greedy -sv", compare.ANTS_CC, "ANTs SyN", "SimpleITK demons"):
        assert name in compare.DEFAULT_METHODS
