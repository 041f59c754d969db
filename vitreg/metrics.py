"""Evaluation metrics on numpy arrays: per-label Dice, Jacobian determinant and folding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitreg.errors import VitregError

JACDET_LOG_CLIP = (1e-9, 1e9)
MAX_LABEL_FOR_BINCOUNT = 1 << 22


@dataclass(frozen=True)
class DiceResult:
    """Per-label Dice of two label maps; see ``dice_per_label`` for the rules."""

    scores: dict[int, float]
    missing_in_a: list[int]
    missing_in_b: list[int]
    mean: float


@dataclass(frozen=True)
class FoldingResult:
    """Folding statistics of a Jacobian-determinant map; see ``folding``."""

    count_nonpositive: int
    percent_nonpositive: float
    sdlogj: float


def as_numpy(array: Any) -> np.ndarray:
    """Return ``array`` as a numpy array; torch tensors are detached and moved to the CPU."""
    if hasattr(array, "detach"):
        return np.asarray(array.detach().cpu())
    return np.asarray(array)


def as_label_map(array: Any, name: str) -> np.ndarray:
    """Return an integer label map of any shape; float input must hold whole numbers only."""
    labels = as_numpy(array)
    if labels.dtype == bool or np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64, copy=False)
    if np.issubdtype(labels.dtype, np.floating):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise VitregError(f"label map {name} must hold whole numbers, got non-integer values")
        return rounded.astype(np.int64)
    raise VitregError(f"label map {name} must be an integer array, got dtype {labels.dtype}")


def label_counts(
    a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Voxel counts per label of flat int64 maps: (labels, count_a, count_b, count_both)."""
    lowest = min(int(a.min()), int(b.min()))
    highest = max(int(a.max()), int(b.max()))
    same = a == b
    if lowest >= 0 and highest <= MAX_LABEL_FOR_BINCOUNT:
        size = highest + 1
        values = np.arange(size)
        codes_a, codes_b, codes_both = a, b, a[same]
    else:
        values, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
        size = values.size
        codes_a, codes_b = inverse[: a.size], inverse[a.size :]
        codes_both = codes_a[same]
    count_a = np.bincount(codes_a, minlength=size)
    count_b = np.bincount(codes_b, minlength=size)
    count_both = np.bincount(codes_both, minlength=size)
    return values, count_a, count_b, count_both


def counts_for_labels(
    labels: Sequence[int],
    values: np.ndarray,
    count_a: np.ndarray,
    count_b: np.ndarray,
    count_both: np.ndarray,
) -> tuple[list[int], list[int], list[int]]:
    """Counts (a, b, both) per label, looked up in sorted ``values``; unknown labels count 0."""
    wanted = np.asarray(labels, dtype=np.int64)
    position = np.minimum(np.searchsorted(values, wanted), values.size - 1)
    found = values[position] == wanted
    return tuple(
        np.where(found, counts[position], 0).tolist() for counts in (count_a, count_b, count_both)
    )


def dice_per_label(a: Any, b: Any, labels: Sequence[int] | None = None) -> DiceResult:
    """Dice 2|A∩B| / (|A| + |B|) per label of two same-shape integer label maps.

    ``labels`` defaults to the non-zero labels found in ``a`` or ``b``; 0 (background) is
    always excluded. A label present in only one map scores 0.0 and is listed in the
    ``missing_in_*`` list of the map that lacks it; a requested label absent from both maps
    gets no score and is listed in both missing lists. ``mean`` is the mean of ``scores``
    (so one-sided labels count as 0.0), and 0.0 when ``scores`` is empty; never NaN.
    """
    map_a = as_label_map(a, "a")
    map_b = as_label_map(b, "b")
    if map_a.shape != map_b.shape:
        raise VitregError(
            f"label maps must have the same shape, got a {map_a.shape} and b {map_b.shape}"
        )
    if map_a.size == 0:
        raise VitregError("label maps are empty")
    values, count_a, count_b, count_both = label_counts(map_a.ravel(), map_b.ravel())
    if labels is None:
        present = (count_a > 0) | (count_b > 0)
        wanted = [int(value) for value in values[present]]
    else:
        wanted = [int(label) for label in labels]
    wanted = sorted(set(wanted) - {0})

    n_a, n_b, n_both = counts_for_labels(wanted, values, count_a, count_b, count_both)
    scores: dict[int, float] = {}
    for label, in_a, in_b, in_both in zip(wanted, n_a, n_b, n_both, strict=True):
        if in_a + in_b > 0:
            scores[label] = float(2.0 * in_both / (in_a + in_b))
    missing_in_a = [label for label, count in zip(wanted, n_a, strict=True) if count == 0]
    missing_in_b = [label for label, count in zip(wanted, n_b, strict=True) if count == 0]
    mean = float(np.mean(list(scores.values()))) if scores else 0.0
    return DiceResult(
        scores=scores, missing_in_a=missing_in_a, missing_in_b=missing_in_b, mean=mean
    )


