"""Other tools' transform files: ANTs prefixes and transform lists, greedy and SynthMorph
matrices, FreeSurfer LTAs.

Every transform here is a pull map, as in ANTs and ITK: it takes a point of the output
(fixed, reference) world to the input (moving) world. ANTs transform lists follow
antsApplyTransforms (checked against it through antspyx in tests/test_exchange.py): with
``-t T1 -t T2 ... -t Tn`` a reference point goes through the FIRST transform listed first,
x -> Tn(...T2(T1(x))). So antsRegistration's ``-t PREFIX1Warp.nii.gz -t
PREFIX0GenericAffine.mat`` maps x to A(x + w(x)): the warp ``w`` is the deformable part alone,
read on the fixed grid at x itself, and the affine comes after it. (Seen from the image, the
moving image is moved by the last transform first, which is how ANTs' help puts it.)
``[file,1]`` inverts a linear transform; ANTs cannot invert a displacement field on the fly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitreg.affine import AFFINE_SUFFIXES, check_affine_path, load_affine, save_affine
from vitreg.errors import OptionError, VitregError
from vitreg.field import (
    FLOW_FORMATS,
    LABEL_METHODS,
    DisplacementField,
    load_flow,
    save_flow,
    warp_image_file,
    warp_labels_file,
)
from vitreg.image import IMAGE_SUFFIXES, Volume, atomic_path, check_writable, load_image
from vitreg.register import Registration, invert
from vitreg.transform import identity_grid, sample

ANTS_AFFINE_SUFFIX = "0GenericAffine.mat"
ANTS_WARP_SUFFIX = "1Warp.nii.gz"
ANTS_INVERSE_WARP_SUFFIX = "1InverseWarp.nii.gz"


def world_points(grid: Volume) -> torch.Tensor:
    """World (RAS mm) position of every voxel centre of ``grid``: (1, 3, X, Y, Z) float64."""
    index = identity_grid(grid.shape, dtype=torch.float64)
    affine = torch.as_tensor(np.asarray(grid.affine, dtype=np.float64))
    return apply_affine_to_points(affine, index)


def apply_affine_to_points(affine: np.ndarray | torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``affine`` (4x4) applied to points (1, 3, X, Y, Z); the result has the points' dtype."""
    affine = torch.as_tensor(np.asarray(affine), dtype=points.dtype, device=points.device)
    linear, shift = affine[:3, :3], affine[:3, 3].view(1, 3, 1, 1, 1)
    return torch.einsum("ij,bj...->bi...", linear, points) + shift


# ----------------------------------------------------------------------------------------
# Writing: ANTs prefix files


@dataclass(frozen=True)
class AntsFiles:
    """The files antsRegistration writes under an output prefix (see :func:`ants_files`)."""

    affine: Path
    warp: Path
    inverse_warp: Path


def ants_files(prefix: str | Path) -> AntsFiles:
    """``PREFIX0GenericAffine.mat``, ``PREFIX1Warp.nii.gz`` and ``PREFIX1InverseWarp.nii.gz``.

    The prefix is glued to the names as ANTs does: ``out/sub01_`` gives
    ``out/sub01_1Warp.nii.gz``, and a folder ``out/`` gives ``out/1Warp.nii.gz``.
    """
    text = str(prefix)
    return AntsFiles(
        affine=Path(text + ANTS_AFFINE_SUFFIX),
        warp=Path(text + ANTS_WARP_SUFFIX),
        inverse_warp=Path(text + ANTS_INVERSE_WARP_SUFFIX),
    )


def check_ants_prefix(prefix: str | Path) -> AntsFiles:
    """The prefix's files, after checking that they can be written (before long work)."""
    files = ants_files(prefix)
    check_affine_path(files.affine)
    for path in (files.warp, files.inverse_warp):
        check_writable(path)
    return files


