"""How good a registration is: Jacobian determinant, folding, SDlogJ, Dice and end-point error.

The one place these are computed for a field on the fixed grid, whichever command or method
produced it (``register``, ``register-batch``, ``evaluate``, ``jacobian``, ``qc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitreg.field import DisplacementField, check_same_grid, load_flow, warp_labels_nearest
from vitreg.files import write_csv
from vitreg.frame import foreground_mask
from vitreg.image import Volume, check_writable, load_labels, save
from vitreg.labels import FREESURFER_ASEG, read_lut
from vitreg.metrics import DiceResult, FoldingResult, dice_per_label, jacobian_folding


@dataclass(frozen=True)
class Assessment:
    """What :func:`assess` measured.

    ``jacdet``: det J of x + u on the field's grid, (X, Y, Z) float32 (derivatives in voxels).
    ``folding``: its statistics over the ``voxels`` voxels of the mask. ``dice_before`` and
    ``dice_after``: per-label Dice of the fixed labels with the moving labels brought onto
    the fixed grid through world coordinates only and through the field (nearest neighbour),
    None without labels. ``epe_mm``: mean end-point error against a true field over the
    mask, in mm, None without one.
    """

    jacdet: np.ndarray
    folding: FoldingResult
    voxels: int
    dice_before: DiceResult | None = None
    dice_after: DiceResult | None = None
    epe_mm: float | None = None

    def summary(self) -> dict:
        """Rounded numbers for reports: det J <= 0 (count, % of the mask), SDlogJ, and where
        measured the mean Dice before and after and the end-point error (mm)."""
        row = {
            "voxels": self.voxels,
            "count_nonpositive": self.folding.count_nonpositive,
            "percent_nonpositive": round(self.folding.percent_nonpositive, 6),
            "sdlogj": round(self.folding.sdlogj, 6),
        }
        if self.dice_before is not None and self.dice_after is not None:
            row["dice_before"] = round(self.dice_before.mean, 4)
            row["dice_after"] = round(self.dice_after.mean, 4)
        if self.epe_mm is not None:
            row["epe_mm"] = round(self.epe_mm, 4)
        return row


def assess(
    field: DisplacementField,
    fixed: Volume | None = None,
    labels: tuple[Volume, Volume] | None = None,
    mask: np.ndarray | None = None,
    true_field: DisplacementField | None = None,
    device: torch.device | str = "cpu",
) -> Assessment:
    """Measure a pull ``field`` on the fixed grid.

    ``fixed``: the fixed image on the field's grid; its head's foreground is the default
    ``mask`` ((X, Y, Z) bool; without either, every voxel counts). ``labels``: the (fixed,
    moving) label maps, the fixed one on the field's grid, for Dice. ``true_field``: the true
    pull field on the same grid, for the end-point error.
    """
    if fixed is not None:
        check_same_grid(fixed, field.grid)
        mask = foreground_mask(fixed.data) if mask is None else mask
    jacdet, folding = jacobian_folding(field.to_voxels()[0].numpy(), mask)
    dice_before = dice_after = None
    if labels is not None:
        dice_before, dice_after = dice_before_after(*labels, field, device)
    return Assessment(
        jacdet=jacdet.astype(np.float32),
        folding=folding,
        voxels=int(mask.sum()) if mask is not None else int(jacdet.size),
        dice_before=dice_before,
        dice_after=dice_after,
        epe_mm=end_point_error(field, true_field, mask) if true_field is not None else None,
    )


def dice_before_after(
    fixed_labels: Volume,
    moving_labels: Volume,
    field: DisplacementField,
    device: torch.device | str = "cpu",
) -> tuple[DiceResult, DiceResult]:
    """Dice of the fixed labels with the moving labels brought onto the fixed grid without the
    field (world alignment only) and with it (nearest neighbour, background outside)."""
    check_same_grid(field.grid, fixed_labels)
    identity = DisplacementField(disp_mm=torch.zeros_like(field.disp_mm), grid=field.grid)
    before, after = (
        dice_per_label(fixed_labels.data, warp_labels_nearest(moving_labels, pull, device))
        for pull in (identity, field)
    )
    return before, after


def end_point_error(
    estimate: DisplacementField, truth: DisplacementField, mask: np.ndarray | None = None
) -> float:
    """Mean length in mm of ``estimate - truth`` (both on one grid), over ``mask`` voxels.

    ``mask`` is (X, Y, Z) bool on the grid; None means every voxel.
    """
    check_same_grid(truth.grid, estimate.grid)
    error = (estimate.disp_mm.float() - truth.disp_mm.float())[0].norm(dim=0).numpy()
    return float(error[mask].mean() if mask is not None else error.mean())


def jacobian_file(
    flow: str | Path,
    output: str | Path,
    mask: str | Path | None = None,
    flow_format: str = "auto",
) -> dict:
    """``vitreg jacobian``: write det J of a saved flow on its grid (float32) and return its
    folding and SDlogJ, over the voxels of ``mask`` (a label map on the flow's grid) or all.
    ``flow_format``: how to read the flow (:func:`vitreg.field.load_flow`)."""
    check_writable(output)
    field = load_flow(flow, flow_format)
    region = None
    if mask is not None:
        mask_volume = load_labels(mask)
        check_same_grid(field.grid, mask_volume)
        region = mask_volume.data > 0
    assessment = assess(field, mask=region)
    save(output, assessment.jacdet, field.grid)
    return {"flow": str(flow), "jacdet": str(output), **assessment.summary()}


def dice_files(
    a: str | Path,
    b: str | Path,
    labels: Sequence[int] | None = None,
    lut: str | Path | None = None,
    csv_out: str | Path | None = None,
) -> dict:
    """``vitreg dice``: per-label Dice of two label maps on one grid, with the labels' names
    (``lut``, else FreeSurfer's) and the mean; ``labels`` defaults to every non-zero label.
    ``csv_out``: also write the rows (label, name, dice) there."""
    names = read_lut(lut) if lut is not None else FREESURFER_ASEG
    first, second = load_labels(a), load_labels(b)
    check_same_grid(first, second)
    result = dice_per_label(first.data, second.data, labels)
    rows = [
        {"label": label, "name": names.get(label, ""), "dice": round(score, 6)}
        for label, score in result.scores.items()
    ]
    if csv_out is not None:
        write_csv(csv_out, rows, ("label", "name", "dice"))
    return {
        "a": str(a),
        "b": str(b),
        "labels": rows,
        "mean": round(result.mean, 6),
        "missing_in_a": result.missing_in_a,
        "missing_in_b": result.missing_in_b,
    }
