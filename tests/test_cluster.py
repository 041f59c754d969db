"""register-batch and evaluate on a real Dask cluster (a LocalCluster of 2 worker processes):
the same flows as in one process, a killed worker's pairs redone once, resume, the CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.volumes import head_pairs_csv
from vitreg import batch
from vitreg.cli import app
from vitreg.errors import OptionError, VitregError
from vitreg.frame import ModelFrame

distributed = pytest.importorskip("distributed")
pytest.importorskip("distributed.diagnostics.plugin")

from vitreg.cluster import DaskEngine, cpu_place, torch_threads_by_place  # noqa: E402

runner = CliRunner()
FRAME = ModelFrame(orientation="RAS", spacing=(2.5, 2.5, 2.5), shape=(24, 24, 24))
SCHEDULE = dict(levels=(2, 1), iterations=(10, 4))  # the window of 5 fits 24 // 2 voxels
PAIRS = 4
MISSING_ROW = 1  # line 3 of pairs.csv: its moving file does not exist


class StartedOn(distributed.diagnostics.plugin.SchedulerPlugin):
    """A scheduler plugin (the LocalCluster's scheduler lives in this process): the worker
    of every start of every task, as (key, worker address)."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing":
            with self.lock:
                self.starts.append((key, self.scheduler.tasks[key].processing_on.address))


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes of 1 thread, with vitreg imported on each."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.ERROR,
    ) as local, distributed.Client(local, set_as_default=False) as client:  # fmt: skip
        plugin = StartedOn()
        plugin.scheduler = local.scheduler
        local.scheduler.add_plugin(plugin, name="started-on")
        client.run(__import__, "vitreg.batch")
        yield local, client, plugin


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    return head_pairs_csv(folder, PAIRS + 1, missing_row=MISSING_ROW)


@pytest.fixture(scope="module")
def single(cohort):
    """The batch registered in this process, as without a scheduler."""
    return batch.register_batch(cohort, cohort.parent / "single", frame=FRAME, **SCHEDULE)


def flows(result) -> dict[str, np.ndarray]:
    """Each finished pair's flow (mm, ITK), by name."""
    return {
        record["name"]: nib.load(record["flow"]).get_fdata()
        for record in result.records
        if record["status"] == "ok"
    }


def comparable(records):
    """The records without what differs from run to run (time) or folder to folder (paths)."""
    varying = ("seconds", "warped", "flow", "fixed", "moving", "fingerprint")
    return [{k: v for k, v in record.items() if k not in varying} for record in records]


def check_same_as_single(result, single) -> None:
    assert [r["row"] for r in result.records] == [r["row"] for r in single.records]
    assert comparable(result.records) == comparable(single.records)
    expected = flows(single)
    got = flows(result)
    assert sorted(got) == sorted(expected) and len(got) == PAIRS
    for name, flow in got.items():
        np.testing.assert_allclose(flow, expected[name], rtol=0, atol=1e-5)  # mm


@pytest.fixture(scope="module")
def on_cluster(cohort, cluster):
    _, client, _ = cluster
    return batch.register_batch(
        cohort, cohort.parent / "cluster", frame=FRAME, engine=DaskEngine(client), **SCHEDULE
    )


def test_the_cluster_gives_the_flows_and_records_of_one_process(on_cluster, single):
    check_same_as_single(on_cluster, single)
    failed = on_cluster.records[MISSING_ROW]
    assert failed["status"] == "failed" and "pairs.csv:3" in failed["error"]
    assert "absent.nii.gz" in failed["error"] and failed["flow"] == ""
    summary = json.loads(on_cluster.summary_json.read_text())
    counts = {"ok": PAIRS, "failed": 1, "resumed": 0}
    assert {key: summary["counts"][key] for key in counts} == counts
    assert summary["pairs"] == on_cluster.records


def test_torch_threads_share_the_cpus_of_the_workers_on_them():
    two_cpus, eight_cpus = ("node1", (0, 1)), ("node1", tuple(range(8)))
    job_a, job_b = ("node2", (0, 1, 2, 3)), ("node2", (4, 5, 6, 7))
    workers = {"w1": (two_cpus, 1), "w2": (two_cpus, 1), "w3": (eight_cpus, 1)}
    workers.update({"w4": (job_a, 2), "w5": (job_b, 4)})
    assert torch_threads_by_place(workers) == {two_cpus: 1, eight_cpus: 8, job_a: 2, job_b: 1}


