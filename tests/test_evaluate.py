"""'vitreg evaluate' and its API: end-point error, pairs files, groups, every output written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.volumes import grid_affine, world_head, write
from vitreg.assess import end_point_error
from vitreg.cli import app
from vitreg.errors import VitregError
from vitreg.evaluate import PeakMemory, evaluate, group_dice
from vitreg.field import DisplacementField, load_flow, save_flow
from vitreg.frame import ModelFrame
from vitreg.image import load_image
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.pairs import check_pairs, read_pairs
from vitreg.weights import save_checkpoint

SHAPE = (30, 34, 28)
SHIFT_MM = (3.0, -4.0, 0.0)
FRAME = ModelFrame(orientation="RAS", spacing=(1.0, 1.0, 1.0), shape=(64, 64, 64))


def head_labels(image: np.ndarray) -> np.ndarray:
    labels = np.zeros(image.shape, np.int16)
    labels[image > 0.1 * image.max()] = 17  # Left-Hippocampus
    labels[image > 0.5 * image.max()] = 53  # Right-Hippocampus
    labels[(image > 0.1 * image.max()) & (np.indices(image.shape)[0] > 15)] = 2
    return labels


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """Two pairs: a head moved by a known shift (with its true flow), and a cross-grid pair."""
    folder = tmp_path_factory.mktemp("pairs")
    fixed_affine = grid_affine(np.diag([-2.0, 2.0, 2.0]), SHAPE)
    moving_affine = grid_affine(np.diag([2.2, 2.2, 2.2]), (28, 30, 26), (1, 0, -1))
    # fixed(x) = moving(x + shift): the content of the fixed image is moved by -shift.
    fixed = world_head(fixed_affine, SHAPE, shift_mm=[-s for s in SHIFT_MM])
    moving = world_head(moving_affine, (28, 30, 26))
    write(folder / "fixed.nii.gz", fixed, fixed_affine)
    write(folder / "moving.nii.gz", moving, moving_affine)
    write(folder / "fixed_labels.nii.gz", head_labels(fixed), fixed_affine)
    write(folder / "moving_labels.nii.gz", head_labels(moving), moving_affine)
    grid = load_image(folder / "fixed.nii.gz")
    shift = torch.tensor(SHIFT_MM).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE).contiguous()
    save_flow(folder / "true_flow.nii.gz", DisplacementField(disp_mm=shift, grid=grid))
    rows = [
        "set,name,fixed,moving,fixed_labels,moving_labels,true_flow",
        "shifted,shift,fixed.nii.gz,moving.nii.gz,fixed_labels.nii.gz,moving_labels.nii.gz,"
        "true_flow.nii.gz",
        "cross,cross,moving.nii.gz,fixed.nii.gz,moving_labels.nii.gz,fixed_labels.nii.gz,",
    ]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return folder / "pairs.csv"


def test_end_point_error_is_zero_for_the_true_flow_and_the_shift_length_for_none(pairs_csv):
    truth = load_flow(pairs_csv.parent / "true_flow.nii.gz")
    assert end_point_error(truth, truth) == 0.0
    zero = DisplacementField(disp_mm=torch.zeros_like(truth.disp_mm), grid=truth.grid)
    assert end_point_error(zero, truth) == pytest.approx(5.0, abs=1e-5)
    half = DisplacementField(disp_mm=truth.disp_mm / 2, grid=truth.grid)
    mask = np.zeros(SHAPE, bool)
    mask[:5] = True
    assert end_point_error(half, truth, mask) == pytest.approx(2.5, abs=1e-5)


def test_pairs_file_paths_are_relative_to_it_and_bad_rows_are_user_errors(pairs_csv, tmp_path):
    pairs = read_pairs(pairs_csv)
    assert [pair.name for pair in pairs] == ["shift", "cross"]
    assert pairs[0].true_flow == pairs_csv.parent / "true_flow.nii.gz"
    assert pairs[1].true_flow is None
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,moving\nnothere.nii.gz,alsonot.nii.gz\n")
    with pytest.raises(VitregError, match=r"bad.csv: 1 bad row\(s\): .*bad.csv:2: fixed .*no such"):
        check_pairs(read_pairs(bad))
    bad.write_text("fixed,labels\na,b\n")
    with pytest.raises(VitregError, match="no moving column"):
        read_pairs(bad)


def test_groups_average_left_and_right_dice():
    names = {17: "Left-Hippocampus", 53: "Right-Hippocampus", 1: "Precentral_L", 2: "Precentral_R"}
    groups = group_dice({17: 0.6, 53: 0.8, 1: 0.5, 2: 0.7, 9: 0.1}, names)
    assert groups == pytest.approx({"Hippocampus": 0.7, "Precentral": 0.6, "9": 0.1})


def test_peak_memory_sees_an_allocation_inside_the_block():
    with PeakMemory() as before:
        pass
    with PeakMemory() as memory:
        block = np.ones(400 * 2**20 // 8)
        del block
    assert memory.peak_mib >= before.peak_mib + 300


def test_evaluate_command_writes_every_output(pairs_csv, tmp_path):
    config = VitVNetConfig(
        img_size=FRAME.shape, hidden_size=24, num_layers=1, num_heads=2, mlp_dim=32,
        conv_first_channel=32,
    )  # fmt: skip
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "small.safetensors", VitVNet(config), FRAME)
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        app,
        ["evaluate", str(pairs_csv), "--out", str(out), "--weights", str(checkpoint),
         "--optimize", "2", "--device", "cpu", "--groups", "--json", "--offline"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary) == {"shifted", "cross", "all"} and summary["all"]["pairs"] == 2
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["shift", "cross"]
    assert float(rows[0]["epe_mm"]) > 0 and rows[1]["epe_mm"] == ""
    for row in rows:
        assert 0 < float(row["dice_mean"]) <= 1 and float(row["peak_memory_mib"]) > 0
        assert float(row["seconds"]) > 0 and row["memory_kind"] == "host rss"
    with (out / "dice.csv").open() as handle:
        structures = {row["structure"] for row in csv.DictReader(handle)}
    assert structures == {"Hippocampus", "Cerebral-White-Matter"}
    assert set(summary["shifted"]["groups"]) == structures


def test_evaluate_passes_register_options_and_scores_no_motion_as_the_whole_shift(pairs_csv):
    pairs = read_pairs(pairs_csv)
    results = evaluate(pairs, frame=FRAME, optimize=0, device="cpu", affine=False)
    shifted = results[0].metrics
    # No affine, no model, no optimisation: a zero flow, so the error is the whole shift.
    assert shifted.epe_mm == pytest.approx(5.0, abs=1e-4)
    assert shifted.percent_nonpositive == 0.0 and shifted.sdlogj == pytest.approx(0.0, abs=1e-6)
    assert shifted.correlation_before == pytest.approx(shifted.correlation_after)
    # The affine pre-alignment (register's default) finds the shift.
    aligned = evaluate(pairs[:1], frame=FRAME, optimize=0, device="cpu")[0].metrics
    assert aligned.epe_mm < 0.5 and aligned.correlation_after > shifted.correlation_after


def test_cost_mask_columns_reach_the_registration_and_adam_refuses_them(
    pairs_csv, tmp_path, monkeypatch
):
    from vitreg import evaluate as evaluation
    from vitreg.errors import OptionError
    from vitreg.evaluate import evaluate_csv
    from vitreg.register import RegisterSettings

    folder = pairs_csv.parent
    (tmp_path / "pairs.csv").write_text(
        "name,fixed,moving,fixed_mask,moving_mask\n"
        f"masked,{folder / 'fixed.nii.gz'},{folder / 'moving.nii.gz'},"
        f"{folder / 'fixed_labels.nii.gz'},{folder / 'moving_labels.nii.gz'}\n"
    )
    with pytest.raises(OptionError, match="fixed_mask"):
        evaluate_csv(tmp_path / "pairs.csv", tmp_path / "never", None, FRAME,
                     RegisterSettings(optimizer="adam"), device="cpu")  # fmt: skip
    assert not (tmp_path / "never").exists()
    seen = {}
    real_register = evaluation.register

    def recording(*args, **options):
        seen.update(options)
        return real_register(*args, **options)

    monkeypatch.setattr(evaluation, "register", recording)
    evaluate_csv(tmp_path / "pairs.csv", tmp_path / "out", None, FRAME,
                 RegisterSettings(optimize=0, affine=False), device="cpu")  # fmt: skip
    assert seen["fixed_mask"].path == folder / "fixed_labels.nii.gz"
    assert seen["moving_mask"].path == folder / "moving_labels.nii.gz"