def dense_part(field: DisplacementField, affine_ras: np.ndarray) -> DisplacementField:
    """The deformable part ``w`` of a whole pull field ``x -> A(x + w(x))``, on its grid.

    ``field``: the whole map x -> x + d(x) (RAS mm, e.g. ``Registration.field``);
    ``affine_ras``: ``A``, 4x4 RAS fixed world -> moving world. Returns
    ``w(x) = A^-1(x + d(x)) - x``, (1, 3, X, Y, Z) RAS mm, exact (no resampling).
    """
    world = world_points(field.grid)
    moved = world + field.disp_mm.detach().cpu().double()
    back = apply_affine_to_points(np.linalg.inv(np.asarray(affine_ras, dtype=np.float64)), moved)
    return DisplacementField(disp_mm=(back - world).float(), grid=field.grid)


def inverse_dense_part(result: Registration) -> DisplacementField:
    """The inverse of the dense part alone, ``x + w(x) -> x``, on the fixed grid (RAS mm).

    This is ANTs' ``1InverseWarp``: with ``[PREFIX0GenericAffine.mat,1]`` listed before it,
    a moving point y goes to ``z + v(z)``, ``z = A^-1(y)``. It is :func:`vitreg.register.invert`
    of the registration without its affine, read on the fixed grid (same accuracy).
    """
    dense_only = dataclasses.replace(result, affine_ras=np.eye(4))
    return invert(dense_only, result.field.grid).field


def save_ants_transforms(
    prefix: str | Path, result: Registration, inverse: bool = False
) -> AntsFiles:
    """Write ``result`` as antsRegistration would: the affine and the deformable part.

    ``PREFIX0GenericAffine.mat`` is ``result.affine_ras`` (ITK, LPS); ``PREFIX1Warp.nii.gz``
    the deformable part alone on the fixed grid (ITK displacement field, LPS mm, see
    :func:`dense_part`), so ``antsApplyTransforms -r FIXED -i MOVING -t PREFIX1Warp.nii.gz
    -t PREFIX0GenericAffine.mat`` reproduces vitreg's warp. With ``inverse``,
    ``PREFIX1InverseWarp.nii.gz`` (:func:`inverse_dense_part`): ``-r MOVING -i FIXED
    -t [PREFIX0GenericAffine.mat,1] -t PREFIX1InverseWarp.nii.gz`` goes back. Returns the
    paths (``inverse_warp`` is named even when not written).
    """
    files = check_ants_prefix(prefix)
    save_affine(files.affine, result.affine_ras)
    save_flow(files.warp, dense_part(result.field, result.affine_ras), "itk")
    if inverse:
        save_flow(files.inverse_warp, inverse_dense_part(result), "itk")
    return files


# ----------------------------------------------------------------------------------------
# Writing and reading: FreeSurfer LTA


