"""The model frame: the fixed grid a network sees, and the maps into it and back."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from vitreg.errors import VitregError
from vitreg.image import Volume
from vitreg.transform import flow_vox_to_mm, identity_grid, sample, sample_labels


@dataclass(frozen=True)
class ModelFrame:
    """Where a network's input lives: orientation, spacing, grid shape and intensity scaling.

    ``orientation`` is nibabel axis codes of the array axes (e.g. 'LIA': axis 0 points Left,
    1 Inferior, 2 Anterior); ``spacing`` is mm per voxel along the array axes; ``shape`` is the
    grid (D, H, W) in voxels. Intensities: by default mapped linearly so that the
    ``percentiles`` (low, high) of the foreground go to 0 and 1, then clipped to [0, 1]; with
    ``intensity_divisor`` set, divided by it and clipped to [0, 1] instead (a fixed scale, as
    the authors' IXI data: FreeSurfer-normalised brains, white matter at 110, divided by 255).
    """

    orientation: str = "LIA"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] = (160, 192, 224)
    percentiles: tuple[float, float] = (0.5, 99.5)
    intensity_divisor: float | None = None

    def __post_init__(self) -> None:
        if self.intensity_divisor is not None and not self.intensity_divisor > 0:
            raise VitregError(
                f"frame intensity_divisor must be a positive number, got {self.intensity_divisor}"
            )
        pairs = [{"L", "R"}, {"A", "P"}, {"S", "I"}]
        if len(self.orientation) != 3 or any(
            sum(code in pair for code in self.orientation) != 1 for pair in pairs
        ):
            raise VitregError(
                f"frame orientation must name one of L/R, A/P and S/I each (e.g. 'LIA'), "
                f"got {self.orientation!r}"
            )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (``intensity_divisor`` only when set)."""
        values = {
            "orientation": self.orientation,
            "spacing": list(self.spacing),
            "shape": list(self.shape),
            "percentiles": list(self.percentiles),
        }
        if self.intensity_divisor is not None:
            values["intensity_divisor"] = self.intensity_divisor
        return values

    @classmethod
    def from_dict(cls, values: dict) -> ModelFrame:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                orientation=str(values["orientation"]),
                spacing=tuple(float(v) for v in values["spacing"]),
                shape=tuple(int(v) for v in values["shape"]),
                percentiles=tuple(float(v) for v in values.get("percentiles", (0.5, 99.5))),
                intensity_divisor=_optional_float(values.get("intensity_divisor")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise VitregError(f"malformed model frame {values!r}: {error}") from None


def _optional_float(value: object) -> float | None:
    return None if value is None else float(value)


def frame_affine(frame: ModelFrame, center_mm: np.ndarray) -> np.ndarray:
    """4x4 voxel-to-world (RAS+ mm) matrix of the frame grid, its centre at ``center_mm``."""
    ornt = nib.orientations.axcodes2ornt(tuple(frame.orientation))
    linear = np.zeros((3, 3))
    for array_axis, (world_axis, flip) in enumerate(ornt):
        linear[int(world_axis), array_axis] = flip * frame.spacing[array_axis]
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center_mm, dtype=np.float64) - linear @ (
        (np.asarray(frame.shape) - 1) / 2
    )
    return affine


def on_lattice(grid_affine: np.ndarray, lattice_affine: np.ndarray) -> np.ndarray:
    """``grid_affine`` (4x4 voxel -> RAS mm) shifted by less than a voxel so that its voxel
    centres fall on those of the grid ``lattice_affine``, when the two grids' axes agree up to
    order and sign with the same spacing; otherwise ``grid_affine`` unchanged.

    Then reading an image of that grid onto the frame copies voxels instead of blending
    neighbours (a linear read half-way between voxels blurs the image)."""
    to_lattice = np.linalg.inv(lattice_affine) @ grid_affine
    linear = to_lattice[:3, :3]
    if not np.allclose(linear, np.round(linear), atol=1e-4) or not np.allclose(
        np.abs(np.round(linear)).sum(axis=0), 1
    ):
        return grid_affine
    snapped = to_lattice.copy()
    snapped[:3, :3] = np.round(linear)
    snapped[:3, 3] = np.round(to_lattice[:3, 3])
    return lattice_affine @ snapped


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Voxels above 10% of the robust maximum (99th percentile of non-zero voxels): the head."""
    nonzero = data[data > 0]
    if nonzero.size == 0:
        return data != data.min()
    return data > 0.1 * np.percentile(nonzero, 99)


def foreground_center_mm(volume: Volume) -> np.ndarray:
    """World (RAS+ mm) centre of the foreground's bounding box."""
    indices = np.argwhere(foreground_mask(volume.data))
    center_vox = (indices.min(axis=0) + indices.max(axis=0)) / 2
    return nib.affines.apply_affine(volume.affine, center_vox)


def grid_coordinates(
    source_affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple[int, ...]
) -> torch.Tensor:
    """Voxel coordinates in the source grid of every target voxel: (1, 3, X, Y, Z) float32."""
    to_source = np.linalg.inv(source_affine) @ target_affine
    grid = identity_grid(target_shape, dtype=torch.float64)
    linear = torch.as_tensor(to_source[:3, :3])
    shift = torch.as_tensor(to_source[:3, 3]).view(1, 3, 1, 1, 1)
    return (torch.einsum("ij,bj...->bi...", linear, grid) + shift).float()


def resample(
    data: np.ndarray,
    source_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Trilinear resampling through world coordinates; zero outside. Returns (1, 1, X, Y, Z)."""
    source = torch.as_tensor(np.ascontiguousarray(data), dtype=torch.float32, device=device)
    coords = grid_coordinates(source_affine, target_affine, target_shape).to(device)
    return sample(source[None, None], coords)


def normalise(frame: ModelFrame, image: torch.Tensor) -> torch.Tensor:
    """Map the foreground's percentiles (low, high) to [0, 1], or divide by the frame's
    ``intensity_divisor``, and clip to [0, 1]; same shape out."""
    if frame.intensity_divisor is not None:
        return (image / frame.intensity_divisor).clamp(0, 1)
    foreground = image[image > 0]
    if foreground.numel() < 2:
        foreground = image.flatten()
    sample_values = foreground[:: max(1, foreground.numel() // 1_000_000)].float()
    low, high = torch.quantile(
        sample_values, torch.tensor(frame.percentiles, device=image.device) / 100
    )
    return ((image - low) / torch.clamp(high - low, min=1e-6)).clamp(0, 1)


@dataclass(frozen=True)
class FramedPair:
    """A fixed and a moving image mapped into one frame grid.

    ``fixed`` and ``moving`` are (1, 1, D, H, W) in [0, 1]; ``affine`` is the grid's
    voxel-to-world (RAS+ mm) matrix.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    affine: np.ndarray


def frame_pair(
    frame: ModelFrame, fixed: Volume, moving: Volume, device: torch.device | str = "cpu"
) -> FramedPair:
    """Reorient, resample, crop/pad (centred on the fixed head) and normalise both images.

    The images must already be roughly aligned in world space (as after FreeSurfer or an
    affine registration): both are read through world coordinates onto the same grid.
    """
    affine = on_lattice(frame_affine(frame, foreground_center_mm(fixed)), fixed.affine)
    framed = [frame_image(frame, volume, affine, device) for volume in (fixed, moving)]
    return FramedPair(fixed=framed[0], moving=framed[1], affine=affine)


def frame_image(
    frame: ModelFrame, volume: Volume, grid_affine: np.ndarray, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """An image resampled (trilinear) onto the frame grid ``grid_affine`` and normalised.

    Returns (1, 1, D, H, W) float32 in [0, 1], (D, H, W) = ``frame.shape``.
    """
    return normalise(frame, resample(volume.data, volume.affine, grid_affine, frame.shape, device))


def frame_labels(
    frame: ModelFrame, labels: Volume, grid_affine: np.ndarray, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A label map read onto the frame grid ``grid_affine`` by exact nearest neighbour.

    Returns (1, 1, D, H, W) int64 with the label values kept; 0 outside the source grid.
    """
    source = torch.as_tensor(np.ascontiguousarray(labels.data), device=device)[None, None]
    coords = grid_coordinates(labels.affine, grid_affine, frame.shape).to(device)
    return sample_labels(source.long(), coords)


def frame_mask(
    frame: ModelFrame, mask: Volume, grid_affine: np.ndarray, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A binary mask (nonzero inside) read onto the frame grid ``grid_affine``: trilinear
    interpolation of inside = 1, outside = 0, kept where it exceeds 0.5 (so a mask on a
    coarser grid gives smooth edges rather than blocks).

    Returns (1, 1, D, H, W) float32 of 0 and 1; 0 outside the source grid.
    """
    inside = (np.asarray(mask.data) > 0).astype(np.float32)
    share = resample(inside, mask.affine, grid_affine, frame.shape, device)
    return (share > 0.5).float()


def flow_to_native_mm(
    flow_vox: torch.Tensor, frame_grid_affine: np.ndarray, fixed: Volume
) -> torch.Tensor:
    """Frame-grid voxel flow (1, 3, D, H, W) -> world displacement on the fixed grid.

    Returns (1, 3, X, Y, Z) RAS+ mm: fixed point x maps to moving point x + d(x). Outside the
    frame grid the displacement is zero.
    """
    coords = grid_coordinates(frame_grid_affine, fixed.affine, fixed.shape).to(flow_vox.device)
    flow_on_fixed = sample(flow_vox, coords)
    return flow_vox_to_mm(flow_on_fixed, frame_grid_affine)
