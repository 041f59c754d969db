"""Other tools' transform files, checked by the tools themselves: ANTs (antspyx), SimpleITK,
greedy (picsl_greedy), nibabel's MGH header, and scipy as an independent resampler."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.errors import VitregError
from vitreg.exchange import (
    TransformItem,
    ants_files,
    check_affine_out,
    dense_part,
    field_from_transforms,
    inverse_dense_part,
    load_lta,
    save_affine_out,
    save_ants_transforms,
    save_lta,
)
from vitreg.field import (
    DisplacementField,
    affine_displacement,
    load_flow,
    save_flow,
    warp_image,
    warp_labels_nearest,
    with_affine,
)
from vitreg.frame import ModelFrame, flow_to_native_mm, foreground_center_mm, frame_affine
from vitreg.image import Volume, load_image, load_labels
from vitreg.register import Registration, invert
from vitreg.transform import flow_mm_to_vox

FIXED_SHAPE, MOVING_SHAPE = (30, 34, 28), (36, 40, 34)
FRAME = ModelFrame(orientation="LIA", spacing=(2.2, 2.2, 2.2), shape=(32, 32, 32))
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def affine_ras() -> np.ndarray:
    """A fixed -> moving affine that does not commute with the dense part (rotation, scales)."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(6, 0) @ rotation(-4, 2) @ np.diag([1.05, 0.97, 1.02])
    affine[:3, 3] = [3.0, -2.0, 1.5]
    return affine


def analytic_dense(grid: Volume) -> torch.Tensor:
    """A smooth dense part on ``grid``: (1, 3, X, Y, Z) RAS mm, a few mm, known everywhere."""
    index = np.indices(grid.shape).reshape(3, -1)
    x, y, z = grid.affine[:3, :3] @ index + grid.affine[:3, 3:4]
    disp = np.stack([2.0 * np.sin(y / 9), 1.5 * np.cos(z / 7), 1.8 * np.sin(x / 8)])
    return torch.from_numpy(disp.reshape(3, *grid.shape).astype(np.float32))[None]


@pytest.fixture()
def pair(tmp_path):
    """Fixed (oblique, 2 mm) and moving (LPS, 1.8 mm) heads and label maps, zero at the borders."""
    fixed_affine = grid_affine(rotation(10, 2) @ np.diag([2.0, 2.0, 2.0]), FIXED_SHAPE, (1, 2, 0))
    moving_affine = grid_affine(np.diag([-1.8, -1.8, 1.8]), MOVING_SHAPE, (0, 0, 0))
    fixed_data = zero_frame(world_head(fixed_affine, FIXED_SHAPE))
    moving_data = zero_frame(world_head(moving_affine, MOVING_SHAPE, shift_mm=(3, -2, 1)))
    paths = {
        "fixed": write(tmp_path / "fixed.nii.gz", fixed_data, fixed_affine),
        "moving": write(tmp_path / "moving.nii.gz", moving_data, moving_affine),
        "fixed_labels": write(tmp_path / "fixed_seg.nii.gz", labels_of(fixed_data), fixed_affine),
        "moving_labels": write(
            tmp_path / "moving_seg.nii.gz", labels_of(moving_data), moving_affine
        ),
    }
    return paths


def zero_frame(image: np.ndarray, width: int = 2) -> np.ndarray:
    """The image with its outer ``width`` voxels zeroed: tools differ only in how they read
    the last half voxel at a border, which is not what these tests are about."""
    inner = np.zeros_like(image)
    core = (slice(width, -width),) * 3
    inner[core] = image[core]
    return inner


def labels_of(image: np.ndarray) -> np.ndarray:
    return ((image > 350).astype(np.int16) + (image > 650) + 2 * (image > 900)).astype(np.int16)


