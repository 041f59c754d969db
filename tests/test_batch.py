"""Batch registration from a CSV: continues past broken rows, resumes, writes summaries."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TINY_CONFIG, TINY_FRAME
from tests.volumes import ball_and_shell, grid_affine, rotation, world_head, write
from vitreg import batch
from vitreg.cli import app
from vitreg.errors import VitregError
from vitreg.image import load_image
from vitreg.nets.vitvnet import VitVNet
from vitreg.pairs import Pair
from vitreg.register import register
from vitreg.weights import build_model, read_checkpoint

runner = CliRunner()
SHAPE = (26, 30, 24)


def head_pair(folder, name, shift_mm, labels=False):
    """Fixed (oblique, 2 mm) and moving (LPS, 2.2 mm) heads; optional two-label maps."""
    fixed_affine = grid_affine(rotation(10, 2) * 2.0, SHAPE)
    moving_affine = grid_affine(np.diag([-2.2, -2.2, 2.2]), SHAPE, (1, -1, 0))
    paths = {
        "fixed": write(folder / f"{name}_t1.nii.gz", world_head(fixed_affine, SHAPE), fixed_affine),
        "moving": write(
            folder / f"{name}_moving.nii.gz",
            world_head(moving_affine, SHAPE, shift_mm),
            moving_affine,
        ),
    }
    if labels:
        for role in ("fixed", "moving"):
            image = nib.load(str(paths[role]))
            data = image.get_fdata()
            aseg = np.where(data > 150, 2, 0) + np.where(data > 600, 39, 0)
            path = folder / f"{name}_{role}_aseg.nii.gz"
            nib.save(nib.Nifti1Image(aseg.astype(np.uint8), image.affine), str(path))
            paths[f"{role}_labels"] = path
    return paths


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """pairs.csv: line 2 with labels, line 3 plain, line 4 a moving file that does not exist."""
    folder = tmp_path_factory.mktemp("cohort")
    first = head_pair(folder, "sub01", (2.0, -1.0, 1.0), labels=True)
    second = head_pair(folder, "sub02", (-1.5, 1.0, 0.0))
    rows = [
        ["sub01", first["fixed"].name, first["moving"].name, first["fixed_labels"].name,
         first["moving_labels"].name],
        ["", second["fixed"].name, second["moving"].name, "", ""],
        ["sub03", second["fixed"].name, "missing_moving.nii.gz", "", ""],
    ]  # fmt: skip
    with open(folder / "pairs.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "fixed", "moving", "fixed_labels", "moving_labels"])
        writer.writerows(rows)
    return folder


def run_batch(cohort, checkpoint, *extra):
    args = ["register-batch", cohort / "pairs.csv", "--out-dir", cohort / "out",
            "--weights", checkpoint, "--json", *extra]  # fmt: skip
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def first_run(cohort, tiny_checkpoint):
    result = run_batch(cohort, tiny_checkpoint)
    return result, json.loads(result.stdout)


def test_batch_continues_past_a_broken_row_and_exits_1(cohort, first_run):
    result, summary = first_run
    assert result.exit_code == 1, result.output
    by_name = {record["name"]: record for record in summary["pairs"]}
    assert [record["row"] for record in summary["pairs"]] == [2, 3, 4]
    assert by_name["sub01"]["status"] == by_name["sub02_moving"]["status"] == "ok"
    failed = by_name["sub03"]
    assert failed["status"] == "failed"
    assert "pairs.csv:4" in failed["error"] and "missing_moving.nii.gz" in failed["error"]
    assert "pairs.csv:4" in result.stderr
    counts = summary["counts"]
    assert {key: counts[key] for key in ("ok", "failed", "resumed")} == {
        "ok": 2, "failed": 1, "resumed": 0
    }  # fmt: skip
    flags = [by_name[name]["qc_flag"] for name in ("sub01", "sub02_moving")]
    assert set(flags) <= {"ok", "check", "fail"} and "qc_flag" not in failed
    assert counts["qc_check"] == flags.count("check") and counts["qc_fail"] == flags.count("fail")
    flagged = flags.count("check") + flags.count("fail")
    assert f"QC: {flagged} of 2 registered pairs flagged" in " ".join(result.stderr.split())
    out = cohort / "out"
    fixed = nib.load(str(cohort / "sub01_t1.nii.gz"))
    warped = nib.load(str(out / "sub01_warped.nii.gz"))
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-6)
    assert nib.load(str(out / "sub01_flow.nii.gz")).shape == (*SHAPE, 1, 3)
    labels = nib.load(str(out / "sub01_warped_labels.nii.gz"))
    assert labels.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(labels.dataobj))) <= {0, 2, 41}
    assert 0 < by_name["sub01"]["dice_after"] <= 1 and "dice_after" not in by_name["sub02_moving"]
    assert 0 <= by_name["sub01"]["percent_nonpositive"] <= 100
    assert not any(out.glob("sub03*")) and failed["warped"] == failed["flow"] == ""


def test_summary_csv_matches_the_json(cohort, first_run):
    _, summary = first_run
    with open(cohort / "out" / "summary.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["name"] for row in rows] == [record["name"] for record in summary["pairs"]]
    assert rows[0]["dice_after"] == str(summary["pairs"][0]["dice_after"])
    assert rows[0]["qc_flag"] == summary["pairs"][0]["qc_flag"] and rows[2]["qc_flag"] == ""
    assert rows[0]["qc_reasons"] == "; ".join(summary["pairs"][0]["qc_reasons"])
    assert float(rows[1]["seconds"]) > 0 and rows[2]["status"] == "failed"
    assert json.loads((cohort / "out" / "summary.json").read_text()) == summary


def test_batch_output_equals_a_single_registration(cohort, first_run, tiny_checkpoint):
    """Each pair goes through register(): the same model and settings give the same image."""
    checkpoint = read_checkpoint(tiny_checkpoint)
    fixed = load_image(cohort / "sub02_t1.nii.gz")
    single = register(
        fixed, load_image(cohort / "sub02_moving.nii.gz"), model=build_model(checkpoint),
        frame=checkpoint.frame,
    )  # fmt: skip
    batched = nib.load(str(cohort / "out" / "sub02_moving_warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(batched, single.warped, rtol=1e-5, atol=1e-3)  # float32, ~1000


def test_rerun_skips_finished_pairs_and_redoes_changed_ones(cohort, first_run, tiny_checkpoint):
    out = cohort / "out"
    stamp = {path.name: path.stat().st_mtime_ns for path in out.glob("*.nii.gz")}
    again = run_batch(cohort, tiny_checkpoint)
    assert again.exit_code == 1
    records = json.loads(again.stdout)["pairs"]
    assert [record["resumed"] for record in records] == [True, True, False]
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.nii.gz")} == stamp
    # Supply the missing file and touch sub02's moving image: those two are redone.
    (cohort / "missing_moving.nii.gz").write_bytes((cohort / "sub02_moving.nii.gz").read_bytes())
    moving = cohort / "sub02_moving.nii.gz"
    os.utime(moving, ns=(moving.stat().st_atime_ns, moving.stat().st_mtime_ns + 10**9))
    third = run_batch(cohort, tiny_checkpoint)
    assert third.exit_code == 0, third.output
    summary = json.loads(third.stdout)
    assert [record["resumed"] for record in summary["pairs"]] == [True, False, False]
    counts = summary["counts"]
    assert {key: counts[key] for key in ("ok", "failed", "resumed")} == {
        "ok": 3, "failed": 0, "resumed": 1
    }  # fmt: skip
    assert (out / "sub03_flow.nii.gz").is_file()


def test_names_come_from_the_csv_or_the_moving_path(tmp_path):
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving\n"
        "template.nii.gz,subjects/sub01/mri/brain.mgz\n"
        "\n"
        "template.nii.gz,subjects/sub02/mri/brain.mgz\n"
    )
    pairs = batch.read_pairs(tmp_path / "pairs.csv")
    assert [(pair.row, pair.name) for pair in pairs] == [
        (2, "sub01_mri_brain"),
        (4, "sub02_mri_brain"),
    ]
    assert pairs[0].moving == tmp_path / "subjects/sub01/mri/brain.mgz"
    (tmp_path / "ids.csv").write_text("ID,Fixed,Moving\na b,f.nii,m.nii\na/b,f.nii,m2.nii\n")
    with pytest.raises(VitregError, match=r"ids.csv:3: output name 'a_b' is also that of line 2"):
        batch.read_pairs(tmp_path / "ids.csv")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fixed,image\na,b\n", "no moving column"), ("fixed,moving\n", "no pairs")],
)
def test_a_bad_csv_is_a_usage_error(tmp_path, text, expected):
    (tmp_path / "pairs.csv").write_text(text)
    result = runner.invoke(
        app, ["register-batch", str(tmp_path / "pairs.csv"), "--out-dir", str(tmp_path / "o"),
              "--weights", "none"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().startswith("vitreg: error:") and expected in result.output


def test_bad_rows_are_named_when_loaded(tmp_path):
    good = head_pair(tmp_path, "good", (0, 0, 0), labels=True)
    flat = write(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32), np.eye(4))
    other_grid = write(tmp_path / "grid.nii.gz", np.ones((8, 8, 8), np.uint8), np.eye(4))
    cases = [
        (dict(fixed=good["fixed"], moving=flat), "2D image"),
        (dict(fixed=good["fixed"], moving=None), "no moving image"),
        (dict(fixed=good["fixed"], moving=good["moving"], fixed_labels=other_grid,
              moving_labels=good["moving_labels"]), "grid.nii.gz"),
        (dict(fixed=good["fixed"], moving=good["moving"], fixed_labels=good["fixed_labels"]),
         "go together"),
    ]  # fmt: skip
    for fields, expected in cases:
        with pytest.raises(VitregError, match=expected):
            batch.load_pair(Pair(row=2, name="x", **fields))


def test_a_bug_in_the_loading_thread_reaches_the_caller(tmp_path, monkeypatch):
    pair = head_pair(tmp_path, "p", (0, 0, 0))
    (tmp_path / "pairs.csv").write_text(
        f"fixed,moving\n{pair['fixed'].name},{pair['moving'].name}\n"
    )

    def broken(_pair):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(batch, "load_pair", broken)
    with pytest.raises(ZeroDivisionError):
        batch.register_batch(tmp_path / "pairs.csv", tmp_path / "out", frame=TINY_FRAME)


def test_register_options_reach_every_pair_and_count_as_settings(
    cohort, first_run, tiny_checkpoint
):
    """--no-affine goes to register() for each pair, and a changed setting redoes the pairs."""
    result = run_batch(cohort, tiny_checkpoint, "--no-affine")
    summary = json.loads(result.stdout)
    assert summary["settings"]["affine"] is False and summary["settings"]["diffeo"] is False
    assert not any(record["resumed"] for record in summary["pairs"])
    checkpoint = read_checkpoint(tiny_checkpoint)
    single = register(
        load_image(cohort / "sub01_t1.nii.gz"), load_image(cohort / "sub01_moving.nii.gz"),
        model=build_model(checkpoint), frame=checkpoint.frame, affine=False,
    )  # fmt: skip
    batched = nib.load(str(cohort / "out" / "sub01_warped.nii.gz")).get_fdata()
    np.testing.assert_allclose(batched, single.warped, rtol=1e-5, atol=1e-3)  # float32, ~1000


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """pairs.csv: three good pairs, and on line 3 heads that do not overlap (the affine
    pre-alignment fails), so that in batches of two it shares the first group."""
    folder = tmp_path_factory.mktemp("grouped")
    paths = [head_pair(folder, f"p{k}", (1.5 * k - 1.0, 1.0 - k, 0.5 * k)) for k in range(3)]
    ball, shell = ball_and_shell((32, 32, 32))
    affine = grid_affine(np.diag([2.0, 2.0, 2.0]), ball.shape)
    write(folder / "ball.nii.gz", ball, affine)
    write(folder / "shell.nii.gz", shell, affine)
    rows = [[p["fixed"].name, p["moving"].name] for p in paths]
    rows.insert(1, ["ball.nii.gz", "shell.nii.gz"])
    with open(folder / "pairs.csv", "w", newline="") as file:
        csv.writer(file).writerows([["fixed", "moving"], *rows])
    return folder


def visible_model() -> VitVNet:
    """The tiny untrained model with a registration head that gives a flow of about a voxel."""
    torch.manual_seed(0)
    model = VitVNet(TINY_CONFIG)
    with torch.no_grad():
        model.reg_head[0].weight.normal_(std=2.0)
    return model


def counting_network_calls(monkeypatch, model: VitVNet) -> list[tuple[int, float]]:
    """(batch size, largest |output| in voxels) of ``model``'s network calls, as they happen."""
    sizes: list[tuple[int, float]] = []
    infer = model.infer

    def counted(x, **options):
        output = infer(x, **options)
        sizes.append((x.shape[0], float(output.abs().max())))
        return output

    monkeypatch.setattr(model, "infer", counted)
    return sizes


