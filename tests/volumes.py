"""Synthetic heads on arbitrary world grids, written as real NIfTI files for the tests."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def rotation(angle_deg: float, axis: int) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    m = np.eye(3)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def grid_affine(linear: np.ndarray, shape, center_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 affine with ``linear`` and the grid's centre voxel at ``center_mm``."""
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.asarray(center_mm) - linear @ ((np.asarray(shape) - 1) / 2)
    return affine


def blob_image(shape, seed=0) -> np.ndarray:
    """Smooth textured ellipsoid (X, Y, Z) float32, zero outside."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    index = np.indices(shape).astype(float)
    center = (np.asarray(shape) - 1) / 2
    radius = np.sqrt(sum(((index[i] - center[i]) / (0.4 * shape[i])) ** 2 for i in range(3)))
    image = np.where(radius < 1, 200 + 1000 * (texture - texture.min()) / np.ptp(texture), 0)
    return image.astype(np.float32)


def write(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def world_head(affine: np.ndarray, shape, shift_mm=(0.0, 0.0, 0.0), wave_mm=0.0) -> np.ndarray:
    """A smooth textured ellipsoid defined in world mm, sampled on any grid: (X, Y, Z) float32.

    The content is shifted by ``shift_mm`` (content at world x moves to x + shift), so two grids
    in any orientations see the same object, or the same object moved; ``wave_mm`` also bends
    it by a smooth non-linear displacement of that amplitude (sines of about 55 mm period, no
    folding below 8 mm).
    """
    index = np.indices(shape).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ index + affine[:3, 3:4] - np.asarray(shift_mm, float)[:, None]
    x, y, z = world
    world = world - wave_mm * np.stack([np.sin(y / 9.0), np.sin(z / 8.0), np.sin(x / 10.0)])
    x, y, z = world
    radius = np.sqrt((x / 24) ** 2 + (y / 28) ** 2 + (z / 22) ** 2)
    texture = 2 + np.sin(x / 4.0) * np.cos(y / 5.0) + np.sin(z / 3.5 + x / 7.0)
    inside = 1 / (1 + np.exp((radius - 1) * 20))  # soft edge, no aliasing at any spacing
    return (300 * texture * inside).reshape(shape).astype(np.float32)


def write_head_set(folder: Path, count: int, shape=(36, 40, 34), spacing=2.0) -> list[tuple]:
    """``count`` shifted heads with 3-class label maps as NIfTI: [(image, labels), ...]."""
    affine = grid_affine(np.diag([spacing] * 3), shape)
    paths = []
    for k in range(count):
        image = world_head(affine, shape, shift_mm=(2.0 * k - count, k - count / 2, 0.5 * k))
        labels = (image > 400).astype(np.int16) + (image > 700)
        paths.append(
            (
                write(folder / f"sub{k}.nii.gz", image, affine),
                write(folder / f"sub{k}_seg.nii.gz", labels, affine),
            )
        )
    return paths


def ball_and_shell(shape=(40, 40, 40)) -> tuple[np.ndarray, np.ndarray]:
    """A small solid ball and a hollow shell around the same centre, (X, Y, Z) float32 each.

    Centred on each other (as centre-of-mass initialisation puts them) they share no voxel.
    """
    index = np.indices(shape).astype(float)
    center = (np.asarray(shape) - 1) / 2
    radius = np.sqrt(sum((index[i] - center[i]) ** 2 for i in range(3)))
    ball = np.where(radius < 0.15 * shape[0], 1000.0, 0.0)
    shell = np.where((radius > 0.35 * shape[0]) & (radius < 0.45 * shape[0]), 1000.0, 0.0)
    return ball.astype(np.float32), shell.astype(np.float32)


def simpleitk_applies_flow(
    flow: Path, moving: Path, fixed: Path, nearest: bool = False
) -> np.ndarray:
    """MOVING resampled onto FIXED by SimpleITK with the ITK displacement field FLOW: (X, Y, Z).

    Trilinear, or nearest neighbour (for label maps) with ``nearest``.
    """
    import SimpleITK as sitk

    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(flow)), sitk.sitkVectorFloat64)
    )
    resampled = sitk.Resample(
        sitk.ReadImage(str(moving)),
        sitk.ReadImage(str(fixed)),
        transform,
        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)


def simpleitk_resamples(
    moving: Path, fixed: Path, affine_ras: np.ndarray | None = None
) -> np.ndarray:
    """MOVING resampled onto FIXED's grid by SimpleITK (trilinear, 0 outside): (X, Y, Z).

    ``affine_ras`` (4x4, RAS mm) maps a fixed world point x to the moving point it reads,
    ``A x``; None reads MOVING through world coordinates as the files lie.
    """
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    if affine_ras is not None:
        ras_to_lps = np.diag([-1.0, -1.0, 1.0])
        transform.SetMatrix((ras_to_lps @ affine_ras[:3, :3] @ ras_to_lps).ravel().tolist())
        transform.SetTranslation((ras_to_lps @ affine_ras[:3, 3]).tolist())
    resampled = sitk.Resample(
        sitk.ReadImage(str(moving)),
        sitk.ReadImage(str(fixed)),
        transform,
        sitk.sitkLinear,
        0.0,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)


def rotated_pair(folder: Path, shape=(40, 44, 38)):
    """A head and the same head on a grid rotated 8 deg and shifted, written to ``folder`` as
    fixed.nii.gz and moving.nii.gz: (fixed Volume, moving Volume, truth), where ``truth``
    (4x4, RAS mm) maps a fixed world point to the moving point with the same content."""
    from vitreg.image import load_image

    fixed_affine = grid_affine(np.diag([2.0, 2.0, 2.0]), shape)
    truth = np.eye(4)
    truth[:3, :3] = rotation(8, 2)
    truth[:3, 3] = [3.0, -2.0, 2.0]
    moving_affine = truth @ fixed_affine
    data = world_head(fixed_affine, shape)
    fixed = load_image(write(folder / "fixed.nii.gz", data, fixed_affine))
    moving = load_image(write(folder / "moving.nii.gz", data, moving_affine))
    return fixed, moving, truth


def head_pairs_csv(folder: Path, count: int, missing_row: int | None = None, shape=(24, 24, 24)):
    """``folder/pairs.csv`` of ``count`` pairs p0, p1, ... of small heads (2.5 mm voxels),
    each moving head shifted and bent a little differently; with ``missing_row`` (0-based)
    that pair's moving file does not exist. Returns the CSV's path."""
    import csv

    affine = grid_affine(np.diag([2.5] * 3), shape)
    fixed = write(folder / "fixed.nii.gz", world_head(affine, shape), affine)
    rows = []
    for k in range(count):
        shift = (1.5 * (k % 3) - 1.5, 1.0 - (k % 2), 0.5 * (k % 4))
        moving = write(
            folder / f"moving{k}.nii.gz", world_head(affine, shape, shift, wave_mm=2.0), affine
        )
        rows.append([f"p{k}", fixed.name, "absent.nii.gz" if k == missing_row else moving.name])
    with open(folder / "pairs.csv", "w", newline="") as file:
        csv.writer(file).writerows([["name", "fixed", "moving"], *rows])
    return folder / "pairs.csv"
