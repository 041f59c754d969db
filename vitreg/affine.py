"""Affine pre-alignment with SimpleITK: moments centring, then rigid and affine by Mattes MI.

Convention: an affine here is a 4x4 matrix ``affine_ras`` acting on world points in nibabel's
RAS+ mm that maps a FIXED world point x to the MOVING world point ``affine_ras @ x`` (a pull
map, like the dense fields). ITK works in LPS mm; the two meet only in :func:`to_sitk` and
:func:`from_sitk` (``lps = F @ ras`` with ``F = diag(-1, -1, 1)``), so a transform file written
here is the ITK fixed-to-moving transform that antsApplyTransforms and SimpleITK read.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from vitreg.errors import VitregError
from vitreg.files import atomic_path
from vitreg.image import Volume

# RAS <-> LPS: negate the first two world axes (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
AFFINE_SUFFIXES = (".mat", ".tfm", ".txt")
WORKING_SPACING_MM = 3.0  # the copies the affine is estimated on (a few seconds on 2 cores)
MIN_VOXELS = 32  # per axis of the working copies
MIN_OVERLAP = 0.01  # share of the smaller foreground covered by the other after centring
SCALE_RANGE = (0.5, 2.0)  # plausible singular values of the linear part (head to head)
MAX_ANISOTROPY = 1.6  # ratio of the largest to the smallest singular value (shear / stretch)
SEED = 7
# With more than one ITK thread the same pair gave affines up to 0.002 apart (matrix entries)
# from run to run, and the registration after them differed by 0.0015 Dice on a pair; a
# registration's own setting (SetNumberOfThreads) did not help. One thread for ITK while the
# affine is estimated makes it the same on every run and every machine (about 1 s more for a
# 1 mm brain on this project's 2-core machine).
AFFINE_THREADS = 1
# First step lengths (mm of the largest point shift, through the physical-shift scales). The
# affine's 12 parameters need the smaller one: at 2 mm its first step halved the scales of a
# 5 cm test head and never came back.
RIGID_STEP_MM, AFFINE_STEP_MM = 2.0, 0.5
WORSE_TOLERANCE = 0.02  # a final metric this much (relative) worse than the centring diverged


@dataclass(frozen=True)
class AffineResult:
    """The estimated pre-alignment.

    ``affine_ras``: 4x4, fixed world point (RAS mm) -> moving world point. ``metric_centred``
    and ``metric_final``: Mattes MI (lower is better) at the moments centring and at the end.
    ``failure``: why the estimate was refused (then ``affine_ras`` is the fallback), else None.
    """

    affine_ras: np.ndarray
    metric_centred: float
    metric_final: float
    failure: str | None = None
    stages: list[str] = field(default_factory=list)


def in_fixed_world(moving: Volume, affine_ras: np.ndarray) -> Volume:
    """``moving`` with its header moved so that its world is the fixed one.

    Reading the result at fixed world point x reads ``moving`` at ``affine_ras @ x``: the voxel
    to world matrix becomes inv(affine_ras) @ moving.affine. The data are shared, not copied.
    """
    affine = np.linalg.inv(np.asarray(affine_ras, dtype=np.float64)) @ moving.affine
    return Volume(data=moving.data, affine=affine, header=moving.header, path=moving.path)


def to_sitk_image(volume: Volume) -> sitk.Image:
    """A Volume (X, Y, Z) with its RAS affine -> a SimpleITK image in ITK's LPS world."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.data.transpose(2, 1, 0)))
    image = sitk.Cast(image, sitk.sitkFloat32)
    linear = RAS_TO_LPS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).flatten().tolist())
    image.SetOrigin((RAS_TO_LPS @ volume.affine[:3, 3]).tolist())
    return image


def to_sitk(affine_ras: np.ndarray) -> sitk.AffineTransform:
    """RAS fixed->moving 4x4 -> the same map as an ITK AffineTransform (LPS mm, centre 0)."""
    lps = np.eye(4)
    lps[:3, :3] = RAS_TO_LPS @ affine_ras[:3, :3] @ RAS_TO_LPS
    lps[:3, 3] = RAS_TO_LPS @ affine_ras[:3, 3]
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(lps[:3, :3].flatten().tolist())
    transform.SetTranslation(lps[:3, 3].tolist())
    return transform