def as_single_flow(flow_vox: Any) -> np.ndarray:
    """Return a (3, D, H, W) float flow from (3, D, H, W) or (1, 3, D, H, W) input."""
    flow = as_numpy(flow_vox)
    if flow.ndim == 5 and flow.shape[0] == 1:
        flow = flow[0]
    if flow.ndim != 4 or flow.shape[0] != 3:
        raise VitregError(
            f"flow_vox must have shape (3, D, H, W) or (1, 3, D, H, W), got {flow.shape}"
        )
    if min(flow.shape[1:]) < 2:
        raise VitregError(
            f"flow_vox needs at least 2 voxels along each spatial axis, got {flow.shape}"
        )
    if not np.issubdtype(flow.dtype, np.floating):
        flow = flow.astype(np.float64)
    return flow


def jacobian_determinant(flow_vox: Any) -> np.ndarray:
    """Determinant of the Jacobian of x + u(x) for a voxel flow (3, D, H, W) -> (D, H, W).

    Channel i is the displacement along array axis i (a leading batch axis of size 1 is
    allowed). Derivatives use np.gradient with unit spacing (second-order central differences
    inside, first-order one-sided at the borders), as VoxelMorph's ``jacobian_determinant``.
    """
    flow = as_single_flow(flow_vox)
    # jac[c][r] = d(x + u)_c / d axis_r; the identity grid contributes exactly 1 on the diagonal.
    jac = [list(np.gradient(flow[channel], axis=(0, 1, 2))) for channel in range(3)]
    for axis in range(3):
        jac[axis][axis] = jac[axis][axis] + 1
    return (
        jac[0][0] * (jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1])
        - jac[0][1] * (jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0])
        + jac[0][2] * (jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0])
    )


def folding(jacdet: Any, mask: Any | None = None) -> FoldingResult:
    """Folding statistics of a Jacobian-determinant map (D, H, W), over all voxels or a mask.

    ``count_nonpositive`` counts det <= 0, ``percent_nonpositive`` is 100 * count / voxels
    considered, ``sdlogj`` is std(log(clip(det, 1e-9, 1e9))). Learn2Reg 2021 added 3 to det
    before the log; we do not.
    """
    det = as_numpy(jacdet)
    if mask is not None:
        region = as_numpy(mask)
        if region.shape != det.shape:
            raise VitregError(f"mask must have the shape of jacdet {det.shape}, got {region.shape}")
        det = det[region.astype(bool)]
    det = det.ravel().astype(np.float64, copy=False)
    if det.size == 0:
        raise VitregError("folding needs at least one voxel; jacdet or mask is empty")
    count = int(np.count_nonzero(det <= 0))
    log_det = np.log(np.clip(det, *JACDET_LOG_CLIP))
    return FoldingResult(
        count_nonpositive=count,
        percent_nonpositive=100.0 * count / det.size,
        sdlogj=float(np.std(log_det)),
    )


def jacobian_folding(flow_vox: Any, mask: Any | None = None) -> tuple[np.ndarray, FoldingResult]:
    """det J of x + u for a voxel flow (3, D, H, W) -> (D, H, W), and its folding statistics
    over ``mask`` (D, H, W) bool (every voxel when None): the pair every report uses."""
    jacdet = jacobian_determinant(flow_vox)
    return jacdet, folding(jacdet, mask)


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two (X, Y, Z) images over ``mask`` voxels (0 if one is flat)."""
    first, second = a[mask].astype(np.float64), b[mask].astype(np.float64)
    first, second = first - first.mean(), second - second.mean()
    norm = math.sqrt(float((first**2).sum() * (second**2).sum()))
    return float((first * second).sum() / norm) if norm > 0 else 0.0
