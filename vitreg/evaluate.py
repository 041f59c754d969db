"""Evaluate registration on a list of pairs: Dice, folding, end-point error, time and memory.

A pairs file is a CSV with a header; ``fixed`` and ``moving`` are required, the other
columns optional: ``fixed_labels``/``moving_labels`` (label maps on the images' grids),
``true_flow`` (the ground-truth pull field on the fixed grid, ITK or voxel format as
:func:`vitreg.field.load_flow` reads), ``mask`` (where folding, end-point error and
correlation are measured; default the fixed image's foreground), ``lut`` (label names,
'index name' lines; default FreeSurfer), ``set`` (the group a pair is summarised in) and
``name``. Relative paths are relative to the CSV's folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitreg.errors import VitregError
from vitreg.field import (
    DisplacementField,
    check_same_grid,
    load_flow,
    warp_image,
    warp_labels_nearest,
)
from vitreg.frame import foreground_mask
from vitreg.image import Volume, atomic_path, load_image, load_labels
from vitreg.labels import FREESURFER_ASEG, read_lut, structure_group
from vitreg.metrics import dice_per_label, folding, jacobian_determinant
from vitreg.register import Progress, register

PATH_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "true_flow", "mask", "lut")
SUMMARY_METRICS = (
    "dice_mean",
    "percent_nonpositive",
    "count_nonpositive",
    "sdlogj",
    "epe_mm",
    "correlation_before",
    "correlation_after",
    "seconds",
    "cpu_seconds",
    "peak_memory_mib",
)
MEMORY_SAMPLE_SECONDS = 0.02


@dataclass(frozen=True)
class Pair:
    """One row of a pairs file, paths resolved; optional files are None when absent."""

    name: str
    set: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    true_flow: Path | None = None
    mask: Path | None = None
    lut: Path | None = None


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a pairs CSV (see the module docstring); a malformed file is a user error."""
    path = Path(path)
    if not path.is_file():
        raise VitregError(f"{path}: no such pairs file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"fixed", "moving"} <= columns:
            raise VitregError(f"{path}: the header must name the columns fixed and moving")
        pairs = []
        for number, row in enumerate(reader, start=2):
            values = {key: (row.get(key) or "").strip() for key in columns}
            if not values["fixed"] or not values["moving"]:
                raise VitregError(f"{path}:{number}: fixed and moving must both be given")
            if bool(values.get("fixed_labels")) != bool(values.get("moving_labels")):
                raise VitregError(f"{path}:{number}: fixed_labels and moving_labels go together")
            files = {
                key: (path.parent / values[key]) if values.get(key) else None
                for key in PATH_COLUMNS
            }
            for key, file in files.items():
                if file is not None and not file.exists():
                    raise VitregError(f"{path}:{number}: {key} {file}: no such file")
            pairs.append(
                Pair(
                    name=values.get("name") or f"pair{len(pairs) + 1}",
                    set=values.get("set") or "all",
                    **files,
                )
            )
    if not pairs:
        raise VitregError(f"{path}: no pairs listed")
    names = [pair.name for pair in pairs]
    if len(set(names)) != len(names):
        raise VitregError(f"{path}: pair names must be unique")
    return pairs


# ------------------------------------------------------------------------------------ memory


def _max_rss_mib() -> float:
    """The process's peak resident set size so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _current_rss_mib() -> float:
    """The resident set size now (Linux /proc), or 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class PeakMemory:
    """Peak memory inside a ``with`` block: host RSS in MiB, and CUDA max allocated if used.

    RSS is sampled every 20 ms by a thread; if the process's lifetime peak (ru_maxrss) rose
    inside the block, that exact figure is used instead (it covers native code that holds
    the GIL, such as ITK). ``peak_mib`` is CUDA's figure on a GPU, else RSS.
    """

    device: str = "cpu"
    rss_mib: float = 0.0
    cuda_mib: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _max_rss_before: float = field(default=0.0, repr=False)

    @property
    def peak_mib(self) -> float:
        return self.cuda_mib if self.cuda_mib is not None else self.rss_mib

    def _sample(self) -> None:
        while not self._stop.wait(MEMORY_SAMPLE_SECONDS):
            self.rss_mib = max(self.rss_mib, _current_rss_mib())

    def __enter__(self) -> PeakMemory:
        self._max_rss_before = _max_rss_mib()
        self.rss_mib = _current_rss_mib()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.rss_mib = max(self.rss_mib, _current_rss_mib())
        max_rss_after = _max_rss_mib()
        if max_rss_after > self._max_rss_before:
            self.rss_mib = max_rss_after
        if self.device.startswith("cuda"):
            self.cuda_mib = torch.cuda.max_memory_allocated(self.device) / 2**20


# ------------------------------------------------------------------------------------ metrics


@dataclass(frozen=True)
class LoadedPair:
    """A pair's volumes, on disk-checked grids; ``mask`` is (X, Y, Z) bool on the fixed grid."""

    pair: Pair
    fixed: Volume
    moving: Volume
    fixed_labels: Volume | None
    moving_labels: Volume | None
    true_field: DisplacementField | None
    mask: np.ndarray
    names: dict[int, str]


def load_pair(pair: Pair) -> LoadedPair:
    """Read every file of ``pair`` and check that the fixed-side files share the fixed grid."""
    fixed, moving = load_image(pair.fixed), load_image(pair.moving)
    fixed_labels = moving_labels = None
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        fixed_labels = load_labels(pair.fixed_labels)
        moving_labels = load_labels(pair.moving_labels)
        check_same_grid(fixed, fixed_labels)
    true_field = None
    if pair.true_flow is not None:
        true_field = load_flow(pair.true_flow)
        check_same_grid(fixed, true_field.grid)
    if pair.mask is not None:
        mask_volume = load_labels(pair.mask)
        check_same_grid(fixed, mask_volume)
        mask = mask_volume.data > 0
    else:
        mask = foreground_mask(fixed.data)
    if not mask.any():
        raise VitregError(f"{pair.mask or pair.fixed}: the mask is empty")
    names = read_lut(pair.lut) if pair.lut is not None else FREESURFER_ASEG
    return LoadedPair(pair, fixed, moving, fixed_labels, moving_labels, true_field, mask, names)


def end_point_error(
    estimate: DisplacementField, truth: DisplacementField, mask: np.ndarray | None = None
) -> float:
    """Mean length in mm of ``estimate - truth`` (both on one grid), over ``mask`` voxels.

    ``mask`` is (X, Y, Z) bool on the grid; None means every voxel.
    """
    check_same_grid(truth.grid, estimate.grid)
    error = (estimate.disp_mm.float() - truth.disp_mm.float())[0].norm(dim=0).numpy()
    return float(error[mask].mean() if mask is not None else error.mean())


def correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two (X, Y, Z) images over ``mask`` voxels (0 if one is flat)."""
    first, second = a[mask].astype(np.float64), b[mask].astype(np.float64)
    first, second = first - first.mean(), second - second.mean()
    norm = math.sqrt(float((first**2).sum() * (second**2).sum()))
    return float((first * second).sum() / norm) if norm > 0 else 0.0


def group_dice(scores: dict[int, float], names: dict[int, str]) -> dict[str, float]:
    """Mean Dice per structure with left and right merged (as the paper's Figure 5)."""
    members: dict[str, list[float]] = {}
    for label, score in scores.items():
        members.setdefault(structure_group(names.get(label, str(label))), []).append(score)
    return {group: float(np.mean(values)) for group, values in members.items()}


@dataclass(frozen=True)
class PairMetrics:
    """Accuracy and regularity of one registration; ``None`` where the pair lacks the input."""

    dice: dict[int, float] | None
    dice_mean: float | None
    count_nonpositive: int
    percent_nonpositive: float
    sdlogj: float
    epe_mm: float | None
    correlation_before: float
    correlation_after: float


def field_metrics(
    loaded: LoadedPair, field: DisplacementField, device: torch.device | str = "cpu"
) -> PairMetrics:
    """Metrics of a pull field on the fixed grid, whichever method produced it.

    Labels are warped with nearest neighbour, Jacobian determinants are taken on the fixed
    grid's voxels and counted in the mask, end-point error and image correlation (fixed
    against the warped moving image, trilinear) are measured in the mask.
    """
    check_same_grid(loaded.fixed, field.grid)
    dice = None
    if loaded.fixed_labels is not None and loaded.moving_labels is not None:
        warped_labels = warp_labels_nearest(loaded.moving_labels, field, device)
        dice = dice_per_label(loaded.fixed_labels.data, warped_labels)
    jacdet = jacobian_determinant(field.to_voxels()[0].numpy())
    fold = folding(jacdet, loaded.mask)
    identity = DisplacementField(disp_mm=torch.zeros_like(field.disp_mm), grid=field.grid)
    before = warp_image(loaded.moving, identity, device)
    after = warp_image(loaded.moving, field, device)
    return PairMetrics(
        dice=dice.scores if dice is not None else None,
        dice_mean=dice.mean if dice is not None else None,
        count_nonpositive=fold.count_nonpositive,
        percent_nonpositive=fold.percent_nonpositive,
        sdlogj=fold.sdlogj,
        epe_mm=(
            end_point_error(field, loaded.true_field, loaded.mask)
            if loaded.true_field is not None
            else None
        ),
        correlation_before=correlation(loaded.fixed.data, before, loaded.mask),
        correlation_after=correlation(loaded.fixed.data, after, loaded.mask),
    )


# ------------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class PairResult:
    """One evaluated pair: its metrics, the registration's wall and CPU time, peak memory.

    ``cpu_seconds`` is the process's CPU time over all its threads (``time.process_time``)
    during the registration: less sensitive than wall time to other load on the machine.
    """

    pair: Pair
    names: dict[int, str]
    metrics: PairMetrics
    seconds: float
    peak_memory_mib: float
    memory_kind: str
    device: str
    cpu_seconds: float | None = None

    def row(self) -> dict:
        """Flat dict of the scalar results (one CSV row)."""
        values = {key: value for key, value in asdict(self.metrics).items() if key != "dice"}
        return {
            "set": self.pair.set,
            "name": self.pair.name,
            **values,
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "peak_memory_mib": self.peak_memory_mib,
            "memory_kind": self.memory_kind,
            "device": self.device,
        }


def measure(
    loaded: LoadedPair,
    run: Callable[[], DisplacementField],
    device: str = "cpu",
) -> PairResult:
    """Time ``run`` (which registers ``loaded``) and measure its peak memory, then score it."""
    memory = PeakMemory(device)
    with memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        result_field = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return PairResult(
        pair=loaded.pair,
        names=loaded.names,
        metrics=field_metrics(loaded, result_field, device),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_memory_mib=memory.peak_mib,
        memory_kind="cuda max allocated" if memory.cuda_mib is not None else "host rss",
        device=device,
    )


def evaluate(
    pairs: Sequence[Pair], progress: Progress | None = None, **register_options: object
) -> list[PairResult]:
    """Register every pair with :func:`vitreg.register.register` and score it.

    ``register_options`` go to ``register`` unchanged (``model``, ``frame``, ``optimize``,
    ``smoothness``, ``device`` and any later option); ``progress`` sees ('pairs', done,
    total) and the registration's own stages.
    """
    results = []
    for done, pair in enumerate(pairs):
        if progress is not None:
            progress("pairs", done, len(pairs))
        loaded = load_pair(pair)
        device = str(register_options.get("device", "auto"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"

        def run(loaded: LoadedPair = loaded) -> DisplacementField:
            registration = register(
                loaded.fixed, loaded.moving, progress=progress, **register_options
            )
            return registration.field

        results.append(measure(loaded, run, device))
    if progress is not None:
        progress("pairs", len(pairs), len(pairs))
    return results


# ------------------------------------------------------------------------------------ summary


def mean_sd(values: Sequence[float]) -> dict:
    """{'mean', 'sd', 'n'} of the values (sample sd, 0 for one value); None when empty."""
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    sd = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "sd": sd, "n": int(array.size)}


def summarise(results: Sequence[PairResult]) -> dict:
    """Per set and over all pairs: mean and sd of every scalar metric, of every structure's
    Dice and of every left/right-merged group's Dice."""
    sets: dict[str, list[PairResult]] = {}
    for result in results:
        sets.setdefault(result.pair.set, []).append(result)
    if len(sets) > 1:
        sets["all"] = list(results)
    summary = {}
    for set_name, members in sets.items():
        rows = [member.row() for member in members]
        structures: dict[str, list[float]] = {}
        groups: dict[str, list[float]] = {}
        for member in members:
            for label, score in (member.metrics.dice or {}).items():
                structures.setdefault(member.names.get(label, str(label)), []).append(score)
            for group, score in group_dice(member.metrics.dice or {}, member.names).items():
                groups.setdefault(group, []).append(score)
        summary[set_name] = {
            "pairs": len(members),
            **{
                metric: mean_sd([row[metric] for row in rows if row[metric] is not None])
                for metric in SUMMARY_METRICS
            },
            "structures": {name: mean_sd(scores) for name, scores in structures.items()},
            "groups": {name: mean_sd(scores) for name, scores in groups.items()},
        }
    return summary


def dice_rows(results: Sequence[PairResult], groups: bool = False) -> list[dict]:
    """Long-format Dice rows: one per pair and structure (or left/right-merged group)."""
    rows = []
    for result in results:
        scores = result.metrics.dice or {}
        if groups:
            for group, score in group_dice(scores, result.names).items():
                rows.append(
                    {"set": result.pair.set, "name": result.pair.name, "label": "",
                     "structure": group, "dice": score}
                )  # fmt: skip
            continue
        for label, score in scores.items():
            rows.append(
                {"set": result.pair.set, "name": result.pair.name, "label": label,
                 "structure": result.names.get(label, str(label)), "dice": score}
            )  # fmt: skip
    return rows


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_results(
    out_dir: str | Path, results: Sequence[PairResult], summary: dict, groups: bool = False
) -> dict[str, Path]:
    """Write ``results.csv`` (one row per pair), ``dice.csv`` (per structure, or per group)
    and ``summary.json`` into ``out_dir`` (created), each atomically."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitregError(f"{out_dir}: cannot create the folder ({error.strerror})") from None
    texts = {
        "results": ("results.csv", _csv_text([result.row() for result in results])),
        "dice": ("dice.csv", _csv_text(dice_rows(results, groups))),
        "summary": ("summary.json", json.dumps(summary, indent=2) + "\n"),
    }
    written = {}
    for key, (name, text) in texts.items():
        with atomic_path(out_dir / name) as temporary:
            temporary.write_text(text, newline="")
        written[key] = out_dir / name
    return written
