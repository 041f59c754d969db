"""Job-array shards: every pair in exactly one shard; the merge joins them or names the holes."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tests.volumes import head_pairs_csv
from vitreg import batch
from vitreg.cli import app
from vitreg.errors import OptionError, VitregError
from vitreg.frame import ModelFrame
from vitreg.pairs import read_pairs
from vitreg.shards import Shard

runner = CliRunner()
FRAME = ModelFrame(orientation="RAS", spacing=(2.5, 2.5, 2.5), shape=(24, 24, 24))
FAST = dict(frame=FRAME, optimize=0, affine=False)  # framing, warping and assessment only
PAIRS = 5
MISSING_ROW = 3  # pair p3 (line 5 of pairs.csv): its moving file does not exist


@pytest.mark.parametrize("count", [1, 5, 12])
def test_every_pair_lands_in_exactly_one_shard(tmp_path, count):
    rows = "".join(f"f{k}.nii.gz,m{k}.nii.gz\n" for k in range(count))
    (tmp_path / "pairs.csv").write_text("fixed,moving\n" + rows)
    pairs = read_pairs(tmp_path / "pairs.csv")
    for shards in range(1, 8):
        parts = [Shard(index, shards).select(pairs) for index in range(shards)]
        names = [pair.name for part in parts for pair in part]
        assert sorted(names) == sorted(pair.name for pair in pairs)  # all, each once
        for index, part in enumerate(parts):
            expected = [pair for position, pair in enumerate(pairs) if position % shards == index]
            assert part == expected  # every N-th from the K-th, in file order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_a_usage_error(tmp_path, text):
    with pytest.raises(OptionError, match="expected K/N with 0 <= K < N"):
        Shard.parse(text)
    result = runner.invoke(
        app, ["register-batch", "pairs.csv", "--out-dir", str(tmp_path), "--shard", text]
    )
    assert result.exit_code == 2 and f"--shard {text}: expected K/N" in result.output


def test_shard_parse_reads_the_array_task_id_and_count():
    assert Shard.parse("3/100") == Shard(3, 100)
    assert Shard(3, 100).stem == "summary.shard-3-of-100"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return head_pairs_csv(tmp_path_factory.mktemp("cohort"), PAIRS, missing_row=MISSING_ROW)


@pytest.fixture(scope="module")
def whole(cohort):
    """The batch in one run, without shards."""
    return batch.register_batch(cohort, cohort.parent / "whole", **FAST)


def run_shards(cohort, folder, count=2, **options):
    """Every shard of ``count`` into ``folder``, one run each (as an array's jobs)."""
    for index in range(count):
        batch.register_batch(cohort, folder, shard=Shard(index, count), **{**FAST, **options})
    return folder


def comparable(records):
    varying = ("seconds", "warped", "flow")
    return [{k: v for k, v in record.items() if k not in varying} for record in records]


def test_shards_write_their_own_summaries_and_merge_into_the_whole_run(cohort, whole):
    folder = run_shards(cohort, cohort.parent / "sharded", count=2)
    first = json.loads((folder / "summary.shard-0-of-2.json").read_text())
    assert [record["name"] for record in first["pairs"]] == ["p0", "p2", "p4"]
    assert first["shard"] == {
        "index": 0,
        "count": 2,
        "pairs_in_csv": 5,
        "pairs": ["p0", "p2", "p4"],
    }
    assert not (folder / "summary.json").exists()
    merged = batch.merge_shards([folder])
    assert merged.summary_json == folder / "summary.json"
    assert comparable(merged.records) == comparable(whole.records)
    summary = json.loads(merged.summary_json.read_text())
    counts = {"ok": PAIRS - 1, "failed": 1, "resumed": 0}
    assert {key: summary["counts"][key] for key in counts} == counts
    assert "shard" not in summary and summary["settings"] == first["settings"]
    rows = merged.summary_csv.read_text().splitlines()
    assert rows[0] == whole.summary_csv.read_text().splitlines()[0] and len(rows) == PAIRS + 1
    # One run over the whole file resumes from the merged summary.
    again = batch.register_batch(cohort, folder, **FAST)
    assert [record["resumed"] for record in again.records] == [
        position != MISSING_ROW for position in range(PAIRS)
    ]


def test_a_rerun_shard_resumes_from_its_own_summary(cohort):
    folder = run_shards(cohort, cohort.parent / "rerun", count=3)
    again = batch.register_batch(cohort, folder, shard=Shard(1, 3), **FAST)
    assert [(record["name"], record["resumed"]) for record in again.records] == [
        ("p1", True),
        ("p4", True),
    ]


def test_the_merge_names_a_shard_that_never_ran(cohort, tmp_path):
    folder = run_shards(cohort, tmp_path / "out", count=3)
    (folder / "summary.shard-2-of-3.json").unlink()
    with pytest.raises(VitregError, match=r"no summary of shard 2 of 3 \(1 pairs never"):
        batch.merge_shards([folder])
    assert not (folder / "summary.json").exists()


def test_the_merge_names_the_pairs_a_shard_did_not_finish(cohort, tmp_path):
    folder = run_shards(cohort, tmp_path / "out", count=2)
    path = folder / "summary.shard-0-of-2.json"
    report = json.loads(path.read_text())
    report["pairs"] = [record for record in report["pairs"] if record["name"] != "p2"]
    path.write_text(json.dumps(report))  # as a shard killed after p0 and p4
    with pytest.raises(VitregError, match=r"1 of the 3 pairs of shard 0 not done .*: p2"):
        batch.merge_shards([folder])
    result = runner.invoke(app, ["batch-merge", str(folder)])
    assert result.exit_code == 2 and "--shard 0/2" in result.output and "p2" in result.output


def test_the_merge_names_pairs_recorded_twice(cohort, tmp_path):
    folder = run_shards(cohort, tmp_path / "out", count=2)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(folder / "summary.shard-1-of-2.json", copy)
    with pytest.raises(VitregError) as caught:
        batch.merge_shards([folder, copy])
    assert "shard 1 of 2 has 2 summaries" in str(caught.value)
    assert "2 pairs recorded by two shards: p1, p3" in str(caught.value)


def test_shards_run_with_other_settings_do_not_merge(cohort, tmp_path):
    folder = tmp_path / "out"
    batch.register_batch(cohort, folder, shard=Shard(0, 2), **FAST)
    batch.register_batch(cohort, folder, shard=Shard(1, 2), **{**FAST, "diffeo": True})
    with pytest.raises(VitregError, match="the shard summaries differ in the settings"):
        batch.merge_shards([folder])


def test_the_cli_shards_and_merges_and_exits_1_for_a_failed_pair(cohort, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    for index in range(2):
        result = runner.invoke(
            app, ["register-batch", str(cohort), "--out-dir", str(out), "--weights",
                  str(tiny_checkpoint), "--optimize", "0", "--no-affine", "--shard", f"{index}/2",
                  "--json"],
        )  # fmt: skip
        summary = json.loads(result.stdout)
        assert summary["shard"]["index"] == index
        assert result.exit_code == (1 if index == MISSING_ROW % 2 else 0), result.output
    merged = runner.invoke(app, ["batch-merge", str(out), "--out-dir", str(tmp_path / "m")])
    assert merged.exit_code == 1 and "1 of 5 pairs failed" in merged.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert [record["name"] for record in summary["pairs"]] == [f"p{k}" for k in range(PAIRS)]
    empty = runner.invoke(app, ["batch-merge", str(tmp_path / "m")])
    assert empty.exit_code == 2 and "no shard summaries" in empty.output


def test_a_shard_running_in_the_folder_blocks_only_the_same_shard(cohort, tmp_path):
    from filelock import FileLock

    folder = tmp_path / "array"
    folder.mkdir()
    running = FileLock(str(folder / f".vitreg-batch.{Shard(0, 2).stem}.lock"), timeout=0)
    with running:  # shard 0 of a job array is writing here
        other = batch.register_batch(cohort, folder, shard=Shard(1, 2), **FAST)
        assert [r["name"] for r in other.records] == ["p1", "p3"]
        with pytest.raises(VitregError, match="another register-batch is writing"):
            batch.register_batch(cohort, folder, shard=Shard(0, 2), **FAST)