def hand_made_registration(fixed: Volume, moving: Volume, own_frame: bool = False) -> Registration:
    """A Registration with a known dense part and affine, built as register builds its own.

    The dense part is :func:`analytic_dense` on the model frame: the fixed grid itself (then
    it is exact on the fixed grid), or with ``own_frame`` a frame of its own (LIA, 2.2 mm).
    """
    if own_frame:
        frame_grid, shape = frame_affine(FRAME, foreground_center_mm(fixed)), FRAME.shape
    else:
        frame_grid, shape = fixed.affine, fixed.shape
    frame_volume = Volume(np.zeros(shape, np.uint8), frame_grid, None, Path("frame"))
    flow_vox = flow_mm_to_vox(analytic_dense(frame_volume), frame_grid)
    dense = flow_to_native_mm(flow_vox, frame_grid, fixed)
    whole = with_affine(DisplacementField(disp_mm=dense, grid=fixed), affine_ras())
    return Registration(
        warped=warp_image(moving, whole),
        field=whole,
        flow_vox=flow_vox,
        frame_affine=frame_grid,
        ncc_before=0.0,
        ncc_after=0.0,
        seconds=0.0,
        device="cpu",
        affine_ras=affine_ras(),
    )


def ants_apply(reference: Path, image: Path, transforms: list, inverted=None, labels=False):
    ants = pytest.importorskip("ants")
    out = ants.apply_transforms(
        ants.image_read(str(reference)),
        ants.image_read(str(image)),
        [str(t) for t in transforms],
        interpolator="nearestNeighbor" if labels else "linear",
        # Explicit: antspyx inverts the first of [*.mat, warp] when told nothing.
        whichtoinvert=inverted or [False] * len(transforms),
    )
    return out.numpy()


def assert_images_agree(ours: np.ndarray, theirs: np.ndarray, scale: float) -> None:
    difference = np.abs(ours - theirs)
    assert difference.max() < 1e-3 * scale, difference.max()


def assert_labels_agree(ours: np.ndarray, theirs: np.ndarray, share: float = 1e-3) -> None:
    assert ours.shape == theirs.shape
    assert np.unique(theirs).size >= 3  # the comparison sees structures, not background
    assert np.mean(ours != theirs.astype(ours.dtype)) <= share


# ---------------------------------------------------------------------------------------
# ANTs prefix files


def test_dense_part_is_the_known_deformable_part(pair):
    fixed = load_image(pair["fixed"])
    dense = analytic_dense(fixed)
    whole = with_affine(DisplacementField(disp_mm=dense, grid=fixed), affine_ras())
    recovered = dense_part(whole, affine_ras())
    assert recovered.grid is fixed
    np.testing.assert_allclose(recovered.disp_mm.numpy(), dense.numpy(), atol=1e-3)


def test_ants_files_are_named_as_antsregistration_names_them(tmp_path):
    files = ants_files(tmp_path / "sub01_")
    assert files.affine == tmp_path / "sub01_0GenericAffine.mat"
    assert files.warp == tmp_path / "sub01_1Warp.nii.gz"
    assert files.inverse_warp == tmp_path / "sub01_1InverseWarp.nii.gz"
    assert ants_files(f"{tmp_path}/").warp == tmp_path / "1Warp.nii.gz"


@pytest.mark.parametrize("own_frame", [False, True], ids=["frame=fixed", "own frame"])
def test_ants_applies_the_prefix_files_as_vitreg_warps(tmp_path, pair, own_frame):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    result = hand_made_registration(fixed, moving, own_frame)
    files = save_ants_transforms(tmp_path / "out_", result)
    assert files.affine.is_file() and files.warp.is_file() and not files.inverse_warp.exists()
    assert nib.load(files.warp).shape == (*FIXED_SHAPE, 1, 3)
    listed = [files.warp, files.affine]

    theirs = ants_apply(pair["fixed"], pair["moving"], listed)
    assert_images_agree(result.warped, theirs, float(moving.data.max()))

    moving_labels = load_labels(pair["moving_labels"])
    ours_labels = warp_labels_nearest(moving_labels, result.field)
    theirs_labels = ants_apply(pair["fixed"], pair["moving_labels"], listed, labels=True)
    assert_labels_agree(ours_labels, theirs_labels)

    # The order matters: the affine first, then the warp, is another map.
    swapped = ants_apply(pair["fixed"], pair["moving"], [files.affine, files.warp])
    assert np.abs(swapped - theirs).max() > 0.1 * moving.data.max()