def comparable(records):
    """The records without what differs between two output folders (seconds, paths)."""
    varying = ("seconds", "warped", "flow", "warped_labels", "qc")
    return [{k: v for k, v in record.items() if k not in varying} for record in records]


def test_batches_of_two_give_the_flows_and_records_of_batch_size_one(grouped, monkeypatch):
    model = visible_model()
    calls = counting_network_calls(monkeypatch, model)
    runs, sizes = {}, {}
    for batch_size in (1, 2):
        calls.clear()
        runs[batch_size] = batch.register_batch(
            grouped / "pairs.csv", grouped / f"out{batch_size}", model=model, frame=TINY_FRAME,
            weights_name="tiny", batch_size=batch_size,
        )  # fmt: skip
        sizes[batch_size] = [size for size, _ in calls]
        assert all(largest > 0.3 for _, largest in calls)  # voxels: not the near-zero init
    # The failing row (line 3) leaves its group's other pair alone: [p0, bad], [p1, p2].
    assert sizes == {1: [1, 1, 1], 2: [1, 2]}
    records = runs[2].records
    assert [record["status"] for record in records] == ["ok", "failed", "ok", "ok"]
    assert "pairs.csv:3" in records[1]["error"] and "do not overlap" in records[1]["error"]
    assert comparable(records) == comparable(runs[1].records)
    for record, single in zip(records, runs[1].records, strict=True):
        if record["status"] == "ok":
            flow = nib.load(record["flow"]).get_fdata()  # mm, the affine included
            # Batched convolutions round differently; the optimiser after the network carries
            # that float noise on (up to 2.4e-5 mm with the field's sigma 0.5 at full
            # resolution). A mixed-up pair differs by tenths of a millimetre.
            np.testing.assert_allclose(flow, nib.load(single["flow"]).get_fdata(), atol=1e-4)
            assert record["seconds"] > 0


