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
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from vitreg.device import choose_device
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
from vitreg.weights import load_model
from vitreg.workflow import OutputPaths, finish_pair

T = TypeVar("T")

INPUT_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
LOCK_FILE = ".vitreg-batch.lock"
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

    def ordered(self) -> list[dict]:
        return [self.records[pair.row] for pair in self.pairs if pair.row in self.records]

    def remove_stale_temporaries(self) -> None:
        """Remove the half-written temporaries of this batch's files that a killed run left
        (the batch lock is held, so no other process is writing them)."""
        for pair in self.pairs:
            for path in pair_outputs(self.out_dir, pair, self.qc).files().values():
                remove_stale_temporaries(path)
        for name in (SUMMARY_JSON, SUMMARY_CSV):
            remove_stale_temporaries(self.out_dir / name)

    def to_do(self) -> list[Pair]:
        """The pairs not finished by an earlier run (those are recorded as resumed)."""
        previous = _read_previous(self.out_dir / SUMMARY_JSON)
        remaining = []
        for pair in self.pairs:
            earlier = previous.get(pair.name)
            fingerprint = self.fingerprints[pair.row] = _fingerprint(pair, self.record_settings)
            if _is_finished(earlier, fingerprint, pair_outputs(self.out_dir, pair, self.qc)):
                self.records[pair.row] = {**earlier, "row": pair.row, "resumed": True}
            else:
                remaining.append(pair)
        return remaining

    def finish(
        self,
        pair: Pair,
        item: ReadyPair | VitregError,
        prepared: PreparedPair | None,
        progress: Progress | None,
    ) -> tuple[dict, VitregError | None]:
        """Finish one pair (or record its failure) and rewrite the summary."""
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
                record["fingerprint"] = self.fingerprints[pair.row]
        except VitregError as raised:
            error = raised
        if error is not None:
            message = " ".join(str(error).split())
            record.update(status="failed", error=f"{self.csv_path}:{pair.row}: {message}")
            record.update(dict.fromkeys(outputs.files(), ""))  # a failed pair lists no outputs
        self.records[pair.row] = record
        self.write_summary()
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
            "pairs": records,
        }
        write_json(self.out_dir / SUMMARY_JSON, report)
        write_csv(self.out_dir / SUMMARY_CSV, [_csv_cells(r) for r in records], SUMMARY_FIELDS)


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
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    check_counts(prefetch, batch_size)
    qc = qc or report
    settings = settings_from(settings, register_options)
    torch_device = choose_device(device)
    pairs = read_pairs(csv_path)
    if weights_name is None:
        weights_name = (
            str(model) if isinstance(model, str | Path) else "none" if model is None else "model"
        )
    network, frame = load_model(model, frame, offline)
    checked = settings.checked(network, frame)
    record_settings = json.loads(json.dumps({"weights": weights_name, **settings.to_dict()}))
    make_folder(out_dir)
    with _batch_lock(out_dir):
        run = _Batch(csv_path, out_dir, pairs, checked, record_settings, qc)
        run.remove_stale_temporaries()
        to_do = run.to_do()

        def prepare(pair: Pair) -> ReadyPair:
            loaded = load_pair(pair)
            checked.check_labels(loaded.labels)
            checked.check_masks(loaded.fixed_mask, loaded.moving_mask)
            prepared = prepare_pair(
                loaded.fixed, loaded.moving, frame, checked, torch_device, loaded.labels,
                fixed_mask=loaded.fixed_mask, moving_mask=loaded.moving_mask,
            )  # fmt: skip
            return ReadyPair(loaded, prepared)

        if progress is not None:
            progress("pairs", 0, len(to_do))
        done = 0
        with contextlib.closing(_in_background(to_do, max(prefetch, batch_size), prepare)) as ready:
            while group := list(itertools.islice(ready, batch_size)):
                prepared = _through_network(network, group, progress)
                for pair, item in group:
                    record, error = run.finish(pair, item, prepared.get(pair.row), progress)
                    done += 1
                    if on_record is not None:
                        on_record(record, error)
                    if progress is not None:
                        progress("pairs", done, len(to_do))
        run.write_summary()
        page = write_report(run.ordered(), csv_path, out_dir) if report else None
    return BatchResult(run.ordered(), out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON, page)


@contextlib.contextmanager
def _batch_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s batch lock for the run; VitregError at once if another process
    holds it. The operating system releases the lock of a killed process."""
    lock = FileLock(str(out_dir / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise VitregError(
            f"{out_dir}: another register-batch is writing to this folder (it holds "
            f"{out_dir / LOCK_FILE}); let it finish, or give another {{out_dir}}"
        ) from None
    except OSError as error:
        raise VitregError(f"{out_dir / LOCK_FILE}: cannot lock ({error.strerror})") from None
    try:
        yield
    finally:
        lock.release()