@pytest.mark.parametrize("own_frame", [False, True], ids=["frame=fixed", "own frame"])
def test_ants_inverse_files_take_the_fixed_image_to_moving_as_vitreg_invert(
    tmp_path, pair, own_frame
):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    result = hand_made_registration(fixed, moving, own_frame)
    files = save_ants_transforms(tmp_path / "out_", result, inverse=True)
    assert nib.load(files.inverse_warp).shape == (*FIXED_SHAPE, 1, 3)
    inverse = invert(result, moving)
    listed = [files.affine, files.inverse_warp]

    theirs = ants_apply(pair["moving"], pair["fixed"], listed, inverted=[True, False])
    ours = warp_image(fixed, inverse.field)
    # vitreg reads the inverse in the frame, ANTs from the fixed grid: one more interpolation
    # in its own frame (measured: 2.4e-4 of the range on average, 0.06% of the labels).
    inside = (ours > 0) | (theirs > 0)
    assert np.abs(ours - theirs)[inside].mean() < 1e-3 * fixed.data.max()

    fixed_labels = load_labels(pair["fixed_labels"])
    theirs_labels = ants_apply(
        pair["moving"], pair["fixed_labels"], listed, inverted=[True, False], labels=True
    )
    assert_labels_agree(warp_labels_nearest(fixed_labels, inverse.field), theirs_labels, 2e-3)


def test_inverse_dense_part_undoes_the_dense_part(tmp_path, pair):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    result = hand_made_registration(fixed, moving)
    inverse = inverse_dense_part(result)
    assert inverse.grid is fixed
    # x + u(x) + v(x + u(x)) = x, with v read by SimpleITK from the ITK file.
    path = save_flow(tmp_path / "inverse.nii.gz", inverse, "itk")
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    )
    index = np.indices(fixed.shape).reshape(3, -1)
    world = fixed.affine[:3, :3] @ index + fixed.affine[:3, 3:4]
    forward = analytic_dense(fixed)[0].numpy().reshape(3, -1)
    there = world + forward
    back = np.array([transform.TransformPoint(tuple(RAS_TO_LPS @ p)) for p in there.T]).T
    error = np.linalg.norm(RAS_TO_LPS @ back - world, axis=0).reshape(fixed.shape)
    moved = np.linalg.norm(forward, axis=0).reshape(fixed.shape)
    head = fixed.data > 0.3 * fixed.data.max()
    # As accurate as vitreg.register.invert (about 0.15 mm here, against ~2.5 mm displacements).
    assert np.median(error[head]) < 0.1 * np.median(moved[head])
    assert error[head].max() < 0.5


# ---------------------------------------------------------------------------------------
# FreeSurfer: SynthMorph-style RAS flows and LTAs


@pytest.mark.parametrize("suffix", [".nii.gz", ".mgz"])
def test_freesurfer_flow_holds_the_ras_displacement_on_the_fixed_grid(tmp_path, pair, suffix):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    result = hand_made_registration(fixed, moving)
    path = save_flow(tmp_path / f"flow{suffix}", result.field, "freesurfer")
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float64)
    assert data.shape == (*FIXED_SHAPE, 3)
    np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-4)
    if suffix == ".nii.gz":
        assert image.header.get_intent()[0] == "none"

    # The expected values, from the definition: fixed voxel centre x -> A(x + u(x)) - x.
    index = np.indices(FIXED_SHAPE).reshape(3, -1)
    world = fixed.affine[:3, :3] @ index + fixed.affine[:3, 3:4]
    inner = world + analytic_dense(fixed)[0].numpy().reshape(3, -1)
    target = affine_ras()[:3, :3] @ inner + affine_ras()[:3, 3:4]
    expected = (target - world).T.reshape(*FIXED_SHAPE, 3)
    np.testing.assert_allclose(data, expected, atol=1e-3)

    # Applied by an independent resampler it gives vitreg's warped image.
    moving_index = np.linalg.inv(moving.affine) @ np.vstack(
        [world + data.reshape(-1, 3).T, np.ones(world.shape[1])]
    )
    resampled = ndimage.map_coordinates(moving.data, moving_index[:3], order=1, cval=0.0)
    assert_images_agree(result.warped, resampled.reshape(FIXED_SHAPE), moving.data.max())

    loaded = load_flow(path, "freesurfer")
    np.testing.assert_allclose(loaded.disp_mm.numpy(), result.field.disp_mm.numpy(), atol=1e-4)