def test_the_workers_of_a_cluster_run_torch_on_their_share_of_the_cpus(on_cluster, cluster):
    _, client, _ = cluster
    cpus = len(cpu_place()[1])
    threads = client.run(lambda: __import__("torch").get_num_threads())
    assert len(threads) == 2 and set(threads.values()) == {max(1, cpus // 2)}


def test_a_killed_worker_s_pairs_are_redone_elsewhere_and_recorded_once(cohort, cluster, single):
    local, client, started = cluster
    killed: list[str] = []

    def kill_a_busy_worker(record: dict, error: VitregError | None) -> None:
        """On the first record: SIGKILL a worker process that is registering a pair."""
        if killed:
            return
        busy = [worker for worker, keys in client.processing().items() if keys]
        pids = client.run(os.getpid, workers=busy[:1])
        for worker, pid in pids.items():
            os.kill(pid, signal.SIGKILL)
            killed.append(worker)

    seen: list[int] = []

    def on_record(record: dict, error: VitregError | None) -> None:
        seen.append(record["row"])
        kill_a_busy_worker(record, error)

    with started.lock:
        started.starts.clear()
    result = batch.register_batch(
        cohort, cohort.parent / "killed", frame=FRAME, engine=DaskEngine(client),
        on_record=on_record, **SCHEDULE,
    )  # fmt: skip
    assert len(killed) == 1
    # Some pair was started on the killed worker and then again on another one.
    workers_of: dict[str, list[str]] = {}
    for key, worker in started.starts:
        workers_of.setdefault(key, []).append(worker)
    redone = [key for key, workers in workers_of.items() if len(workers) > 1]
    assert redone and all(workers[0] == killed[0] for workers in map(workers_of.get, redone))
    # Every pair recorded exactly once, and the same as in one process.
    assert sorted(seen) == [record["row"] for record in single.records]
    check_same_as_single(result, single)
    summary = json.loads(result.summary_json.read_text())
    assert [record["row"] for record in summary["pairs"]] == sorted(seen)


def test_a_rerun_on_the_cluster_skips_the_finished_pairs(cohort, on_cluster, cluster):
    _, client, started = cluster
    out = cohort.parent / "cluster"
    stamps = {path.name: path.stat().st_mtime_ns for path in out.glob("*.nii.gz")}
    with started.lock:
        started.starts.clear()
    again = batch.register_batch(cohort, out, frame=FRAME, engine=DaskEngine(client), **SCHEDULE)
    assert [record["resumed"] for record in again.records] == [
        row != MISSING_ROW for row in range(PAIRS + 1)
    ]
    assert len(started.starts) == 1  # only the failed pair went to the cluster again
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.nii.gz")} == stamps


def test_the_cli_runs_register_batch_on_a_scheduler_with_the_model_on_each_worker(
    cohort, cluster, tiny_checkpoint
):
    """--scheduler ADDRESS, a checkpoint read by every worker: the results of a local run."""
    local, _, _ = cluster
    runs = {}
    for where, extra in (("here", []), ("there", ["--scheduler", local.scheduler_address])):
        result = runner.invoke(
            app, ["register-batch", str(cohort), "--out-dir", str(cohort.parent / f"cli-{where}"),
                  "--weights", str(tiny_checkpoint), "--iterations", "3,1", "--levels", "2,1",
                  "--no-affine", "--json", *extra],
        )  # fmt: skip
        assert result.exit_code == 1, result.output  # the missing file's pair failed
        runs[where] = json.loads(result.stdout)
    assert comparable(runs["there"]["pairs"]) == comparable(runs["here"]["pairs"])
    for here, there in zip(runs["here"]["pairs"], runs["there"]["pairs"], strict=True):
        if here["status"] == "ok":
            np.testing.assert_allclose(
                nib.load(there["flow"]).get_fdata(), nib.load(here["flow"]).get_fdata(), atol=1e-5
            )


def test_the_cli_evaluates_on_a_scheduler_as_in_one_process(tmp_path, cluster, tiny_checkpoint):
    local, _, _ = cluster
    csv = head_pairs_csv(tmp_path, 2)
    options = ["--weights", str(tiny_checkpoint), "--iterations", "3,1", "--levels", "2,1",
               "--no-affine"]  # fmt: skip
    summaries = {}
    for where, extra in (("here", []), ("there", ["--scheduler", local.scheduler_address])):
        result = runner.invoke(
            app, ["evaluate", str(csv), "--out", str(tmp_path / where), "--json", *options, *extra]
        )
        assert result.exit_code == 0, result.output
        summaries[where] = json.loads(result.stdout)["all"]
    assert summaries["there"]["pairs"] == 2
    for metric in ("percent_nonpositive", "sdlogj", "correlation_after"):
        assert summaries["there"][metric]["mean"] == pytest.approx(
            summaries["here"][metric]["mean"], abs=1e-6
        )


def test_bad_schedulers_are_usage_errors(tmp_path):
    with pytest.raises(OptionError, match="local:N with N >= 1"):
        DaskEngine("local:0")
    csv = head_pairs_csv(tmp_path, 1)
    for scheduler, expected in (
        ("local:x", "--scheduler local:x: expected local:N with N >= 1"),
        (str(tmp_path / "nowhere.json"), "no such scheduler file"),
    ):
        result = runner.invoke(
            app, ["register-batch", str(csv), "--out-dir", str(tmp_path / "o"),
                  "--weights", "none", "--scheduler", scheduler],
        )  # fmt: skip
        assert result.exit_code == 2 and expected in result.output, result.output
    with pytest.raises(OptionError, match="batch_size=2: a cluster registers one pair"):
        batch.register_batch(csv, tmp_path / "o", batch_size=2, engine=DaskEngine("local:1"))


def test_the_throughput_benchmark_measures_pairs_per_minute_on_a_local_cluster(tmp_path):
    """benchmarks/cluster_throughput.py on two copies of a tiny pair, in this process and on
    local:1 (the full run is for the closing note: see its docstring)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "cluster_throughput.py"
    spec = importlib.util.spec_from_file_location("cluster_throughput", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    options = dict(pairs=head_pairs_csv(tmp_path, 1), copies=2, workers=(0, 1))
    options.update(iterations=(3, 1), levels=(2, 1), shape=(24, 24, 24), spacing=2.5)
    report = module.measure(argparse.Namespace(**options))
    assert json.loads(json.dumps(report)) == report
    assert [run["workers"] for run in report["runs"]] == [0, 1]
    for run in report["runs"]:
        assert run["pairs"] == 2 and run["pair_seconds"] > 0
        assert run["pairs_per_minute"] == pytest.approx(120 / run["seconds"], rel=0.02)
    assert report["runs"][0]["startup_seconds"] == 0 < report["runs"][1]["startup_seconds"]


@dataclass(frozen=True)
class KillsItsWorker:
    """The work of a batch, but the process that takes pair ``fatal`` dies at once."""

    work: batch.BatchWork
    fatal: str

    def load(self):
        return self.work.load()

    def __call__(self, loaded, pair):
        if pair.name == self.fatal:
            os._exit(1)
        return self.work(loaded, pair)

    def failure(self, pair, message):
        return self.work.failure(pair, message)


def test_a_pair_that_keeps_killing_its_workers_is_a_failed_row(tmp_path, cluster):
    local, client, _ = cluster
    csv = head_pairs_csv(tmp_path, 1)
    engine = DaskEngine(client)
    allowed = local.scheduler.allowed_failures
    local.scheduler.allowed_failures = 0  # the first death is one too many
    try:
        result = batch.register_batch(
            csv, tmp_path / "out", frame=FRAME,
            engine=lambda work, pairs: engine(KillsItsWorker(work, "p0"), pairs), **SCHEDULE,
        )  # fmt: skip
    finally:
        local.scheduler.allowed_failures = allowed
    (record,) = result.records
    assert record["status"] == "failed" and record["error"].startswith(f"{csv}:2: a worker died")
    assert json.loads(result.summary_json.read_text())["counts"]["failed"] == 1
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the tests that follow
