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