def from_sitk(transform: sitk.Transform) -> np.ndarray:
    """Any linear ITK transform (LPS, fixed->moving, with its centre) -> RAS 4x4."""
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=np.float64)
    translation = np.asarray(transform.GetTranslation(), dtype=np.float64)
    # ITK: y = M (x - c) + c + t
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    ras = np.eye(4)
    ras[:3, :3] = RAS_TO_LPS @ lps[:3, :3] @ RAS_TO_LPS
    ras[:3, 3] = RAS_TO_LPS @ lps[:3, 3]
    return ras


def save_affine(path: str | Path, affine_ras: np.ndarray) -> Path:
    """Write the affine as an ITK transform file (.mat as ANTs writes, .tfm/.txt text)."""
    path = Path(path)
    check_affine_path(path)
    with atomic_path(path) as temporary:
        sitk.WriteTransform(to_sitk(affine_ras), str(temporary))
    return path


def load_affine(path: str | Path) -> np.ndarray:
    """Read an ITK affine transform file (e.g. ANTs' ``0GenericAffine.mat``) as RAS 4x4."""
    path = Path(path)
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise VitregError(f"{path}: not a readable ITK transform file ({first})") from None
    if transform.GetDimension() != 3 or len(transform.GetParameters()) != 12:
        raise VitregError(f"{path}: not a 3D affine transform ({transform.GetName()})")
    return from_sitk(sitk.AffineTransform(transform))


def check_affine_path(path: Path) -> None:
    """Raise VitregError unless ``path`` ends in .mat/.tfm/.txt in a writable folder."""
    if not path.name.endswith(AFFINE_SUFFIXES):
        raise VitregError(f"{path}: an affine file must end in {', '.join(AFFINE_SUFFIXES)}")
    if not path.parent.is_dir():
        raise VitregError(f"{path}: output directory {path.parent} does not exist")


