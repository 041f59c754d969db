"""Automatic QC flags: a few plain indicators of one registration, and a verdict.

Each registration gets :class:`Indicators` (image similarity before and after in the fixed
head, the Jacobian's folding and spread, the affine's scales, shear and handedness, how much
of each head the other misses) and a :class:`QcFlag`: 'ok', 'check' (look at it) or 'fail'
(almost surely wrong), with the reasons. The thresholds (:class:`Thresholds`) were chosen on
the benchmark's deformed sets and on deliberately broken pairs made from them (see
``THRESHOLDS``); a flag is a prompt to look at the QC figure, not a proof.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from vitreg.assess import Assessment
from vitreg.frame import foreground_mask
from vitreg.image import Volume
from vitreg.metrics import correlation
from vitreg.register import Registration
from vitreg.transform import sample

FLAGS = ("ok", "check", "fail")
MOVING_HEAD_STRIDE = 2  # every 2nd voxel per axis is enough for a fraction of the head


@dataclass(frozen=True)
class Indicators:
    """What a registration looks like in a few numbers.

    ``head_ncc_before``/``head_ncc_after``: mean squared local NCC (9^3 voxels, in [0, 1]) in
    the fixed head on the model frame, after the affine without and with the dense field.
    ``percent_nonpositive``: % of the fixed head's voxels with det J <= 0; ``jacobian_p1`` and
    ``jacobian_p99``: det J's 1st and 99th percentiles there. ``affine_scales`` (3, along the
    fixed grid's world axes R, A, S) and ``affine_shear`` (the largest of the 3 shears) of the
    affine's linear part, fixed world -> moving world, split as rotation x scales x unit upper
    triangular shear (a QR decomposition); ``affine_flip``: its determinant is negative;
    ``affine_fallback``: the affine estimate was refused and the centring used instead.
    ``mirror_advantage``: how much better (relative Mattes MI) the left-right mirrored moving
    image fits after its own affine (:func:`vitreg.affine.mirror_advantage`): a flipped
    image; None without the affine. ``head_correlation``: the (signed) Pearson correlation of
    the fixed and the warped image's intensities over the fixed head after registration:
    squared local NCC cannot tell an inverted or remapped contrast (another modality) from
    the same one, the sign and the strength of this correlation can.
    ``moving_outside_fov``: the fraction of the moving head whose points the affine takes
    outside the fixed image's field of view; ``fixed_uncovered``: the fraction of the fixed
    head whose points the affine takes outside the moving image or onto its background (a
    moving image cut short or zeroed). Both use the affine alone: the dense field can stretch
    what is left of a head over the missing part, which these measures should not forgive.
    """

    head_ncc_before: float
    head_ncc_after: float
    percent_nonpositive: float
    jacobian_p1: float
    jacobian_p99: float
    affine_scales: tuple[float, float, float]
    affine_shear: float
    affine_flip: bool
    affine_fallback: bool
    moving_outside_fov: float
    fixed_uncovered: float
    mirror_advantage: float | None = None
    head_correlation: float | None = None

    def to_dict(self) -> dict:
        """Rounded, JSON-able values by name."""
        values = dataclasses.asdict(self)
        for key, value in values.items():
            if isinstance(value, float):
                values[key] = round(value, 4)
        values["affine_scales"] = [round(float(v), 4) for v in self.affine_scales]
        return values


@dataclass(frozen=True)
class Thresholds:
    """Where an indicator turns a registration into 'check' or 'fail'.

    NCC: ``head_ncc_after`` below ``ncc_check``/``ncc_fail``, or fallen by more than
    ``ncc_drop`` from before. Folding: ``percent_nonpositive`` above ``folding_check`` /
    ``folding_fail``; Jacobian percentiles outside (``jacobian_p1_min``, ``jacobian_p99_max``).
    Affine: a scale outside ``scale_range`` or a shear above ``shear_max`` is 'check', a flip
    'fail', a refused estimate 'check'. Coverage: ``moving_outside_fov`` or
    ``fixed_uncovered`` above ``*_check``/``*_fail``. Handedness: ``mirror_advantage`` above
    ``mirror_check`` is 'check'. Contrast: ``head_correlation`` below ``correlation_check`` is
    'check'.
    """

    ncc_check: float = 0.4
    ncc_fail: float = 0.3
    ncc_drop: float = 0.02
    folding_check: float = 0.05
    folding_fail: float = 1.0
    jacobian_p1_min: float = 0.1
    jacobian_p99_max: float = 3.0
    scale_range: tuple[float, float] = (0.6, 1.6)
    shear_max: float = 0.3
    outside_check: float = 0.2
    outside_fail: float = 0.5
    uncovered_check: float = 0.2
    uncovered_fail: float = 0.5
    mirror_check: float = 0.04
    correlation_check: float = 0.2


THRESHOLDS = Thresholds()


@dataclass(frozen=True)
class QcFlag:
    """The verdict: ``flag`` ('ok', 'check' or 'fail') and the ``reasons``, worst first."""

    flag: str
    reasons: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"qc_flag": self.flag, "qc_reasons": list(self.reasons)}


def affine_parts(affine_ras: np.ndarray) -> tuple[tuple[float, float, float], float, bool]:
    """The (scales, largest shear, flip) of a 4x4 affine's linear part ``L``.

    ``L = Q K`` with ``Q`` orthogonal and ``K`` upper triangular with a positive diagonal
    (QR): the scales are K's diagonal, the shears K's off-diagonal entries divided by the
    diagonal entry of their row, and ``L`` flips when its determinant is negative.
    """
    linear = np.asarray(affine_ras, dtype=np.float64)[:3, :3]
    _, upper = np.linalg.qr(linear)
    signs = np.where(np.diag(upper) < 0, -1.0, 1.0)
    upper = signs[:, None] * upper
    scales = np.diag(upper)
    shears = (upper / scales[:, None])[np.triu_indices(3, 1)]
    flip = bool(np.linalg.det(linear) < 0)
    return tuple(float(s) for s in scales), float(np.abs(shears).max()), flip


def _head_points(volume: Volume, head: np.ndarray | None = None) -> np.ndarray:
    """Voxel indices (N, 3) of every 2nd voxel per axis of the head of ``volume`` (its
    foreground, or ``head`` (X, Y, Z) bool when given)."""
    stride = (slice(None, None, MOVING_HEAD_STRIDE),) * 3
    head = foreground_mask(volume.data) if head is None else head
    kept = np.zeros(volume.shape, dtype=bool)
    kept[stride] = head[stride]
    return np.argwhere(kept).astype(np.float64)


def _map_points(index: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, 3) points through a 4x4 matrix."""
    return index @ matrix[:3, :3].T + matrix[:3, 3]