def test_batch_size_is_not_a_setting_a_rerun_keeps_the_pairs_done(grouped, monkeypatch):
    model = visible_model()
    calls = counting_network_calls(monkeypatch, model)
    options = dict(model=model, frame=TINY_FRAME, weights_name="tiny")
    first = batch.register_batch(grouped / "pairs.csv", grouped / "rerun", **options)
    calls.clear()
    again = batch.register_batch(grouped / "pairs.csv", grouped / "rerun", batch_size=3, **options)
    assert [record["resumed"] for record in again.records] == [True, False, True, True]
    assert calls == []  # only the failed pair was redone, and it fails before the network
    assert "batch_size" not in json.loads(again.summary_json.read_text())["settings"]
    assert comparable(again.records)[0] == {**comparable(first.records)[0], "resumed": True}


def test_batch_size_below_one_is_a_usage_error(grouped, monkeypatch):
    with pytest.raises(VitregError, match="batch_size=0: must be at least 1"):
        batch.register_batch(grouped / "pairs.csv", grouped / "never", batch_size=0)
    result = runner.invoke(
        app, ["register-batch", str(grouped / "pairs.csv"), "--out-dir", str(grouped / "never"),
              "--weights", "none", "--batch-size", "0"],
    )  # fmt: skip
    assert result.exit_code == 2 and "--batch-size 0: must be at least 1" in result.output
    assert not (grouped / "never").exists()


def test_the_cli_batch_size_reaches_the_network(grouped, tiny_checkpoint, monkeypatch):
    sizes: list[int] = []
    predict = batch.predict_batch

    def counted(model, pairs, progress=None):
        sizes.append(len(pairs))
        return predict(model, pairs, progress)

    monkeypatch.setattr(batch, "predict_batch", counted)
    result = runner.invoke(
        app, ["register-batch", str(grouped / "pairs.csv"), "--out-dir", str(grouped / "cli"),
              "--weights", str(tiny_checkpoint), "--batch-size", "4", "--no-affine", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output  # without the affine, line 3 does not fail
    assert sizes == [4]
    counts = json.loads(result.stdout)["counts"]
    assert {key: counts[key] for key in ("ok", "failed", "resumed")} == {
        "ok": 4, "failed": 0, "resumed": 0
    }  # fmt: skip