def volume_info_lines(volume: Volume) -> list[str]:
    """FreeSurfer's "volume info" block for a grid (the 8 lines of an LTA's src/dst block).

    ``voxelsize``: column norms of the affine (mm); ``xras``/``yras``/``zras``: the unit RAS
    direction of array axes 0, 1, 2; ``cras``: the RAS point of voxel ``shape / 2`` (FreeSurfer's
    centre, not the centre of the middle voxel for even sizes).
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    directions = affine[:3, :3] / spacing
    centre = affine[:3, :3] @ (np.asarray(volume.shape, dtype=np.float64) / 2) + affine[:3, 3]

    def numbers(values) -> str:
        return " ".join(f"{float(v):.15e}" for v in values)

    return [
        "valid = 1  # volume info valid",
        f"filename = {Path(volume.path).resolve()}",
        "volume = {} {} {}".format(*volume.shape),
        f"voxelsize = {numbers(spacing)}",
        f"xras   = {numbers(directions[:, 0])}",
        f"yras   = {numbers(directions[:, 1])}",
        f"zras   = {numbers(directions[:, 2])}",
        f"cras   = {numbers(centre)}",
    ]


def save_lta(path: str | Path, affine_ras: np.ndarray, fixed: Volume, moving: Volume) -> Path:
    """Write the affine as a FreeSurfer LTA (type 1, LINEAR_RAS_TO_RAS), atomically.

    ``affine_ras`` is vitreg's pull map (4x4, fixed RAS -> moving RAS). An LTA maps its src
    volume's RAS to its dst volume's RAS, and FreeSurfer's registration tools write the map
    from the moving image to the fixed one (``mri_robust_register --mov M --dst F``,
    ``mri_synthmorph``), so the file holds ``inv(affine_ras)`` with src = ``moving`` and dst
    = ``fixed``: ``mri_vol2vol --mov MOVING --targ FIXED --lta FILE`` then resamples MOVING
    onto FIXED as vitreg's affine does.
    """
    path = check_writable(path, (".lta",))
    matrix = np.linalg.inv(np.asarray(affine_ras, dtype=np.float64))
    lines = [
        f"# transform file {path.resolve()}",
        "# created by vitreg (moving RAS -> fixed RAS)",
        "type      = 1 # LINEAR_RAS_TO_RAS",
        "nxforms   = 1",
        "mean      = 0.0000 0.0000 0.0000",
        "sigma     = 1.0000",
        "1 4 4",
        *(" ".join(f"{value:.15e}" for value in row) for row in matrix),
        "src volume info",
        *volume_info_lines(moving),
        "dst volume info",
        *volume_info_lines(fixed),
    ]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    return path


def check_affine_out(path: str | Path) -> Path:
    """Raise VitregError unless the affine can be written there: an ITK file (.mat, .tfm,
    .txt) or a FreeSurfer LTA (.lta). Checked before long work."""
    path = Path(path)
    if path.name.endswith(".lta"):
        return check_writable(path, (".lta",))
    if not path.name.endswith(AFFINE_SUFFIXES):
        raise VitregError(
            f"{path}: an affine file must end in {', '.join((*AFFINE_SUFFIXES, '.lta'))}"
        )
    check_affine_path(path)
    return path


def save_affine_out(
    path: str | Path, affine_ras: np.ndarray, fixed: Volume, moving: Volume
) -> Path:
    """Write the fixed -> moving affine by the file's suffix: .lta as :func:`save_lta` (with
    both grids), .mat/.tfm/.txt as an ITK transform (:func:`vitreg.affine.save_affine`)."""
    path = check_affine_out(path)
    if path.name.endswith(".lta"):
        return save_lta(path, affine_ras, fixed, moving)
    return save_affine(path, affine_ras)


def load_lta(path: str | Path) -> np.ndarray:
    """Read a FreeSurfer LTA of type 1 (LINEAR_RAS_TO_RAS): its 4x4 src RAS -> dst RAS map."""
    path = Path(path)
    try:
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise VitregError(f"{path}: not a readable LTA file ({error})") from None
    lines = [line for line in lines if line]
    fields = {
        key.strip(): value.strip()
        for key, value in (line.split("=", 1) for line in lines[:4] if "=" in line)
    }
    kind = fields.get("type", "")
    if kind != "1":
        raise VitregError(
            f"{path}: LTA type {kind or '?'}; vitreg reads type 1 (LINEAR_RAS_TO_RAS) only "
            "(FreeSurfer's lta_convert converts others to RAS-to-RAS)"
        )
    try:
        start = lines.index("1 4 4") + 1
        matrix = np.array([line.split() for line in lines[start : start + 4]], dtype=np.float64)
    except ValueError:
        matrix = None
    if matrix is None or matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise VitregError(f"{path}: no 4x4 matrix after '1 4 4' in the LTA")
    return matrix


# ----------------------------------------------------------------------------------------
# Reading: ANTs / greedy / SynthMorph transform lists


@dataclass(frozen=True)
class TransformItem:
    """One entry of a transform list: a file, and whether to invert it (ANTs' ``[file,1]``)."""

    path: Path
    inverse: bool = False

    @classmethod
    def parse(cls, text: str | Path) -> TransformItem:
        """``file``, or ANTs' ``[file,1]`` (inverse) / ``[file,0]``."""
        text = str(text).strip()
        if not (text.startswith("[") and text.endswith("]")):
            return cls(Path(text))
        name, _, flag = text[1:-1].rpartition(",")
        if not name or flag.strip() not in ("0", "1"):
            raise VitregError(f"{text}: expected FILE or [FILE,1] (inverse) / [FILE,0]")
        return cls(Path(name.strip()), inverse=flag.strip() == "1")


def _text_matrix(path: Path) -> np.ndarray | None:
    """A plain-text 4x4 (or 3x4) RAS matrix as greedy and mri_synthmorph write, else None."""
    try:
        text = path.read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    rows = [line.split() for line in text.splitlines() if line.strip()]
    try:
        matrix = np.array(rows, dtype=np.float64)
    except ValueError:
        return None
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0, 0, 0, 1]):
        return None
    return matrix


