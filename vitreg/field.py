"""Displacement fields on a world grid: ITK/voxel flow files and warping native images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from vitreg.device import choose_device
from vitreg.errors import OptionError, VitregError
from vitreg.frame import grid_coordinates
from vitreg.image import (
    Volume,
    check_writable,
    label_dtype,
    load_image,
    load_labels,
    load_raw,
    save,
)
from vitreg.transform import (
    flow_mm_to_vox,
    flow_vox_to_mm,
    identity_grid,
    ras_to_lps,
    sample,
    sample_labels,
    sample_labels_linear,
)

FLOW_FORMATS = ("itk", "voxel", "freesurfer")


@dataclass(frozen=True)
class DisplacementField:
    """A pull displacement on a grid: world point x maps to x + disp(x).

    ``disp_mm`` is (1, 3, X, Y, Z), RAS+ mm, on ``grid`` (whose affine, shape and header the
    field carries; its ``data`` is unused).
    """

    disp_mm: torch.Tensor
    grid: Volume

    def to_voxels(self) -> torch.Tensor:
        """Displacement in voxels of the grid, (1, 3, X, Y, Z), channel i along array axis i."""
        return flow_mm_to_vox(self.disp_mm, self.grid.affine)


def save_flow(path: str | Path, field: DisplacementField, flow_format: str = "itk") -> Path:
    """Write the field atomically on its grid.

    'itk': ITK/ANTs displacement field, 5D (X, Y, Z, 1, 3), vector intent, mm in LPS,
    fixed-to-moving (what antsApplyTransforms and SimpleITK's DisplacementFieldTransform read).
    'voxel': (X, Y, Z, 3) displacements in voxels of the grid, channel i along array axis i.
    'freesurfer': (X, Y, Z, 3) displacements in RAS mm, no intent, as FreeSurfer's
    mri_synthmorph writes its deformable transforms: the grid is the fixed image's, and fixed
    voxel centre x (RAS mm) maps to moving point x + d(x) (FreeSurfer's "disp_ras").
    """
    if flow_format == "itk":
        disp_lps = ras_to_lps(field.disp_mm)[0].permute(1, 2, 3, 0).unsqueeze(3)
        data = disp_lps.detach().cpu().numpy().astype(np.float32)
        return save(path, data, field.grid, intent="vector")
    if flow_format == "voxel":
        data = field.to_voxels()[0].permute(1, 2, 3, 0).detach().cpu().numpy()
        return save(path, data.astype(np.float32), field.grid, intent="vector")
    if flow_format == "freesurfer":
        data = field.disp_mm[0].permute(1, 2, 3, 0).detach().cpu().numpy()
        return save(path, data.astype(np.float32), field.grid, intent="none")
    raise OptionError("flow_format", flow_format, f"expected one of {', '.join(FLOW_FORMATS)}")


def check_flow_writable(path: str | Path, flow_format: str = "itk") -> Path:
    """Raise VitregError unless the flow can be written there in that format (before work)."""
    path = check_writable(path)
    if flow_format == "itk" and path.name.endswith((".mgz", ".mgh")):
        raise VitregError(f"{path}: an ITK flow is 5D, which MGZ cannot hold; use .nii.gz")
    return path


def load_flow(
    path: str | Path, flow_format: str = "auto", reference: Volume | str | Path | None = None
) -> DisplacementField:
    """Read a flow written by :func:`save_flow`, or by ANTs, SimpleITK, greedy or SynthMorph.

    ``flow_format``: 'auto' reads a 5D (X, Y, Z, 1, 3) file as 'itk' and a 4D (X, Y, Z, 3) one
    as 'voxel'; a FreeSurfer (RAS mm) flow is also 4D, so it must be named: 'freesurfer'.
    The grid keeps the file's header without its vector intent, so images saved on it are
    plain 3D images. ``reference``: an image (or its file) on the flow's grid, whose header
    the field then carries (after a grid check).
    """
    path = Path(path)
    if flow_format not in ("auto", *FLOW_FORMATS):
        raise OptionError(
            "flow_format", flow_format, f"expected auto or one of {', '.join(FLOW_FORMATS)}"
        )
    data, affine, header = load_raw(path)
    itk_shaped = data.ndim == 5 and data.shape[3] == 1 and data.shape[4] == 3
    four_d = data.ndim == 4 and data.shape[3] == 3
    requested = flow_format
    if flow_format == "auto":
        flow_format = "itk" if itk_shaped else "voxel"
    if flow_format == "itk" and itk_shaped:
        disp_lps = torch.from_numpy(np.ascontiguousarray(data[:, :, :, 0, :]))
        disp_mm = ras_to_lps(disp_lps.permute(3, 0, 1, 2).unsqueeze(0))
    elif flow_format in ("voxel", "freesurfer") and four_d:
        disp = torch.from_numpy(np.ascontiguousarray(data)).permute(3, 0, 1, 2).unsqueeze(0)
        disp_mm = flow_vox_to_mm(disp, affine) if flow_format == "voxel" else disp
    else:
        named = "" if requested == "auto" else f" in {flow_format} format"
        raise VitregError(
            f"{path}: shape {data.shape} is not a displacement field{named}; "
            "expected ITK (X, Y, Z, 1, 3), or voxel or freesurfer (X, Y, Z, 3)"
        )
    if not torch.isfinite(disp_mm).all():
        raise VitregError(f"{path}: the displacement field has NaN or Inf values")
    if isinstance(header, nib.Nifti1Header):
        header = header.copy()
        header.set_intent("none")
    grid = Volume(
        data=np.zeros(data.shape[:3], dtype=np.uint8), affine=affine, header=header, path=path
    )
    if reference is not None:
        reference = reference if isinstance(reference, Volume) else load_image(reference)
        check_same_grid(reference, grid)
        grid = reference
    return DisplacementField(disp_mm=disp_mm.float(), grid=grid)


def affine_displacement(grid: Volume, affine_ras: np.ndarray) -> torch.Tensor:
    """``A(x) - x`` at every voxel x of ``grid``: (1, 3, X, Y, Z) RAS mm, float32.

    ``affine_ras`` is a 4x4 map of world points (RAS+ mm), e.g. fixed -> moving.
    """
    index = identity_grid(grid.shape, dtype=torch.float64)
    world_from_index = torch.as_tensor(np.asarray(grid.affine, dtype=np.float64))
    moved = torch.as_tensor(np.asarray(affine_ras, dtype=np.float64) - np.eye(4)) @ (
        world_from_index
    )
    linear, shift = moved[:3, :3], moved[:3, 3].view(1, 3, 1, 1, 1)
    return (torch.einsum("ij,bj...->bi...", linear, index) + shift).float()


def with_affine(field: DisplacementField, affine_ras: np.ndarray) -> DisplacementField:
    """The field of ``x -> A(x + disp(x))``: the dense pull ``field`` then the affine ``A``.

    ``affine_ras`` (4x4, RAS mm) maps the field's target world to the moving world, so one
    resampling of the moving image with the result equals the two steps.
    """
    linear = torch.as_tensor(np.asarray(affine_ras)[:3, :3], dtype=field.disp_mm.dtype)
    dense = torch.einsum("ij,bj...->bi...", linear.to(field.disp_mm.device), field.disp_mm)
    disp = affine_displacement(field.grid, affine_ras).to(dense.device) + dense
    return DisplacementField(disp_mm=disp, grid=field.grid)


def check_same_grid(a: Volume, b: Volume) -> None:
    """Raise VitregError unless ``a`` and ``b`` have the same shape and affine (1e-3 mm)."""
    if a.shape != b.shape:
        raise VitregError(f"{b.path}: grid {b.shape} differs from {a.path}'s grid {a.shape}")
    if not np.allclose(a.affine, b.affine, atol=1e-3):
        raise VitregError(f"{b.path}: its affine differs from {a.path}'s (not the same grid)")


def source_coordinates(
    field: DisplacementField, source: Volume, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Voxel coordinates in ``source`` of x + disp(x) for every field voxel: (1, 3, X, Y, Z)."""
    disp_in_source = flow_mm_to_vox(field.disp_mm.to(device), source.affine)
    return grid_coordinates(source.affine, field.grid.affine, field.grid.shape).to(device) + (
        disp_in_source
    )


def warp_image(
    image: Volume, field: DisplacementField, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Trilinear pull-warp of a native image onto the field's grid: (X, Y, Z) float32."""
    coords = source_coordinates(field, image, device)
    source = torch.as_tensor(image.data, dtype=torch.float32, device=device)[None, None]
    return sample(source, coords)[0, 0].cpu().numpy()


def warp_labels_nearest(
    labels: Volume, field: DisplacementField, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Nearest-neighbour pull-warp of a label map onto the field's grid; keeps label values."""
    coords = source_coordinates(field, labels, device)
    source = torch.as_tensor(labels.data, device=device)[None, None]
    return sample_labels(source, coords)[0, 0].cpu().numpy()


def warp_labels_linear(
    labels: Volume, field: DisplacementField, device: torch.device | str = "cpu"
) -> np.ndarray:
    """One-hot trilinear warp then argmax onto the field's grid: (X, Y, Z), values kept.

    Background (0) competes like any label, and the part of a sample that falls outside the
    source counts as background; ties go to the background. Computed from the 8 voxels
    around each sample (:func:`vitreg.transform.sample_labels_linear`), so 2,000 labels
    cost what 2 do, in time and memory.
    """
    coords = source_coordinates(field, labels, device)
    source = torch.as_tensor(labels.data, device=device)
    return sample_labels_linear(source, coords).cpu().numpy()


def warp_image_file(
    image: str | Path,
    flow: str | Path | DisplacementField,
    output: str | Path,
    reference: str | Path | None = None,
    device: str = "auto",
    flow_format: str = "auto",
) -> Path:
    """``vitreg warp``: warp an image file (any grid) with a saved flow onto the flow's grid
    (trilinear), written as float32 with ``reference``'s header (an image on that grid).
    ``flow``: a flow file (read with ``flow_format``, see :func:`load_flow`) or a field."""
    torch_device = choose_device(device)
    check_writable(output)
    field = _field(flow, flow_format, reference)
    warped = warp_image(load_image(image), field, torch_device)
    return save(output, warped.astype("float32"), field.grid)


LABEL_METHODS = ("nearest", "linear")


def _field(
    flow: str | Path | DisplacementField, flow_format: str, reference: str | Path | None
) -> DisplacementField:
    """A flow file read (with ``reference``'s header after a grid check), or a field as is."""
    if isinstance(flow, DisplacementField):
        return flow
    return load_flow(flow, flow_format, reference=reference)


def warp_labels_file(
    labels: str | Path,
    flow: str | Path | DisplacementField,
    output: str | Path,
    method: str = "nearest",
    reference: str | Path | None = None,
    device: str = "auto",
    flow_format: str = "auto",
) -> Path:
    """``vitreg warp-labels``: warp a label map file with a saved flow (read with
    ``flow_format``) or a field, keeping its values and integer type; ``method`` 'nearest' or
    'linear' (one-hot trilinear, then argmax)."""
    if method not in LABEL_METHODS:
        raise OptionError("method", method, f"expected {' or '.join(LABEL_METHODS)}")
    torch_device = choose_device(device)
    check_writable(output)
    field = _field(flow, flow_format, reference)
    source = load_labels(labels)
    warp = warp_labels_linear if method == "linear" else warp_labels_nearest
    warped = warp(source, field, torch_device)
    return save(output, warped.astype(label_dtype(source)), field.grid)