def _working_copy(image: sitk.Image) -> sitk.Image:
    """Block-average to about WORKING_SPACING_MM per voxel, keeping >= MIN_VOXELS per axis."""
    factors = [
        max(1, min(int(round(WORKING_SPACING_MM / spacing)), size // MIN_VOXELS))
        for spacing, size in zip(image.GetSpacing(), image.GetSize(), strict=True)
    ]
    return sitk.BinShrink(image, factors) if max(factors) > 1 else image


def _pyramid(image: sitk.Image, shrink: list[int]) -> tuple[list[int], list[float]]:
    """The shrink factors that keep >= MIN_VOXELS / 2 per axis, and smoothing sigmas (mm)."""
    spacing = max(image.GetSpacing())
    kept = [f for f in shrink if f == 1 or min(image.GetSize()) // f >= MIN_VOXELS // 2]
    return kept, [spacing * (f - 1) / 2 for f in kept]


def _foreground(image: sitk.Image) -> sitk.Image:
    """Voxels above 10% of the 99th percentile of the non-zero ones (the head), as uint8."""
    values = sitk.GetArrayViewFromImage(image)
    nonzero = values[values > 0]
    threshold = 0.1 * np.percentile(nonzero, 99) if nonzero.size else values.min()
    return sitk.Cast(image > float(threshold), sitk.sitkUInt8)


def overlap_after(fixed_mask: sitk.Image, moving_mask: sitk.Image, transform) -> float:
    """Share of the smaller foreground that the other covers once ``transform`` maps them."""
    pulled = sitk.Resample(moving_mask, fixed_mask, transform, sitk.sitkNearestNeighbor, 0)
    fixed_view = sitk.GetArrayViewFromImage(fixed_mask) > 0
    pulled_view = sitk.GetArrayViewFromImage(pulled) > 0
    spacing_ratio = np.prod(moving_mask.GetSpacing()) / np.prod(fixed_mask.GetSpacing())
    moving_size = float((sitk.GetArrayViewFromImage(moving_mask) > 0).sum()) * spacing_ratio
    smaller = max(min(float(fixed_view.sum()), moving_size), 1.0)
    return float((fixed_view & pulled_view).sum()) / smaller


def _method(iterations: int, image: sitk.Image, shrink: list[int], step_mm: float):
    """A Mattes MI registration whose first step moves points by about ``step_mm``."""
    shrink, sigmas = _pyramid(image, shrink)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(0.25, seed=SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step_mm,
        minStep=1e-3,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _set_metric_masks(
    method: sitk.ImageRegistrationMethod, fixed: sitk.Image | None, moving: sitk.Image | None
) -> None:
    """Let the metric sample only points inside the masks given (ITK's metric masks)."""
    if fixed is not None:
        method.SetMetricFixedMask(fixed)
    if moving is not None:
        method.SetMetricMovingMask(moving)


def _implausible(affine_ras: np.ndarray) -> str | None:
    """Why a fixed->moving head-to-head affine is not believable, or None."""
    if not np.isfinite(affine_ras).all():
        return "the transform has NaN or Inf values"
    singular = np.linalg.svd(affine_ras[:3, :3], compute_uv=False)
    if np.linalg.det(affine_ras[:3, :3]) <= 0:
        return "the transform flips the image (negative determinant)"
    if singular.min() < SCALE_RANGE[0] or singular.max() > SCALE_RANGE[1]:
        return f"implausible scales {np.round(singular, 2).tolist()} (expected 0.5..2)"
    if singular.max() / singular.min() > MAX_ANISOTROPY:
        return f"implausible shear/stretch (scales {np.round(singular, 2).tolist()})"
    return None


def _metric_mask(mask: Volume | None, working: sitk.Image) -> sitk.Image | None:
    """A cost-function mask (nonzero inside, on its image's grid) on a working copy's grid,
    as uint8 (nearest neighbour), or None."""
    if mask is None:
        return None
    binary = Volume((mask.data > 0).astype(np.uint8), mask.affine, mask.header, mask.path)
    image = sitk.Cast(to_sitk_image(binary), sitk.sitkUInt8)
    return sitk.Resample(image, working, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def _masked(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    """``image`` with the voxels outside ``mask`` (same grid) set to 0; itself without one."""
    return image if mask is None else sitk.Mask(image, mask)


_itk_threads_lock = threading.Lock()
_itk_threads_users = 0  # blocks of itk_threads open now, in any thread
_itk_threads_before = 0  # the default when the first of them opened


@contextmanager
def itk_threads(count: int) -> Iterator[None]:
    """SimpleITK's default number of threads set to ``count`` while the block is open.

    The setting is global to the process, so blocks that overlap in several threads (a
    Dask worker with more than one thread, a batch's loader thread) share it: the first to
    open sets it, the last to close restores what was there before. Overlapping blocks
    must ask for the same ``count``."""
    global _itk_threads_users, _itk_threads_before
    with _itk_threads_lock:
        if _itk_threads_users == 0:
            _itk_threads_before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
        elif sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() != count:
            raise RuntimeError(f"itk_threads({count}) inside a block of another count")
        _itk_threads_users += 1
    try:
        yield
    finally:
        with _itk_threads_lock:
            _itk_threads_users -= 1
            if _itk_threads_users == 0:
                sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(_itk_threads_before)


def estimate_affine(
    fixed: Volume,
    moving: Volume,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
) -> AffineResult:
    """Moments centring, then rigid (Euler3D) and affine registration by Mattes MI.

    Rigid runs at 1/4, 1/2 and 1, affine at 1/2 and 1 of ~3 mm copies (coarse levels are
    dropped for small images). A pair whose foregrounds do not overlap after centring raises
    VitregError. A result that is non-finite, clearly worse than the centring (2%) or
    implausible (scales outside 0.5..2, strong shear, a flip) comes back with ``failure`` set
    and the centring as ``affine_ras``; one no better than the centring keeps the centring.
    ``fixed_mask``/``moving_mask``: cost-function masks on each image's grid (nonzero
    inside): the centring and the overlap check see only the voxels inside them, and the
    metric only samples points inside both (ITK's metric masks). ITK runs on one thread
    here (``AFFINE_THREADS``), so the result is the same on every run.
    """
    with itk_threads(AFFINE_THREADS):
        return _estimate_affine(fixed, moving, fixed_mask, moving_mask)


def _estimate_affine(
    fixed: Volume,
    moving: Volume,
    fixed_mask: Volume | None,
    moving_mask: Volume | None,
) -> AffineResult:
    """:func:`estimate_affine` with ITK's threads as they are set."""
    names = f"{fixed.path}, {moving.path}"
    fixed_image = _working_copy(to_sitk_image(fixed))
    moving_image = _working_copy(to_sitk_image(moving))
    fixed_metric_mask = _metric_mask(fixed_mask, fixed_image)
    moving_metric_mask = _metric_mask(moving_mask, moving_image)
    fixed_inside = _masked(fixed_image, fixed_metric_mask)
    moving_inside = _masked(moving_image, moving_metric_mask)
    fixed_mask, moving_mask = _foreground(fixed_inside), _foreground(moving_inside)
    centring = sitk.CenteredTransformInitializer(
        fixed_inside,
        moving_inside,
        sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS,
    )
    overlap = overlap_after(fixed_mask, moving_mask, centring)
    if overlap < MIN_OVERLAP:
        raise VitregError(
            f"{names}: the heads do not overlap after centring ({100 * overlap:.1f}% of the "
            "smaller one); are these images of the same kind?"
        )
    stages = [f"centring by moments: overlap {100 * overlap:.0f}%"]
    rigid = _method(100, fixed_image, [4, 2, 1], RIGID_STEP_MM)
    _set_metric_masks(rigid, fixed_metric_mask, moving_metric_mask)
    euler = sitk.Euler3DTransform(centring)
    rigid.SetInitialTransform(euler, inPlace=True)
    metric_centred = rigid.MetricEvaluate(fixed_image, moving_image)
    failure = None
    try:
        rigid.Execute(fixed_image, moving_image)
        affine = sitk.AffineTransform(3)
        affine.SetCenter(euler.GetCenter())
        affine.SetMatrix(euler.GetMatrix())
        affine.SetTranslation(euler.GetTranslation())
        affine_method = _method(100, fixed_image, [2, 1], AFFINE_STEP_MM)
        _set_metric_masks(affine_method, fixed_metric_mask, moving_metric_mask)
        affine_method.SetInitialTransform(affine, inPlace=True)
        affine_method.Execute(fixed_image, moving_image)
        metric_final = affine_method.MetricEvaluate(fixed_image, moving_image)
        stages.append(f"rigid + affine Mattes MI: {metric_centred:.4f} -> {metric_final:.4f}")
    except RuntimeError as error:  # e.g. 'All samples map outside moving image buffer'
        reason = str(error).strip().splitlines()[-1]
        affine, metric_final, failure = centring, float("nan"), f"ITK stopped ({reason})"
    chosen = affine
    if failure is None:
        if not np.isfinite(metric_final) or (
            metric_final > metric_centred + WORSE_TOLERANCE * abs(metric_centred)
        ):
            failure = f"mutual information got worse ({metric_centred:.4f} -> {metric_final:.4f})"
        elif metric_final >= metric_centred:
            # Converged where it started, within the noise of sampling: the centring is best.
            chosen = centring
            stages.append("the centring was already the best; kept it")
        else:
            failure = _implausible(from_sitk(affine))
    if failure is not None:
        chosen = centring
    return AffineResult(
        affine_ras=from_sitk(chosen),
        metric_centred=float(metric_centred),
        metric_final=float(metric_final),
        failure=failure,
        stages=stages,
    )


def left_right_mirrored(volume: Volume) -> Volume:
    """``volume`` with its array reversed along the axis closest to the world's left-right
    axis, header kept: the image mirrored about its grid's mid-plane."""
    axis = int(np.argmax(np.abs(np.asarray(volume.affine)[0, :3])))
    data = np.flip(volume.data, axis).copy()
    return Volume(data=data, affine=volume.affine, header=volume.header, path=volume.path)


def mirror_advantage(
    fixed: Volume,
    moving: Volume,
    metric: float,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
) -> float | None:
    """How much better the left-right mirrored moving image fits the fixed one than the
    moving image itself, each after its own :func:`estimate_affine`: ``(metric -
    metric_mirrored) / |metric|`` with ``metric`` the moving image's final Mattes MI (lower
    is better), so positive when the mirrored image fits better (a flipped image, when the
    brain is asymmetric enough to tell; a symmetric template cannot tell). None when the
    mirrored estimate fails. An affine cannot flip (:func:`estimate_affine` refuses it), so
    a left-right swap goes unseen by the registration's own similarity."""
    if not np.isfinite(metric) or metric == 0:
        return None
    mirrored_mask = None if moving_mask is None else left_right_mirrored(moving_mask)
    try:
        mirrored = estimate_affine(fixed, left_right_mirrored(moving), fixed_mask, mirrored_mask)
    except VitregError:
        return None
    if mirrored.failure is not None or not np.isfinite(mirrored.metric_final):
        return None
    return float((metric - mirrored.metric_final) / abs(metric))