def load_linear(item: TransformItem) -> np.ndarray:
    """A linear transform file as a 4x4 RAS pull map (reference world -> input world).

    ITK files (ANTs' binary ``.mat``, ``#Insight Transform File`` text) are fixed-to-moving
    in LPS; a plain 4x4 text matrix (greedy's ``.mat``, mri_synthmorph's linear ``.txt``) is
    fixed-to-moving in RAS; an LTA maps its src (moving) to its dst (fixed), so it is read
    inverted. ``item.inverse`` inverts the result.
    """
    path = item.path
    if not path.is_file():
        raise VitregError(f"{path}: no such transform file")
    if path.name.endswith(".h5"):
        raise VitregError(
            f"{path}: ANTs composite (.h5) transforms are not read; list the affine (.mat) and "
            "the warp (.nii.gz) instead (antsRegistration writes them when it is not told to "
            "write a composite transform)"
        )
    if path.name.endswith(".lta"):
        pull = np.linalg.inv(load_lta(path))
    else:
        pull = _text_matrix(path)
        if pull is None:
            pull = load_affine(path)
    if abs(np.linalg.det(pull[:3, :3])) < 1e-9:
        raise VitregError(f"{path}: the linear transform is singular")
    return np.linalg.inv(pull) if item.inverse else pull


def is_displacement_file(path: Path) -> bool:
    """Whether a transform file is an image (a displacement field), by its name."""
    return path.name.endswith(IMAGE_SUFFIXES)


def displacement_at(field: DisplacementField, points: torch.Tensor) -> torch.Tensor:
    """The field's displacement (RAS mm) at world points (1, 3, X, Y, Z), as ITK reads it.

    Trilinear between voxel centres, the border value within half a voxel outside them, and
    zero further out (ITK's DisplacementFieldTransform, which antsApplyTransforms uses).
    Returns (1, 3, X, Y, Z) in the points' dtype.
    """
    to_index = np.linalg.inv(np.asarray(field.grid.affine, dtype=np.float64))
    index = apply_affine_to_points(to_index, points)
    disp = field.disp_mm.to(points.dtype)
    values = sample(disp, index, padding="border")
    inside = torch.ones_like(index[:, 0], dtype=torch.bool)
    for axis, size in enumerate(field.grid.shape):
        inside &= (index[:, axis] >= -0.5) & (index[:, axis] < size - 0.5)
    return values * inside.unsqueeze(1)