def read_lta(path: Path) -> dict:
    """An LTA parsed as FreeSurfer's readers do: comments and blank lines out, then fixed lines."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[4] == "1 4 4" and lines[9] == "src volume info" and lines[18] == "dst volume info"

    def block(start: int) -> dict:
        entries = {}
        for line in lines[start : start + 8]:
            key, value = (part.strip() for part in line.split("=", 1))
            entries[key] = value.split("#")[0].strip()
        return entries

    return {
        "type": int(lines[0].split("=")[1].split("#")[0]),
        "matrix": np.array([line.split() for line in lines[5:9]], dtype=float),
        "src": block(10),
        "dst": block(19),
    }


def assert_block_matches_mgh(block: dict, mgz_path: Path) -> None:
    header = nib.load(mgz_path).header
    numbers = {key: np.array(block[key].split(), dtype=float) for key in block if key != "filename"}
    assert numbers["valid"][0] == 1
    assert Path(block["filename"]) == mgz_path.resolve()
    np.testing.assert_array_equal(numbers["volume"], header["dims"][:3])
    np.testing.assert_allclose(numbers["voxelsize"], header["delta"], atol=1e-5)
    for row, key in enumerate(("xras", "yras", "zras")):
        np.testing.assert_allclose(numbers[key], header["Mdc"][row], atol=1e-5)
    np.testing.assert_allclose(numbers["cras"], header["Pxyz_c"], atol=1e-4)


def test_lta_maps_moving_ras_to_fixed_ras_with_both_volume_geometries(tmp_path, pair):
    mgz = {}
    for name in ("fixed", "moving"):
        source = nib.load(pair[name])
        mgz[name] = tmp_path / f"{name}.mgz"
        nib.save(nib.MGHImage(source.get_fdata(dtype=np.float32), source.affine), mgz[name])
    fixed, moving = load_image(mgz["fixed"]), load_image(mgz["moving"])
    path = save_lta(tmp_path / "affine.lta", affine_ras(), fixed, moving)
    parsed = read_lta(path)
    assert parsed["type"] == 1
    # The LTA pushes moving RAS to fixed RAS: it undoes vitreg's fixed -> moving affine.
    np.testing.assert_allclose(parsed["matrix"] @ affine_ras(), np.eye(4), atol=1e-9)
    assert_block_matches_mgh(parsed["src"], mgz["moving"])
    assert_block_matches_mgh(parsed["dst"], mgz["fixed"])
    np.testing.assert_allclose(load_lta(path), parsed["matrix"], atol=1e-12)


def test_lta_in_a_transform_list_is_the_affine_it_was_written_from(tmp_path, pair):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    path = save_lta(tmp_path / "affine.lta", affine_ras(), fixed, moving)
    field = field_from_transforms([path], reference=fixed)
    expected = affine_displacement(fixed, affine_ras())
    np.testing.assert_allclose(field.disp_mm.numpy(), expected.numpy(), atol=1e-3)


def test_lta_of_another_type_is_refused(tmp_path):
    path = tmp_path / "vox.lta"
    path.write_text("type      = 0 # LINEAR_VOX_TO_VOX\nnxforms   = 1\n1 4 4\n")
    with pytest.raises(VitregError, match="type 0"):
        load_lta(path)


# ---------------------------------------------------------------------------------------
# Transform lists read as ANTs applies them


def ants_affine_file(path: Path, affine: np.ndarray, center_ras) -> Path:
    """Write ``affine`` (RAS pull) with antspyx's own writer, as an ITK transform with a centre."""
    ants = pytest.importorskip("ants")
    matrix = RAS_TO_LPS @ affine[:3, :3] @ RAS_TO_LPS
    center = RAS_TO_LPS @ np.asarray(center_ras, dtype=float)
    # ITK: y = M (x - c) + c + t; the same map as lps(x) = M x + offset.
    offset = RAS_TO_LPS @ affine[:3, 3]
    translation = offset - center + matrix @ center
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        precision="double",
        matrix=matrix,
        center=center.tolist(),
        translation=translation.tolist(),
    )
    ants.write_transform(transform, str(path))
    return path


