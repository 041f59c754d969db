"""One pair, files to files: register and register-batch write and measure a pair alike."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.conftest import TINY_FRAME
from tests.volumes import grid_affine, rotation, world_head, write
from vitreg.batch import register_batch
from vitreg.errors import OptionError, VitregError
from vitreg.pairs import Pair, read_pairs
from vitreg.register import RegisterSettings
from vitreg.workflow import OutputPaths, register_pair

SHAPE = (26, 30, 24)
SETTINGS = RegisterSettings(optimize=4, levels=(2,))


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """One pair of bent heads on different grids, with two-label maps, as a pairs file."""
    folder = tmp_path_factory.mktemp("workflow")
    fixed_affine = grid_affine(rotation(10, 2) * 2.0, SHAPE)
    moving_affine = grid_affine(np.diag([-2.2, -2.2, 2.2]), SHAPE, (1, -1, 0))
    images = {
        "fixed": (world_head(fixed_affine, SHAPE), fixed_affine),
        "moving": (world_head(moving_affine, SHAPE, (2, -1, 1), wave_mm=2.0), moving_affine),
    }
    for role, (data, affine) in images.items():
        write(folder / f"{role}.nii.gz", data, affine)
        labels = np.where(data > 150, 2, 0) + np.where(data > 600, 39, 0)
        write(folder / f"{role}_labels.nii.gz", labels.astype(np.uint8), affine)
    (folder / "pairs.csv").write_text(
        "name,fixed,moving,fixed_labels,moving_labels\n"
        "p,fixed.nii.gz,moving.nii.gz,fixed_labels.nii.gz,moving_labels.nii.gz\n"
    )
    return folder / "pairs.csv"


def test_register_and_register_batch_write_and_measure_a_pair_alike(pairs_csv, tmp_path):
    (pair,) = read_pairs(pairs_csv)
    paths = OutputPaths.in_folder(tmp_path, "single", labels=True, qc=False)
    single = register_pair(pair, paths, None, TINY_FRAME, SETTINGS, device="cpu")
    batch = register_batch(
        pairs_csv, tmp_path / "batch", None, TINY_FRAME, settings=SETTINGS, device="cpu"
    )
    (record,) = batch.records
    for name in ("flow", "warped", "warped_labels"):
        ours = nib.load(str(tmp_path / "batch" / f"p_{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(ours, nib.load(str(paths.files()[name])).get_fdata(), atol=1e-4)
    summary = single.summary()
    for key in ("ncc_before", "ncc_after", "percent_nonpositive", "dice_before", "dice_after"):
        assert record[key] == summary[key], key
    assert summary["dice_after"] > summary["dice_before"]  # the pair is aligned better
    stored = json.loads(batch.summary_json.read_text())
    assert stored["settings"] == {"weights": "none", **SETTINGS.to_dict()}


def test_outputs_and_settings_are_checked_before_any_work(pairs_csv, tmp_path):
    (pair,) = read_pairs(pairs_csv)
    warped = tmp_path / "warped.nii.gz"
    cases = [
        (OutputPaths(warped, affine_out=tmp_path / "a.mat"), RegisterSettings(affine=False),
         OptionError, "affine_out"),
        (OutputPaths(warped, flow=tmp_path / "flow.mgz"), SETTINGS, VitregError, "5D"),
        (OutputPaths(warped, flow_format="ras"), SETTINGS, OptionError, "flow_format"),
        (OutputPaths(tmp_path / "no" / "w.nii.gz"), SETTINGS, VitregError, "does not exist"),
    ]  # fmt: skip
    for paths, settings, error, expected in cases:
        with pytest.raises(error, match=expected):
            register_pair(pair, paths, "none", settings=settings, device="cpu")
    no_labels = Pair(0, "x", pair.fixed, pair.moving)
    with pytest.raises(OptionError, match="warped_labels"):
        register_pair(no_labels, OutputPaths(warped, warped_labels=tmp_path / "l.nii.gz"), "none")
    with pytest.raises(OptionError, match="dice_weight=1.0: needs labels"):
        guided = RegisterSettings(optimizer="adam", optimize=2, dice_weight=1.0)
        register_pair(no_labels, OutputPaths(warped), "none", settings=guided)
    assert list(tmp_path.iterdir()) == []  # nothing was written