def field_from_transforms(
    transforms: Sequence[str | Path | TransformItem],
    reference: Volume | None = None,
    flow_format: str = "auto",
) -> DisplacementField:
    """The whole pull map of an ANTs-style transform list on the reference grid.

    ``transforms``: files in antsApplyTransforms order (``[file,1]`` inverts a linear one):
    ITK/ANTs affines (.mat, .txt, .tfm), greedy / mri_synthmorph RAS matrices (plain 4x4
    text), FreeSurfer LTAs (type 1), and displacement fields (.nii.gz, .mgz; read by
    :func:`vitreg.field.load_flow` with ``flow_format``: ANTs', greedy's and vitreg's ITK
    files need nothing, FreeSurfer's RAS fields 'freesurfer'). A reference point x goes
    through the first one first (see the module docstring). ``reference``: the output grid
    (ANTs' ``-r``); without it, the grid of the first transform when that is a displacement
    field (antsRegistration's ``1Warp``), else a VitregError. Returns the field
    x -> x + d(x), (1, 3, X, Y, Z) RAS mm, that vitreg's warp functions apply.
    """
    if flow_format not in ("auto", *FLOW_FORMATS):
        raise OptionError(
            "flow_format", flow_format, f"expected auto or one of {', '.join(FLOW_FORMATS)}"
        )
    items = [t if isinstance(t, TransformItem) else TransformItem.parse(t) for t in transforms]
    if not items:
        raise VitregError("no transforms given")
    steps: list[np.ndarray | DisplacementField] = []
    for item in items:
        if is_displacement_file(item.path):
            if item.inverse:
                raise VitregError(
                    f"[{item.path},1]: a displacement field cannot be inverted on the fly "
                    "(ANTs cannot either); list its inverse (e.g. PREFIX1InverseWarp.nii.gz)"
                )
            steps.append(load_flow(item.path, flow_format))
        else:
            steps.append(load_linear(item))
    if reference is None:
        if not isinstance(steps[0], DisplacementField):
            raise VitregError(
                f"{items[0].path}: the list starts with a linear transform, so the output grid "
                "is not known; give a {reference} grid (e.g. the fixed image)"
            )
        reference = steps[0].grid
    # float32: 1e-5 mm at 200 mm from the origin, and half the memory of float64.
    start = world_points(reference).float()
    points = start
    for step in steps:
        if isinstance(step, DisplacementField):
            points = points + displacement_at(step, points)
        else:
            points = apply_affine_to_points(step, points)
    return DisplacementField(disp_mm=points - start, grid=reference)


# ----------------------------------------------------------------------------------------
# Applying a flow or a transform list to files (``vitreg warp`` and ``warp-labels``)


def field_to_apply(
    flow: str | Path | None = None,
    transforms: Sequence[str | Path] = (),
    reference: str | Path | None = None,
    flow_format: str = "auto",
) -> DisplacementField:
    """The pull field that ``vitreg warp`` applies: a flow file (vitreg's, ANTs', greedy's,
    SimpleITK's, SynthMorph's with ``flow_format`` 'freesurfer'; with ``reference``'s header
    after a grid check), or else an ANTs-style ``transforms`` list (see
    :func:`field_from_transforms`; ``reference`` is then the output grid). Exactly one of
    the two must be given."""
    if (flow is None) == (not transforms):
        raise VitregError(
            "give a flow file or {transforms} files (e.g. -t warp.nii.gz -t affine.mat): "
            + ("not both" if flow is not None else "neither was given")
        )
    if flow is not None:
        return load_flow(flow, flow_format, reference=reference)
    grid = load_image(reference) if reference is not None else None
    return field_from_transforms(transforms, grid, flow_format)


def warp_image_with(
    image: str | Path,
    output: str | Path,
    flow: str | Path | None = None,
    transforms: Sequence[str | Path] = (),
    reference: str | Path | None = None,
    flow_format: str = "auto",
    device: str = "auto",
) -> Path:
    """``vitreg warp``: an image file warped (trilinear) by a flow file or a transform list
    (:func:`field_to_apply`) onto its grid, written as float32."""
    check_writable(output)
    field = field_to_apply(flow, transforms, reference, flow_format)
    return warp_image_file(image, field, output, device=device)


def warp_labels_with(
    labels: str | Path,
    output: str | Path,
    flow: str | Path | None = None,
    transforms: Sequence[str | Path] = (),
    method: str = "nearest",
    reference: str | Path | None = None,
    flow_format: str = "auto",
    device: str = "auto",
) -> Path:
    """``vitreg warp-labels``: a label map warped by a flow file or a transform list
    (:func:`field_to_apply`), ``method`` 'nearest' or 'linear', values and type kept."""
    if method not in LABEL_METHODS:
        raise OptionError("method", method, f"expected {' or '.join(LABEL_METHODS)}")
    check_writable(output)
    field = field_to_apply(flow, transforms, reference, flow_format)
    return warp_labels_file(labels, field, output, method, device=device)