def moving_outside_fov(fixed: Volume, moving: Volume, affine_ras: np.ndarray) -> float:
    """The fraction of the moving head's voxels (every 2nd along each axis) that the inverse
    of ``affine_ras`` (fixed world -> moving world, 4x4 RAS mm) places outside the fixed grid
    (beyond half a voxel from its edge voxels)."""
    index = _head_points(moving)
    if index.size == 0:
        return 0.0
    to_fixed = np.linalg.inv(fixed.affine) @ np.linalg.inv(affine_ras) @ moving.affine
    points = _map_points(index, to_fixed)
    shape = np.asarray(fixed.shape, dtype=np.float64)
    return float(np.any((points < -0.5) | (points > shape - 0.5), axis=1).mean())


def fixed_uncovered(
    fixed: Volume, moving: Volume, affine_ras: np.ndarray, head: np.ndarray
) -> float:
    """The fraction of the fixed ``head`` ((X, Y, Z) bool on the fixed grid; every 2nd voxel
    along each axis) whose point ``affine_ras`` (fixed world -> moving world, 4x4 RAS mm)
    takes outside the moving grid or onto the moving image's background (trilinear value at
    or below its foreground threshold, :func:`vitreg.frame.foreground_mask`'s)."""
    index = _head_points(fixed, head)
    if index.size == 0:
        return 0.0
    to_moving = np.linalg.inv(moving.affine) @ np.asarray(affine_ras) @ fixed.affine
    points = torch.from_numpy(_map_points(index, to_moving).T.copy()).float()
    source = torch.as_tensor(moving.data, dtype=torch.float32)[None, None]
    values = sample(source, points.reshape(1, 3, -1, 1, 1)).flatten()
    return float((values <= _foreground_threshold(moving.data)).float().mean())


def _foreground_threshold(data: np.ndarray) -> float:
    """The intensity above which :func:`vitreg.frame.foreground_mask` counts a voxel."""
    nonzero = data[data > 0]
    return float(0.1 * np.percentile(nonzero, 99)) if nonzero.size else float(data.min())


