"""Register many pairs listed in a CSV file: one model, background preparation, resumable.

Each pair goes through the stages of :func:`vitreg.register.register` (prepare, network,
finish), so a batch gives what one ``vitreg register`` per pair would. A thread loads,
checks and prepares (affine pre-alignment, framing) the next pairs while the current ones
are registered; up to ``batch_size`` prepared pairs go through the network in one call. A
pair that fails is recorded with its CSV line and the rest go on; the summary (CSV and
JSON) is rewritten after every pair, so an interrupted batch resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vitreg.errors import VitregError
from vitreg.field import check_same_grid, save_flow, warp_labels_nearest
from vitreg.frame import ModelFrame, foreground_mask
from vitreg.image import (
    IMAGE_SUFFIXES,
    Volume,
    atomic_path,
    label_dtype,
    load_image,
    load_labels,
    save,
)
from vitreg.metrics import folding, jacobian_determinant
from vitreg.nets.vitvnet import VitVNet
from vitreg.qc import qc_figure
from vitreg.register import (
    PreparedPair,
    Progress,
    RegisterSettings,
    choose_device,
    dice_before_after,
    finish_registration,
    predict_batch,
    prepare_pair,
)

T = TypeVar("T")

PATH_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels")
NAME_COLUMNS = ("name", "id")
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_FIELDS = (
    "row",
    "name",
    "status",
    "error",
    "resumed",
    "seconds",
    "ncc_before",
    "ncc_after",
    "percent_folding",
    "sdlogj",
    "dice_before",
    "dice_after",
    "fixed",
    "moving",
    "fixed_labels",
    "moving_labels",
    "warped",
    "flow",
    "warped_labels",
    "qc",
)


@dataclass(frozen=True)
class PairRow:
    """One CSV row: ``row`` is its line number in the file (the header is line 1).

    Paths are resolved against the CSV file's folder; a missing cell is None.
    """

    row: int
    name: str
    fixed: Path | None
    moving: Path | None
    fixed_labels: Path | None = None
    moving_labels: Path | None = None


@dataclass(frozen=True)
class BatchResult:
    """Per-pair records (in CSV order, as written to the summary) and the summary files."""

    records: list[dict]
    summary_csv: Path
    summary_json: Path

    @property
    def failed(self) -> list[dict]:
        return [record for record in self.records if record["status"] == "failed"]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (letters, digits, '.', '_', '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._") or "pair"


def _derived_names(moving: list[Path | None], rows: list[int]) -> list[str]:
    """Names from the moving files: the stem, with as many parent folders as make them unique.

    ``sub01/mri/brain.mgz`` and ``sub02/mri/brain.mgz`` become ``sub01_mri_brain`` and
    ``sub02_mri_brain``.
    """
    parts = [
        [*path.parent.parts, _stem(path)] if path is not None else [f"row{row}"]
        for path, row in zip(moving, rows, strict=True)
    ]
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        names = [_safe_name("_".join(p[-depth:])) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names


def read_pairs(csv_path: str | Path) -> list[PairRow]:
    """Read the pairs: columns ``fixed``, ``moving`` (required), ``name`` or ``id``,
    ``fixed_labels``, ``moving_labels`` (optional; other columns are ignored).

    Problems with the whole file (missing, no header, no fixed/moving column, no rows, two
    rows with one output name) raise VitregError; problems with one row (an empty cell, a
    missing image) are left for that pair to report.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise VitregError(f"{csv_path}: no such CSV file")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise VitregError(f"{csv_path}: cannot read the CSV file ({error})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise VitregError(f"{csv_path}: empty file; expected a header with fixed,moving")
    columns = [cell.strip().lower() for cell in header]
    missing = [column for column in ("fixed", "moving") if column not in columns]
    if missing:
        raise VitregError(
            f"{csv_path}:1: no {' or '.join(missing)} column in the header {header}; "
            "expected fixed,moving[,name][,fixed_labels,moving_labels]"
        )
    name_column = next((column for column in NAME_COLUMNS if column in columns), None)
    cells: list[tuple[int, dict[str, str]]] = []
    for values in reader:
        if not any(value.strip() for value in values):
            continue
        row = dict(zip(columns, (value.strip() for value in values), strict=False))
        cells.append((reader.line_num, row))
    if not cells:
        raise VitregError(f"{csv_path}: no pairs listed below the header")

    def path_of(row: dict[str, str], column: str) -> Path | None:
        value = row.get(column, "")
        return csv_path.parent / value if value else None

    lines = [line for line, _ in cells]
    derived = _derived_names([path_of(row, "moving") for _, row in cells], lines)
    pairs, seen = [], {}
    for (line, row), fallback in zip(cells, derived, strict=True):
        given = row.get(name_column, "") if name_column else ""
        name = _safe_name(given) if given else fallback
        if name in seen:
            raise VitregError(
                f"{csv_path}:{line}: output name {name!r} is also that of line {seen[name]}; "
                "give each pair its own name in a 'name' column"
            )
        seen[name] = line
        pairs.append(PairRow(line, name, *(path_of(row, column) for column in PATH_COLUMNS)))
    return pairs


def pair_outputs(out_dir: Path, pair: PairRow, qc: bool = False) -> dict[str, Path]:
    """Output files of one pair in ``out_dir``, named after the pair."""
    outputs = {
        "warped": out_dir / f"{pair.name}_warped.nii.gz",
        "flow": out_dir / f"{pair.name}_flow.nii.gz",
    }
    if pair.fixed_labels is not None or pair.moving_labels is not None:
        outputs["warped_labels"] = out_dir / f"{pair.name}_warped_labels.nii.gz"
    if qc:
        outputs["qc"] = out_dir / f"{pair.name}_qc.png"
    return outputs


def _fingerprint(pair: PairRow, settings: dict) -> dict:
    """What a finished pair was made from: input paths, their sizes and times, the settings.

    A rerun redoes a pair whose inputs or settings changed since.
    """
    files = {}
    for column in PATH_COLUMNS:
        path = getattr(pair, column)
        if path is not None:
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


def _is_finished(previous: dict | None, fingerprint: dict, outputs: dict[str, Path]) -> bool:
    return (
        previous is not None
        and previous.get("status") == "ok"
        and previous.get("fingerprint") == fingerprint
        and all(path.is_file() for path in outputs.values())
    )


@dataclass(frozen=True)
class LoadedPair:
    """A pair's images read and checked by the loading thread."""

    pair: PairRow
    fixed: Volume
    moving: Volume
    labels: tuple[Volume, Volume] | None


def load_pair(pair: PairRow) -> LoadedPair:
    """Read and check one pair's files; VitregError names the file and the problem."""
    if pair.fixed is None or pair.moving is None:
        raise VitregError(f"no {'fixed' if pair.fixed is None else 'moving'} image in this row")
    if (pair.fixed_labels is None) != (pair.moving_labels is None):
        raise VitregError("fixed_labels and moving_labels go together; this row has only one")
    fixed, moving = load_image(pair.fixed), load_image(pair.moving)
    labels = None
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        labels = (load_labels(pair.fixed_labels), load_labels(pair.moving_labels))
        check_same_grid(fixed, labels[0])
    return LoadedPair(pair, fixed, moving, labels)


@dataclass(frozen=True)
class ReadyPair:
    """A pair loaded, checked and prepared (affine pre-alignment, framing) ahead."""

    loaded: LoadedPair
    prepared: PreparedPair


def _in_background(
    pairs: list[PairRow], depth: int, work: Callable[[PairRow], T]
) -> Iterator[tuple[PairRow, T | VitregError]]:
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
            except VitregError as error:
                item = error
            except BaseException as error:  # handed to the main thread, raised there
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


def _write_summary(out_dir: Path, csv_path: Path, settings: dict, records: list[dict]) -> None:
    """Rewrite summary.json (with fingerprints, for resuming) and summary.csv atomically."""
    counts = {
        status: sum(record["status"] == status for record in records) for status in ("ok", "failed")
    }
    counts["resumed"] = sum(bool(record.get("resumed")) for record in records)
    report = {"csv": str(csv_path), "settings": settings, "counts": counts, "pairs": records}
    with atomic_path(out_dir / SUMMARY_JSON) as temporary:
        temporary.write_text(json.dumps(report, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    with atomic_path(out_dir / SUMMARY_CSV) as temporary:
        temporary.write_text(buffer.getvalue(), newline="")


def _through_network(
    model: VitVNet | None,
    group: list[tuple[PairRow, ReadyPair | VitregError]],
    progress: Progress | None,
) -> dict[int, PreparedPair]:
    """The prepared pairs of ``group`` by CSV row, with ``model``'s output from one call."""
    prepared = {pair.row: item.prepared for pair, item in group if isinstance(item, ReadyPair)}
    if model is None or not prepared:
        return prepared
    predicted = predict_batch(model, list(prepared.values()), progress)
    return dict(zip(prepared, predicted, strict=True))


def _finish_one(
    loaded: LoadedPair,
    prepared: PreparedPair,
    outputs: dict[str, Path],
    settings: RegisterSettings,
    progress: Progress | None,
) -> dict:
    """Finish one prepared pair, write its outputs, return its measurements.

    ``seconds``: the pair's preparation, its share of the network call, the finishing and
    the writing.
    """
    start = time.perf_counter()
    result = finish_registration(prepared, settings, progress)
    save(outputs["warped"], result.warped.astype("float32"), loaded.fixed)
    save_flow(outputs["flow"], result.field)
    jacdet = jacobian_determinant(result.field.to_voxels()[0].numpy())
    stats = folding(jacdet, foreground_mask(loaded.fixed.data))
    measured = {
        "ncc_before": round(result.ncc_before, 4),
        "ncc_after": round(result.ncc_after, 4),
        "percent_folding": round(stats.percent_nonpositive, 6),
        "sdlogj": round(stats.sdlogj, 6),
    }
    if loaded.labels is not None:
        fixed_labels, moving_labels = loaded.labels
        warped_labels = warp_labels_nearest(moving_labels, result.field)
        save(
            outputs["warped_labels"], warped_labels.astype(label_dtype(moving_labels)), loaded.fixed
        )
        before, after = dice_before_after(fixed_labels, moving_labels, result.field)
        measured["dice_before"], measured["dice_after"] = round(before, 4), round(after, 4)
    if "qc" in outputs:
        warped = Volume(result.warped, loaded.fixed.affine, loaded.fixed.header, outputs["warped"])
        qc_figure(
            outputs["qc"], loaded.fixed, loaded.moving, warped, result.field, loaded.pair.name
        )
    measured["seconds"] = round(prepared.seconds + time.perf_counter() - start, 2)
    return measured


def check_counts(prefetch: int, batch_size: int) -> None:
    """VitregError unless ``prefetch`` and ``batch_size`` (pairs) are at least 1."""
    for option, value in (("--prefetch", prefetch), ("--batch-size", batch_size)):
        if value < 1:
            raise VitregError(f"{option} {value}: must be at least 1")


def register_batch(
    csv_path: str | Path,
    out_dir: str | Path,
    model: VitVNet | None = None,
    frame: ModelFrame | None = None,
    weights_name: str = "none",
    optimize: int = 0,
    smoothness: float = 5.0,
    device: str = "auto",
    qc: bool = False,
    prefetch: int = 2,
    progress: Progress | None = None,
    on_record: Callable[[dict], None] | None = None,
    batch_size: int = 1,
    **register_options,
) -> BatchResult:
    """Register every pair of ``csv_path`` (see :func:`read_pairs`) into ``out_dir``.

    Per pair ``NAME``: ``NAME_warped.nii.gz``, ``NAME_flow.nii.gz`` (ITK), with labels
    ``NAME_warped_labels.nii.gz`` (nearest neighbour), with ``qc`` ``NAME_qc.png``; all on
    the fixed grid. A pair already finished in ``out_dir`` (its record in summary.json is
    'ok' with the same input files, sizes, times and settings, and its outputs exist) is
    kept, not redone. A thread loads and prepares (affine, framing) ``prefetch`` pairs ahead,
    and at least ``batch_size``; the model, when given, runs once per ``batch_size`` pairs
    (fewer where a row failed or at the end), with the results of one call per pair.
    ``progress`` gets ('pairs', done, total), ('network', ...) per call and each pair's
    optimisation steps; ``on_record`` each new record. ``register_options`` (e.g.
    ``affine=False``, ``diffeo=True``) are :class:`~vitreg.register.RegisterSettings`
    fields, and go into the settings a finished pair is recognised by (the batch size does
    not: it does not change the results).
    """
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    check_counts(prefetch, batch_size)
    frame = frame or ModelFrame()
    register_settings = RegisterSettings(
        optimize=optimize, smoothness=smoothness, **register_options
    ).checked(model, frame)
    torch_device = choose_device(device)
    pairs = read_pairs(csv_path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitregError(
            f"{out_dir}: cannot create the output folder ({error.strerror})"
        ) from None
    settings = {"weights": weights_name, "optimize": optimize, "smoothness": smoothness}
    settings.update(sorted(register_options.items()))
    previous = _read_previous(out_dir / SUMMARY_JSON)
    records: dict[int, dict] = {}
    fingerprints = {pair.row: _fingerprint(pair, settings) for pair in pairs}
    to_do = []
    for pair in pairs:
        earlier = previous.get(pair.name)
        if _is_finished(earlier, fingerprints[pair.row], pair_outputs(out_dir, pair, qc)):
            records[pair.row] = {**earlier, "row": pair.row, "resumed": True}
        else:
            to_do.append(pair)

    def ordered() -> list[dict]:
        return [records[pair.row] for pair in pairs if pair.row in records]

    def prepare(pair: PairRow) -> ReadyPair:
        loaded = load_pair(pair)
        prepared = prepare_pair(loaded.fixed, loaded.moving, frame, register_settings, torch_device)
        return ReadyPair(loaded, prepared)

    if progress is not None:
        progress("pairs", 0, len(to_do))
    done = 0
    ahead = max(prefetch, batch_size)
    with contextlib.closing(_in_background(to_do, ahead, prepare)) as ready_pairs:
        while group := list(itertools.islice(ready_pairs, batch_size)):
            prepared = _through_network(model, group, progress)
            for pair, item in group:
                outputs = pair_outputs(out_dir, pair, qc)
                record = {
                    "row": pair.row,
                    "name": pair.name,
                    "status": "ok",
                    "error": "",
                    "resumed": False,
                    **{column: str(getattr(pair, column) or "") for column in PATH_COLUMNS},
                    **{key: str(path) for key, path in outputs.items()},
                }
                try:
                    if isinstance(item, VitregError):
                        raise item
                    measured = _finish_one(
                        item.loaded, prepared[pair.row], outputs, register_settings, progress
                    )
                    record.update(measured)
                    record["fingerprint"] = fingerprints[pair.row]
                except VitregError as error:
                    message = " ".join(str(error).split())
                    record.update(status="failed", error=f"{csv_path}:{pair.row}: {message}")
                    record.update(dict.fromkeys(outputs, ""))  # a failed pair lists no outputs
                records[pair.row] = record
                _write_summary(out_dir, csv_path, settings, ordered())
                done += 1
                if on_record is not None:
                    on_record(record)
                if progress is not None:
                    progress("pairs", done, len(to_do))
    _write_summary(out_dir, csv_path, settings, ordered())
    return BatchResult(ordered(), out_dir / SUMMARY_CSV, out_dir / SUMMARY_JSON)
