"""examples/freesurfer_pipeline.sh on a tiny $SUBJECTS_DIR/<subject>/mri layout of MGZ files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.volumes import grid_affine, world_head

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "freesurfer_pipeline.sh"
SHAPE = (32, 32, 32)
# FreeSurfer's conformed orientation (LIA: x to the Left, y Inferior, z Anterior), 2 mm here.
LIA = np.array([[-2.0, 0, 0], [0, 0, 2.0], [0, -2.0, 0]])


def write_subject(subjects_dir: Path, name: str, centre_mm, shift_mm) -> None:
    """brain.mgz (uint8) and aseg.mgz (int32) of one synthetic subject."""
    mri = subjects_dir / name / "mri"
    mri.mkdir(parents=True)
    affine = grid_affine(LIA, SHAPE, centre_mm)
    head = world_head(affine, SHAPE, shift_mm)
    brain = np.clip(head * 255 / head.max(), 0, 255).astype(np.uint8)
    world_x = (affine[:3, :3] @ np.indices(SHAPE).reshape(3, -1) + affine[:3, 3:4])[0]
    left = (world_x - shift_mm[0] < 0).reshape(SHAPE)
    aseg = np.zeros(SHAPE, np.int32)
    aseg[brain > 30] = np.where(left, 3, 42)[brain > 30]  # cortex
    aseg[brain > 110] = np.where(left, 2, 41)[brain > 110]  # white matter
    aseg[brain > 190] = np.where(left, 4, 43)[brain > 190]  # lateral ventricles
    nib.save(nib.MGHImage(brain, affine), str(mri / "brain.mgz"))
    nib.save(nib.MGHImage(aseg, affine), str(mri / "aseg.mgz"))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_freesurfer_pipeline_script_runs_on_mgz_subjects(tmp_path, tiny_checkpoint):
    subjects = tmp_path / "subjects"
    write_subject(subjects, "bert", (1.0, -4.0, 6.0), (0.0, 0.0, 0.0))
    write_subject(subjects, "ernie", (-3.0, 2.0, 4.0), (2.0, -1.0, 1.5))
    out = tmp_path / "bert_from_ernie"
    env = {
        **os.environ,
        "SUBJECTS_DIR": str(subjects),
        "VITREG": f"{sys.executable} -m vitreg.cli",
        "VITREG_OPTS": f"--weights {tiny_checkpoint}",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        ["bash", str(SCRIPT), "bert", "ernie", str(out)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    fixed = nib.load(str(subjects / "bert" / "mri" / "brain.mgz"))
    for name in ("brain_warped.mgz", "aseg_warped.mgz"):
        image = nib.load(str(out / name))
        assert isinstance(image, nib.MGHImage) and image.shape == SHAPE
        np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-4)
    aseg = nib.load(str(out / "aseg_warped.mgz"))
    assert aseg.get_data_dtype() == np.dtype(">i4")
    assert set(np.unique(np.asarray(aseg.dataobj))) <= {0, 2, 3, 4, 41, 42, 43}
    with open(out / "dice.csv", newline="") as file:
        rows = {row["name"]: float(row["dice"]) for row in csv.DictReader(file)}
    assert {"Left-Cerebral-White-Matter", "Right-Cerebral-Cortex", "Left-Lateral-Ventricle"} <= set(
        rows
    )
    assert all(0 < dice <= 1 for dice in rows.values())
    report = json.loads((out / "register.json").read_text())
    assert 0 < report["dice_before"] <= 1 and 0 < report["dice_after"] <= 1
    assert (out / "qc.png").read_bytes()[:4] == b"\x89PNG"


def test_freesurfer_pipeline_script_needs_two_subjects(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "bert"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr
