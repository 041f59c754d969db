"""Register many pairs listed in a CSV file: one model, background preparation, resumable.

Each pair goes through the stages of :func:`vitreg.register.register` (prepare, network,
finish) and then :func:`vitreg.workflow.finish_pair`, so a batch gives what one
``vitreg register`` per pair would. A thread loads, checks and prepares (affine
pre-alignment, framing) the next pairs while the current ones are registered; up to
``batch_size`` prepared pairs go through the network in one call. A pair that fails is
recorded with its CSV line and the rest go on; the summary (CSV and JSON) is rewritten after
every pair, so an interrupted batch resumes where it stopped.

One run at a time writes to an output folder: a run holds the lock file ``.vitreg-batch.lock``
there, and a second run on the same folder stops at once with an error naming it (the
operating system drops the lock of a killed run, so a rerun is never blocked by a stale one).
The rerun removes the half-written temporaries a killed run may have left.

Elsewhere: with an ``engine`` (:mod:`vitreg.engine`; :class:`vitreg.cluster.DaskEngine`),
the pairs are registered by :class:`BatchWork` wherever the engine runs it, one pair per
network call, and this process records them as they come. With a ``shard``
(:mod:`vitreg.shards`) a run takes every N-th pair and keeps its own summary;
:func:`merge_shards` joins the shards' summaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from filelock import FileLock, Timeout

from vitreg.device import choose_device
from vitreg.engine import PairEngine, load_source, model_source
from vitreg.errors import OptionError, VitregError
from vitreg.files import make_folder, remove_stale_temporaries, write_csv, write_json
from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet
from vitreg.pairs import LoadedPair, Pair, load_pair, read_pairs
from vitreg.register import (
    PreparedPair,
    Progress,
    RegisterSettings,
    finish_registration,
    predict_batch,
    prepare_pair,
    settings_from,
)
from vitreg.report import write_report
from vitreg.shards import Shard, merged_records, read_shard_summaries
from vitreg.weights import load_model
from vitreg.workflow import OutputPaths, finish_pair

T = TypeVar("T")

INPUT_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
SUMMARY_STEM = "summary"
SUMMARY_CSV = f"{SUMMARY_STEM}.csv"
SUMMARY_JSON = f"{SUMMARY_STEM}.json"
LOCK_FILE = ".vitreg-batch.lock"
SUMMARY_INTERVAL_SECONDS = 2.0
"""With an engine, the summary is rewritten at most this often, and at most every tenth of
the time (and at the end): results may come faster than a summary of thousands of pairs is
written (10,000 pairs: about 1 s)."""
SUMMARY_FIELDS = (
    "row",
    "name",
    "status",
    "error",
    "resumed",
    "seconds",
    "ncc_before",
    "ncc_after",
    "percent_nonpositive",
    "sdlogj",
    "dice_before",
    "dice_after",
    "qc_flag",
    "qc_reasons",
    "head_ncc_before",
    "head_ncc_after",
    "jacobian_p1",
    "jacobian_p99",
    "affine_scales",
    "affine_shear",
    "affine_flip",
    "affine_fallback",
    "moving_outside_fov",
    "fixed_uncovered",
    "mirror_advantage",
    "head_correlation",
    *INPUT_COLUMNS,
    "warped",
    "flow",
    "warped_labels",
    "qc",
)
RecordCallback = Callable[[dict, VitregError | None], None]
"""Called as ``on_record(record, error)`` for each new record; ``error`` for a failed pair."""


@dataclass(frozen=True)
class BatchResult:
    """Per-pair records (in CSV order, as written to the summary), the summary files and the
    HTML report (None unless asked for)."""

    records: list[dict]
    summary_csv: Path
    summary_json: Path
    report: Path | None = None

    @property
    def failed(self) -> list[dict]:
        return [record for record in self.records if record["status"] == "failed"]

    @property
    def flagged(self) -> dict[str, list[dict]]:
        """The registered pairs whose QC flag is 'check' or 'fail', by flag."""
        return {
            flag: [record for record in self.records if record.get("qc_flag") == flag]
            for flag in ("check", "fail")
        }


def _csv_cells(record: dict) -> dict:
    """A record with its lists (QC reasons, affine scales) as one '; '-separated cell each."""
    return {
        key: "; ".join(map(str, value)) if isinstance(value, list) else value
        for key, value in record.items()
    }


def check_counts(prefetch: int, batch_size: int) -> None:
    """OptionError unless ``prefetch`` and ``batch_size`` (pairs) are at least 1."""
    for option, value in (("prefetch", prefetch), ("batch_size", batch_size)):
        if value < 1:
            raise OptionError(option, value, "must be at least 1")


def pair_outputs(out_dir: Path, pair: Pair, qc: bool = False) -> OutputPaths:
    """Output files of one pair in ``out_dir``, named after the pair."""
    labels = pair.fixed_labels is not None or pair.moving_labels is not None
    return OutputPaths.in_folder(out_dir, pair.name, labels, qc)


def _fingerprint(pair: Pair, settings: dict) -> dict:
    """What a finished pair was made from: input paths, their sizes and times, the settings.

    A rerun redoes a pair whose inputs or settings changed since.
    """
    files = {}
    for column, path in pair.paths().items():
        stat = path.stat() if path.is_file() else None
        files[column] = [str(path), stat.st_size, stat.st_mtime_ns] if stat else [str(path)]
    return {"inputs": files, "settings": settings}


def _read_previous(summary_json: Path) -> dict[str, dict]:
    """Records of an earlier run by name; an unreadable summary means none."""
    try:
        records = json.loads(summary_json.read_text())["pairs"]
        return {record["name"]: record for record in records}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _is_finished(previous: dict | None, fingerprint: dict, outputs: OutputPaths) -> bool:
    return (
        previous is not None
        and previous.get("status") == "ok"
        and previous.get("fingerprint") == fingerprint
        and all(path.is_file() for path in outputs.files().values())
    )


@dataclass(frozen=True)
class ReadyPair:
    """A pair loaded, checked and prepared (affine pre-alignment, framing) ahead."""

    loaded: LoadedPair
    prepared: PreparedPair


def ready_pair(
    pair: Pair, frame: ModelFrame, settings: RegisterSettings, device: torch.device
) -> ReadyPair:
    """Load and check ``pair``, then prepare it (affine pre-alignment, framing) on ``device``."""
    loaded = load_pair(pair)
    settings.check_labels(loaded.labels)
    settings.check_masks(loaded.fixed_mask, loaded.moving_mask)
    prepared = prepare_pair(
        loaded.fixed, loaded.moving, frame, settings, device, loaded.labels,
        fixed_mask=loaded.fixed_mask, moving_mask=loaded.moving_mask,
    )  # fmt: skip
    return ReadyPair(loaded, prepared)


def _in_background(
    pairs: list[Pair], depth: int, work: Callable[[Pair], T]
) -> Iterator[tuple[Pair, T | VitregError]]:
    """Yield ``work(pair)`` (or its VitregError) per pair while a thread works up to
    ``depth`` pairs ahead.

    Any other exception in the thread is a bug: it is raised here. Leaving the loop early
    stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        for pair in pairs:
            try:
                item: object = work(pair)
            except BaseException as error:  # a VitregError is the pair's; others are raised
                item = error
            while not stop.is_set():
                try:
                    ready.put((pair, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return

    thread = threading.Thread(target=run, name="vitreg-batch-loader", daemon=True)
    thread.start()
    try:
        for _ in pairs:
            pair, item = ready.get()
            if isinstance(item, BaseException) and not isinstance(item, VitregError):
                raise item
            yield pair, item
    finally:
        stop.set()
        thread.join()


def _through_network(
    model: VitVNet | None,
    group: list[tuple[Pair, ReadyPair | VitregError]],
    progress: Progress | None,
) -> dict[int, PreparedPair]:
    """The prepared pairs of ``group`` by CSV row, with ``model``'s output from one call."""
    prepared = {pair.row: item.prepared for pair, item in group if isinstance(item, ReadyPair)}
    if model is None or not prepared:
        return prepared
    predicted = predict_batch(model, list(prepared.values()), progress)
    return dict(zip(prepared, predicted, strict=True))


@dataclass
class _Batch:
    """One run of :func:`register_batch`: its inputs, settings and the records so far."""

    csv_path: Path
    out_dir: Path
    pairs: list[Pair]
    settings: RegisterSettings
    record_settings: dict
    qc: bool
    records: dict[int, dict] = dataclasses.field(default_factory=dict)
    fingerprints: dict[int, dict] = dataclasses.field(default_factory=dict)
    stem: str = SUMMARY_STEM
    shard: dict | None = None  # a shard's place in the pairs file (vitreg.shards.Shard.header)

    @property
    def summary_json(self) -> Path:
        return self.out_dir / f"{self.stem}.json"

    @property
    def summary_csv(self) -> Path:
        return self.out_dir / f"{self.stem}.csv"

    def result(self) -> BatchResult:
        return BatchResult(self.ordered(), self.summary_csv, self.summary_json)

    def ordered(self) -> list[dict]:
        return [self.records[pair.row] for pair in self.pairs if pair.row in self.records]

    def remove_stale_temporaries(self) -> None:
        """Remove the half-written temporaries of this batch's files that a killed run left
        (the batch lock is held, so no other process is writing them)."""
        for pair in self.pairs:
            for path in pair_outputs(self.out_dir, pair, self.qc).files().values():
                remove_stale_temporaries(path)
        for path in (self.summary_json, self.summary_csv):
            remove_stale_temporaries(path)

    def to_do(self) -> list[Pair]:
        """The pairs not finished by an earlier run (those are recorded as resumed)."""
        previous = _read_previous(self.summary_json)
        remaining = []
        for pair in self.pairs:
            earlier = previous.get(pair.name)
            fingerprint = self.fingerprints[pair.row] = _fingerprint(pair, self.record_settings)
            if _is_finished(earlier, fingerprint, pair_outputs(self.out_dir, pair, self.qc)):
                self.records[pair.row] = {**earlier, "row": pair.row, "resumed": True}
            else:
                remaining.append(pair)
        return remaining

    def store(self, record: dict, write: bool = True) -> None:
        """Keep a pair's record (made here or elsewhere by :class:`BatchWork`), with the
        fingerprint of a finished pair; rewrite the summary unless ``write`` is False."""
        if record["status"] == "ok":
            record["fingerprint"] = self.fingerprints[record["row"]]
        self.records[record["row"]] = record
        if write:
            self.write_summary()

    def outcome(
        self,
        pair: Pair,
        item: ReadyPair | VitregError,
        prepared: PreparedPair | None,
        progress: Progress | None,
    ) -> tuple[dict, VitregError | None]:
        """Finish one pair (or record its failure): its record (no fingerprint yet) and its
        error, if it failed. Touches nothing of the batch but the pair's output files."""
        outputs = pair_outputs(self.out_dir, pair, self.qc)
        record = {
            "row": pair.row,
            "name": pair.name,
            "status": "ok",
            "error": "",
            "resumed": False,
            **{column: str(getattr(pair, column) or "") for column in INPUT_COLUMNS},
            **{key: str(path) for key, path in outputs.files().items()},
        }
        error = item if isinstance(item, VitregError) else None
        try:
            if error is None:
                registration = finish_registration(prepared, self.settings, progress)
                record.update(finish_pair(item.loaded, registration, outputs).summary())
        except VitregError as raised:
            error = raised
        if error is not None:
            message = " ".join(str(error).split())
            record.update(status="failed", error=f"{self.csv_path}:{pair.row}: {message}")
            record.update(dict.fromkeys(outputs.files(), ""))  # a failed pair lists no outputs
        return record, error

    def write_summary(self) -> None:
        """Rewrite summary.json (with fingerprints, for resuming) and summary.csv atomically."""
        records = self.ordered()
        counts = {s: sum(r["status"] == s for r in records) for s in ("ok", "failed")}
        counts["resumed"] = sum(bool(record.get("resumed")) for record in records)
        for flag in ("check", "fail"):
            counts[f"qc_{flag}"] = sum(record.get("qc_flag") == flag for record in records)
        report = {
            "csv": str(self.csv_path),
            "settings": self.record_settings,
            "counts": counts,
            **({"shard": self.shard} if self.shard is not None else {}),
            "pairs": records,
        }
        write_json(self.summary_json, report)
        write_csv(self.summary_csv, [_csv_cells(r) for r in records], SUMMARY_FIELDS)


@dataclass(frozen=True)
class BatchWork:
    """One pair of a batch registered where an engine runs it (picklable, see
    :mod:`vitreg.engine`): the stages of :func:`register_batch`'s own loop, one pair per
    network call. Returns the pair's record and error; the output files are written into
    ``out_dir`` (atomically) by the process that registers the pair.

    ``model``: what :func:`vitreg.engine.load_source` loads once per process; ``device``: as
    the ``device`` option ('auto' picks each worker's own); the other fields as
    :class:`_Batch`'s (``settings`` already checked against the model).
    """

    csv_path: Path
    out_dir: Path
    settings: RegisterSettings
    record_settings: dict
    qc: bool
    frame: ModelFrame
    device: str
    model: VitVNet | Path | None

    def load(self) -> VitVNet | None:
        return load_source(self.model, self.frame)

    def __call__(self, network: VitVNet | None, pair: Pair) -> tuple[dict, VitregError | None]:
        try:
            item: ReadyPair | VitregError = ready_pair(
                pair, self.frame, self.settings, choose_device(self.device)
            )
        except VitregError as error:
            item = error
        prepared = _through_network(network, [(pair, item)], None)
        run = _Batch(
            self.csv_path, self.out_dir, [pair], self.settings, self.record_settings, self.qc
        )
        return run.outcome(pair, item, prepared.get(pair.row), None)

    def failure(self, pair: Pair, message: str) -> tuple[dict, VitregError]:
        """The record of a pair the engine could not finish (its worker kept dying)."""
        run = _Batch(
            self.csv_path, self.out_dir, [pair], self.settings, self.record_settings, self.qc
        )
        record, error = run.outcome(pair, VitregError(message), None, None)
        return record, error


def _registered_here(
    run: _Batch,
    to_do: list[Pair],
    network: VitVNet | None,
    prepare: Callable[[Pair], ReadyPair],
    prefetch: int,
    batch_size: int,
    progress: Progress | None,
) -> Iterator[tuple[dict, VitregError | None]]:
    """The pairs registered in this process: records and errors, in CSV order."""
    with contextlib.closing(_in_background(to_do, max(prefetch, batch_size), prepare)) as ready:
        while group := list(itertools.islice(ready, batch_size)):
            prepared = _through_network(network, group, progress)
            for pair, item in group:
                yield run.outcome(pair, item, prepared.get(pair.row), progress)


def _registered_elsewhere(
    engine: PairEngine, work: BatchWork, to_do: list[Pair]
) -> Iterator[tuple[dict, VitregError | None]]:
    """The pairs registered by ``engine``: records and errors, as they come. Leaving early
    closes the engine's iterator (which cancels its pending work)."""
    results = engine(work, to_do)
    try:
        for _, outcome in results:
            yield outcome
    finally:
        getattr(results, "close", lambda: None)()


def register_batch(
    csv_path: str | Path,
    out_dir: str | Path,
    model: VitVNet | str | Path | None = None,
    frame: ModelFrame | None = None,
    weights_name: str | None = None,
    settings: RegisterSettings | None = None,
    device: str = "auto",
    qc: bool = False,
    prefetch: int = 2,
    progress: Progress | None = None,
    on_record: RecordCallback | None = None,
    batch_size: int = 1,
    offline: bool | None = None,
    report: bool = False,
    shard: Shard | None = None,
    engine: PairEngine | None = None,
    **register_options,
) -> BatchResult:
    """Register every pair of ``csv_path`` (see :mod:`vitreg.pairs`) into ``out_dir``.

    Per pair ``NAME``: ``NAME_warped.nii.gz``, ``NAME_flow.nii.gz`` (ITK), with labels
    ``NAME_warped_labels.nii.gz`` (nearest neighbour), with ``qc`` ``NAME_qc.png``; all on
    the fixed grid. Each record holds the pair's QC flag, reasons and indicators
    (:mod:`vitreg.flags`). ``report``: also write ``report.html`` (:mod:`vitreg.report`;
    it turns ``qc`` on). A pair already finished in ``out_dir`` (its record in summary.json is
    'ok' with the same input files, sizes, times and settings, and its outputs exist) is
    kept, not redone. While it runs it holds ``out_dir``'s batch lock: a second call on the
    same folder raises a VitregError at once. A thread loads and prepares (affine, framing)
    ``prefetch`` pairs ahead, and at least ``batch_size``; the model, when given, runs once
    per ``batch_size`` pairs (fewer where a row failed or at the end), with the results of
    one call per pair.

    ``model``: a network, or a checkpoint name or path (loaded once the CSV and options are
    checked; it brings its own frame), or 'none'/None; ``weights_name`` names it in the
    settings (default: the checkpoint's name). ``settings`` (or, instead, its fields as
    ``register_options``, e.g. ``affine=False``) go into the settings a finished pair is
    recognised by (the batch size does not: it does not change the results). ``progress``
    gets ('pairs', done, total), ('network', ...) per call and each pair's optimisation
    steps; ``on_record`` each new record.

    ``shard`` (:class:`vitreg.shards.Shard`): only that shard's pairs, with the summary
    ``summary.shard-K-of-N.csv/json`` (a rerun of the shard resumes from it). ``engine``:
    the pairs are registered by :class:`BatchWork` where the engine runs it (e.g.
    :class:`vitreg.cluster.DaskEngine`), and only recorded here, as they come, the summary
    rewritten at most every :data:`SUMMARY_INTERVAL_SECONDS` and at most a tenth of the
    time; ``batch_size`` must then be 1.
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    check_counts(prefetch, batch_size)
    qc = qc or report
    if engine is not None and batch_size > 1:
        raise OptionError("batch_size", batch_size, "a cluster registers one pair per call")
    settings = settings_from(settings, register_options)
    torch_device = choose_device(device)
    pairs = every_pair = read_pairs(csv_path)
    if shard is not None:
        pairs = shard.select(every_pair)
    if weights_name is None:
        weights_name = (
            str(model) if isinstance(model, str | Path) else "none" if model is None else "model"
        )
    network, frame = load_model(model, frame, offline)
    checked = settings.checked(network, frame)
    record_settings = json.loads(json.dumps({"weights": weights_name, **settings.to_dict()}))
    make_folder(out_dir)
    lock_file = LOCK_FILE if shard is None else f".vitreg-batch.{shard.stem}.lock"
    with _batch_lock(out_dir, lock_file):
        run = _Batch(csv_path, out_dir, pairs, checked, record_settings, qc)
        if shard is not None:
            run.stem, run.shard = shard.stem, shard.header(every_pair)
        run.remove_stale_temporaries()
        to_do = run.to_do()

        if engine is None:
            prepare = functools.partial(
                ready_pair, frame=frame, settings=checked, device=torch_device
            )
            outcomes = _registered_here(
                run, to_do, network, prepare, prefetch, batch_size, progress
            )
        else:
            source = model_source(model, network, offline)
            work = BatchWork(
                csv_path, out_dir.absolute(), checked, record_settings, qc, frame, device, source
            )
            outcomes = _registered_elsewhere(engine, work, to_do)
        if progress is not None:
            progress("pairs", 0, len(to_do))
        written, interval = time.monotonic(), SUMMARY_INTERVAL_SECONDS
        with contextlib.closing(outcomes):
            for done, (record, error) in enumerate(outcomes, start=1):
                due = engine is None or time.monotonic() - written > interval
                start = time.monotonic()
                run.store(record, write=due)
                if due:
                    written = time.monotonic()
                    interval = max(SUMMARY_INTERVAL_SECONDS, 10 * (written - start))
                if on_record is not None:
                    on_record(record, error)
                if progress is not None:
                    progress("pairs", done, len(to_do))
        run.write_summary()
        page = write_report(run.ordered(), csv_path, out_dir) if report else None
    return dataclasses.replace(run.result(), report=page)


def merge_shards(folders: list[str | Path], out_dir: str | Path | None = None) -> BatchResult:
    """Join the summaries of a sharded batch (``summary.shard-K-of-N.json`` in ``folders``)
    into ``summary.csv`` and ``summary.json`` in ``out_dir`` (default: the first folder).

    VitregError, and nothing written, unless every shard 0..N-1 has one summary and every
    pair has exactly one record (:func:`vitreg.shards.merged_records` names the holes and
    duplicates). The merged summary is that of one run over the whole file: a later
    ``register_batch`` without a shard resumes from it.
    """
    records, shared = merged_records(read_shard_summaries(folders))
    target = make_folder(out_dir if out_dir is not None else folders[0])
    pairs = [Pair(record["row"], record["name"], None, None) for record in records]
    run = _Batch(Path(shared["csv"]), target, pairs, RegisterSettings(), shared["settings"], False)
    run.records = {record["row"]: record for record in records}
    run.write_summary()
    return run.result()


@contextlib.contextmanager
def _batch_lock(out_dir: Path, lock_file: str = LOCK_FILE) -> Iterator[None]:
    """Hold ``out_dir``'s batch lock ``lock_file`` for the run (a shard has its own, so the
    shards of a job array share a folder); VitregError at once if another process holds it.
    The operating system releases the lock of a killed process."""
    lock = FileLock(str(out_dir / lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise VitregError(
            f"{out_dir}: another register-batch is writing to this folder (it holds "
            f"{out_dir / lock_file}); let it finish, or write to another folder"
        ) from None
    except OSError as error:
        raise VitregError(f"{out_dir / lock_file}: cannot lock ({error.strerror})") from None
    try:
        yield
    finally:
        lock.release()