def indicators(
    registration: Registration,
    assessment: Assessment,
    fixed: Volume,
    moving: Volume,
    head: np.ndarray,
) -> Indicators:
    """The :class:`Indicators` of a registration of ``moving`` to ``fixed``, with its
    ``assessment`` (det J on the fixed grid) and the fixed ``head`` ((X, Y, Z) bool on the
    fixed grid: where folding and the Jacobian's percentiles are counted)."""
    jacdet = assessment.jacdet[head] if head.any() else assessment.jacdet.ravel()
    p1, p99 = np.percentile(jacdet, [1, 99])
    scales, shear, flip = affine_parts(registration.affine_ras)
    fallback = any("affine pre-alignment" in warning for warning in registration.warnings)
    before, after = registration.head_ncc_before, registration.head_ncc_after
    return Indicators(
        head_ncc_before=registration.ncc_before if before is None else before,
        head_ncc_after=registration.ncc_after if after is None else after,
        percent_nonpositive=assessment.folding.percent_nonpositive,
        jacobian_p1=float(p1),
        jacobian_p99=float(p99),
        affine_scales=scales,
        affine_shear=shear,
        affine_flip=flip,
        affine_fallback=fallback,
        moving_outside_fov=moving_outside_fov(fixed, moving, registration.affine_ras),
        fixed_uncovered=fixed_uncovered(fixed, moving, registration.affine_ras, head),
        mirror_advantage=registration.mirror_advantage,
        head_correlation=head_correlation(fixed.data, registration.warped, head),
    )


def head_correlation(fixed: np.ndarray, warped: np.ndarray, head: np.ndarray) -> float:
    """:func:`vitreg.metrics.correlation` of ``fixed`` and ``warped`` ((X, Y, Z), the fixed
    grid) over ``head`` ((X, Y, Z) bool; all voxels when empty)."""
    return correlation(fixed, warped, head if head.any() else np.ones(fixed.shape, dtype=bool))


def qc_flag(values: Indicators, thresholds: Thresholds = THRESHOLDS) -> QcFlag:
    """The verdict on ``values``: 'fail' when any fail rule holds, else 'check' when any
    check rule holds, else 'ok'; the reasons name each indicator and its value."""
    t = thresholds
    fail, check = [], []
    ncc = values.head_ncc_after
    if ncc < t.ncc_fail:
        fail.append(f"NCC in the head {ncc:.3f} < {t.ncc_fail}")
    elif ncc < t.ncc_check:
        check.append(f"NCC in the head {ncc:.3f} < {t.ncc_check}")
    if ncc < values.head_ncc_before - t.ncc_drop:
        check.append(f"NCC fell from {values.head_ncc_before:.3f} to {ncc:.3f}")
    folding = values.percent_nonpositive
    if folding > t.folding_fail:
        fail.append(f"{folding:.3f}% of the head folds (det J <= 0) > {t.folding_fail}%")
    elif folding > t.folding_check:
        check.append(f"{folding:.3f}% of the head folds (det J <= 0) > {t.folding_check}%")
    if values.jacobian_p1 < t.jacobian_p1_min or values.jacobian_p99 > t.jacobian_p99_max:
        check.append(
            f"det J 1st-99th percentiles {values.jacobian_p1:.2f}-{values.jacobian_p99:.2f} "
            f"beyond {t.jacobian_p1_min}-{t.jacobian_p99_max}"
        )
    if values.affine_flip:
        fail.append("the affine flips the image (negative determinant)")
    low, high = t.scale_range
    if any(not low <= scale <= high for scale in values.affine_scales):
        scales = ", ".join(f"{scale:.2f}" for scale in values.affine_scales)
        check.append(f"affine scales {scales} beyond {low}-{high}")
    if values.affine_shear > t.shear_max:
        check.append(f"affine shear {values.affine_shear:.2f} > {t.shear_max}")
    if values.affine_fallback:
        check.append("the affine estimate was refused (centring only)")
    mirror = values.mirror_advantage
    if mirror is not None and mirror > t.mirror_check:
        check.append(
            f"the left-right mirrored moving image fits {100 * mirror:.1f}% better "
            f"(> {100 * t.mirror_check:.0f}%): flipped?"
        )
    correlation = values.head_correlation
    if correlation is not None and correlation < t.correlation_check:
        check.append(
            f"fixed and warped intensities correlate {correlation:.2f} in the head "
            f"(< {t.correlation_check}): another contrast or modality?"
        )
    for value, name, check_at, fail_at in (
        (values.moving_outside_fov, "of the moving head outside the fixed field of view",
         t.outside_check, t.outside_fail),
        (values.fixed_uncovered, "of the fixed head not covered by the moving image",
         t.uncovered_check, t.uncovered_fail),
    ):  # fmt: skip
        if value > fail_at:
            fail.append(f"{100 * value:.0f}% {name} > {100 * fail_at:.0f}%")
        elif value > check_at:
            check.append(f"{100 * value:.0f}% {name} > {100 * check_at:.0f}%")
    flag = "fail" if fail else "check" if check else "ok"
    return QcFlag(flag, tuple(fail + check))