def sitk_warp_file(path: Path, grid_affine_ras: np.ndarray, disp_ras: np.ndarray) -> Path:
    """Write a displacement field (X, Y, Z, 3) RAS mm with SimpleITK alone (LPS, ITK geometry)."""
    disp_lps = disp_ras * np.array([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(disp_lps.transpose(2, 1, 0, 3).astype(np.float64), isVector=True)
    linear = RAS_TO_LPS @ grid_affine_ras[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin((RAS_TO_LPS @ grid_affine_ras[:3, 3]).tolist())
    sitk.WriteImage(image, str(path))
    return path


def warp_grid(pair) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid for the warp that covers only part of the fixed field of view (2.5 mm, tilted)."""
    shape = (20, 22, 18)
    return grid_affine(rotation(-8, 0) @ np.diag([2.5, 2.5, 2.5]), shape, (2, 0, -1)), shape


def smooth_warp(affine: np.ndarray, shape) -> np.ndarray:
    index = np.indices(shape).reshape(3, -1)
    x, y, z = affine[:3, :3] @ index + affine[:3, 3:4]
    disp = np.stack([2.5 * np.cos(y / 8), 2.0 * np.sin(x / 6 + z / 9), 1.5 * np.sin(y / 7)])
    return disp.T.reshape(*shape, 3)


def test_affine_written_by_antspyx_is_applied_as_ants_applies_it(tmp_path, pair):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    path = ants_affine_file(tmp_path / "affine.mat", affine_ras(), center_ras=(5, -3, 2))
    for item, inverted in ((str(path), [False]), (f"[{path},1]", [True])):
        ours = warp_image(moving, field_from_transforms([item], reference=fixed))
        theirs = ants_apply(pair["fixed"], pair["moving"], [path], inverted=inverted)
        assert theirs.max() > 0.5 * moving.data.max()
        assert_images_agree(ours, theirs, moving.data.max())


def test_warp_written_by_simpleitk_is_applied_on_its_own_grid_as_ants_applies_it(tmp_path, pair):
    moving = load_image(pair["moving"])
    affine, shape = warp_grid(pair)
    path = sitk_warp_file(tmp_path / "warp.nii.gz", affine, smooth_warp(affine, shape))
    field = field_from_transforms([path])  # no reference: the warp's own grid
    assert field.grid.shape == shape
    np.testing.assert_allclose(field.grid.affine, affine, atol=1e-4)
    theirs = ants_apply(path, pair["moving"], [path])
    assert_images_agree(warp_image(moving, field), theirs, moving.data.max())


def test_lists_of_warps_and_affines_follow_the_ants_order(tmp_path, pair):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    affine, shape = warp_grid(pair)
    warp = sitk_warp_file(tmp_path / "warp.nii.gz", affine, smooth_warp(affine, shape))
    first = ants_affine_file(tmp_path / "first.mat", affine_ras(), center_ras=(0, 0, 0))
    second_ras = np.eye(4)
    second_ras[:3, :3] = rotation(-5, 1)
    second_ras[:3, 3] = [-2.0, 1.0, 3.0]
    second = tmp_path / "second.txt"  # a plain RAS matrix, as greedy writes them
    np.savetxt(second, second_ras)
    second_itk = ants_affine_file(tmp_path / "second.mat", second_ras, center_ras=(1, 1, 1))
    # The warp covers part of the fixed grid: points that leave it get no displacement.
    for listed, for_ants in (
        ([warp, first], [warp, first]),
        ([first, warp], [first, warp]),
        ([second, warp, first], [second_itk, warp, first]),
    ):
        ours = warp_image(moving, field_from_transforms(listed, reference=fixed))
        theirs = ants_apply(pair["fixed"], pair["moving"], for_ants)
        assert_images_agree(ours, theirs, moving.data.max())


def test_greedy_matrix_and_warp_are_applied_as_greedy_applies_them(tmp_path, pair):
    greedy = pytest.importorskip("picsl_greedy")
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    matrix, warp, out = tmp_path / "affine.mat", tmp_path / "warp.nii.gz", tmp_path / "out.nii.gz"
    np.savetxt(matrix, affine_ras())
    runner = greedy.Greedy3D()
    runner.execute(
        f"-d 3 -threads 1 -i {pair['fixed']} {pair['moving']} -it {matrix} -o {warp} "
        "-n 10x5 -m SSD -s 2vox 1vox"
    )
    runner.execute(f"-d 3 -rf {pair['fixed']} -rm {pair['moving']} {out} -r {warp} {matrix}")
    theirs = load_image(out).data
    field = field_from_transforms([warp, matrix], reference=fixed)
    assert float(dense_part(field, affine_ras()).disp_mm.abs().max()) > 0.5  # greedy moved
    assert_images_agree(warp_image(moving, field), theirs, moving.data.max())


def test_transform_items_parse_the_ants_inverse_syntax():
    assert TransformItem.parse("a.mat") == TransformItem(Path("a.mat"))
    assert TransformItem.parse("[a.mat,1]") == TransformItem(Path("a.mat"), inverse=True)
    assert TransformItem.parse("[ a.mat , 0 ]") == TransformItem(Path("a.mat"))
    with pytest.raises(VitregError, match="FILE"):
        TransformItem.parse("[a.mat,2]")


def test_bad_transform_lists_are_user_errors(tmp_path, pair):
    fixed = load_image(pair["fixed"])
    affine, shape = warp_grid(pair)
    warp = sitk_warp_file(tmp_path / "warp.nii.gz", affine, smooth_warp(affine, shape))
    matrix = tmp_path / "affine.txt"
    np.savetxt(matrix, affine_ras())
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a transform\n")
    with pytest.raises(VitregError, match="cannot be inverted"):
        field_from_transforms([f"[{warp},1]"], reference=fixed)
    with pytest.raises(VitregError, match="reference"):
        field_from_transforms([matrix, warp])
    with pytest.raises(VitregError, match="no such transform file"):
        field_from_transforms([tmp_path / "missing.mat"], reference=fixed)
    with pytest.raises(VitregError, match="notes.txt"):
        field_from_transforms([garbage], reference=fixed)
    with pytest.raises(VitregError, match="no transforms"):
        field_from_transforms([], reference=fixed)
    composite = tmp_path / "Composite.h5"
    composite.write_bytes(b"\x89HDF")
    with pytest.raises(VitregError, match="Composite.h5: ANTs composite"):
        field_from_transforms([composite], reference=fixed)


def test_affine_out_writes_an_lta_or_an_itk_file_by_its_suffix(tmp_path, pair):
    fixed, moving = load_image(pair["fixed"]), load_image(pair["moving"])
    lta = save_affine_out(tmp_path / "affine.lta", affine_ras(), fixed, moving)
    itk = save_affine_out(tmp_path / "affine.mat", affine_ras(), fixed, moving)
    np.testing.assert_allclose(load_lta(lta) @ affine_ras(), np.eye(4), atol=1e-9)
    transform = sitk.ReadTransform(str(itk))  # read back by SimpleITK: LPS fixed -> moving
    point_ras = np.array([10.0, -20.0, 30.0])
    moved_lps = transform.TransformPoint(tuple(RAS_TO_LPS @ point_ras))
    expected = affine_ras()[:3, :3] @ point_ras + affine_ras()[:3, 3]
    np.testing.assert_allclose(RAS_TO_LPS @ np.array(moved_lps), expected, atol=1e-6)
    with pytest.raises(VitregError, match="affine.nii.gz: an affine file must end in"):
        check_affine_out(tmp_path / "affine.nii.gz")
    with pytest.raises(VitregError, match="does not exist"):
        check_affine_out(tmp_path / "missing" / "affine.lta")


# ---------------------------------------------------------------------------------------
# The command line: register writes the files other tools read, warp reads their lists


def invoke(*args):
    from typer.testing import CliRunner

    from vitreg.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def registered_for_tools(tmp_path_factory, tiny_checkpoint):
    """`vitreg register` with --ants-prefix, --inverse-flow, --affine-out .lta and a
    FreeSurfer flow (.mgz), with a tiny checkpoint on a 2 mm frame (fast)."""
    folder = tmp_path_factory.mktemp("tools")
    fixed_affine = grid_affine(rotation(10, 2) @ np.diag([2.0, 2.0, 2.0]), FIXED_SHAPE, (1, 2, 0))
    moving_affine = grid_affine(np.diag([-1.8, -1.8, 1.8]), MOVING_SHAPE, (0, 0, 0))
    fixed_data = zero_frame(world_head(fixed_affine, FIXED_SHAPE))
    moving_data = zero_frame(world_head(moving_affine, MOVING_SHAPE, (3, -2, 1), wave_mm=2.0))
    write(folder / "fixed.nii.gz", fixed_data, fixed_affine)
    write(folder / "moving.nii.gz", moving_data, moving_affine)
    write(folder / "moving_seg.nii.gz", labels_of(moving_data), moving_affine)
    result = invoke(
        "register", folder / "fixed.nii.gz", folder / "moving.nii.gz",
        "-o", folder / "warped.nii.gz", "--flow", folder / "flow.mgz",
        "--flow-format", "freesurfer", "--weights", tiny_checkpoint,
        "--iterations", "10,5", "--levels", "2,1", "--ants-prefix", folder / "ants_",
        "--inverse-flow", folder / "inverse.mgz", "--affine-out", folder / "affine.lta",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    return folder, json.loads(result.stdout)


def test_register_writes_ants_prefix_files_that_ants_applies_as_the_warped_image(
    registered_for_tools,
):
    folder, summary = registered_for_tools
    for name in ("ants_0GenericAffine.mat", "ants_1Warp.nii.gz", "ants_1InverseWarp.nii.gz"):
        assert str(folder / name) in summary["outputs"].values()
    theirs = ants_apply(
        folder / "fixed.nii.gz", folder / "moving.nii.gz",
        [folder / "ants_1Warp.nii.gz", folder / "ants_0GenericAffine.mat"],
    )  # fmt: skip
    ours = nib.load(str(folder / "warped.nii.gz")).get_fdata()
    assert_images_agree(ours, theirs, np.abs(ours).max())


def test_register_writes_the_lta_and_the_freesurfer_flow_of_the_same_map(registered_for_tools):
    folder, summary = registered_for_tools
    affine = np.array(summary["affine_ras"])
    np.testing.assert_allclose(load_lta(folder / "affine.lta"), np.linalg.inv(affine), atol=1e-5)
    # The FreeSurfer flow (RAS mm on the fixed grid) is the ANTs warp then the affine.
    flow = nib.load(str(folder / "flow.mgz"))
    disp_ras = np.asarray(flow.dataobj).transpose(3, 0, 1, 2)
    fixed = nib.load(str(folder / "fixed.nii.gz"))
    np.testing.assert_allclose(flow.affine, fixed.affine, atol=1e-4)
    index = np.indices(fixed.shape).reshape(3, -1)
    world = fixed.affine[:3, :3] @ index + fixed.affine[:3, 3:4]
    warp_lps = np.asarray(nib.load(str(folder / "ants_1Warp.nii.gz")).dataobj)[:, :, :, 0, :]
    dense = RAS_TO_LPS @ warp_lps.reshape(-1, 3).T  # (3, N) RAS mm
    whole = affine[:3, :3] @ (world + dense) + affine[:3, 3:4] - world
    np.testing.assert_allclose(disp_ras.reshape(3, -1), whole, atol=1e-3)


def test_warp_and_warp_labels_read_ants_lists_and_freesurfer_flows(registered_for_tools):
    folder, _ = registered_for_tools
    warped = nib.load(str(folder / "warped.nii.gz")).get_fdata()
    lists = ["-t", folder / "ants_1Warp.nii.gz", "-t", folder / "ants_0GenericAffine.mat"]
    runs = {
        "list": ["warp", folder / "moving.nii.gz", *lists, "-o", folder / "by_list.nii.gz"],
        "freesurfer": ["warp", folder / "moving.nii.gz", folder / "flow.mgz",
                       "--flow-format", "freesurfer", "-o", folder / "by_flow.nii.gz"],
    }  # fmt: skip
    for name, args in runs.items():
        result = invoke(*args)
        assert result.exit_code == 0, (name, result.output)
        again = nib.load(str(args[-1])).get_fdata()
        assert_images_agree(again, warped, np.abs(warped).max())
    result = invoke(
        "warp-labels", folder / "moving_seg.nii.gz", *lists, "--reference", folder / "fixed.nii.gz",
        "-o", folder / "seg_by_list.nii.gz", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    theirs = ants_apply(
        folder / "fixed.nii.gz", folder / "moving_seg.nii.gz",
        [folder / "ants_1Warp.nii.gz", folder / "ants_0GenericAffine.mat"], labels=True,
    )  # fmt: skip
    assert_labels_agree(np.asarray(nib.load(str(folder / "seg_by_list.nii.gz")).dataobj), theirs)


def test_jacobian_and_qc_read_a_freesurfer_flow(registered_for_tools):
    folder, _ = registered_for_tools
    result = invoke(
        "jacobian", folder / "flow.mgz", "--flow-format", "freesurfer",
        "-o", folder / "jacdet.nii.gz", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    jacdet = nib.load(str(folder / "jacdet.nii.gz")).get_fdata()
    # det J by numpy from the RAS displacement: J = I + (d disp / d index) M^-1.
    flow = nib.load(str(folder / "flow.mgz"))
    disp = np.asarray(flow.dataobj).transpose(3, 0, 1, 2)
    by_index = np.stack([np.stack(np.gradient(disp[i])) for i in range(3)])  # [i, j, ...]
    to_world = np.linalg.inv(flow.affine[:3, :3])
    jacobian = np.einsum("ij...,jk->...ik", by_index, to_world) + np.eye(3)
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(jacdet[inner], np.linalg.det(jacobian)[inner], atol=1e-3)
    result = invoke(
        "qc", folder / "fixed.nii.gz", folder / "moving.nii.gz", folder / "warped.nii.gz",
        "--flow", folder / "flow.mgz", "--flow-format", "freesurfer", "-o", folder / "qc.png",
    )  # fmt: skip
    assert result.exit_code == 0, result.output and (folder / "qc.png").is_file()
    wrong = invoke("jacobian", folder / "flow.mgz", "-o", folder / "j2.nii.gz")
    assert wrong.exit_code == 0  # read as voxels: the wrong numbers, as documented ...
    assert not np.allclose(nib.load(str(folder / "j2.nii.gz")).get_fdata(), jacdet, atol=1e-3)


@pytest.mark.parametrize(
    ("extra", "words"),
    [([], "neither was given"), (["flow.mgz", "-t", "ants_1Warp.nii.gz"], "not both")],
)
def test_warp_needs_a_flow_or_transforms_not_both(registered_for_tools, extra, words):
    folder, _ = registered_for_tools
    args = [folder / word if word.endswith(("mgz", "gz")) else word for word in extra]
    result = invoke("warp", folder / "moving.nii.gz", *args, "-o", folder / "x.nii.gz")
    assert result.exit_code == 2 and words in result.output, result.output
    assert "-t/--transform" in result.output and not (folder / "x.nii.gz").exists()
