"""Evaluate registration on a list of pairs: Dice, folding, end-point error, time and memory.

The pairs file is the one :mod:`vitreg.pairs` reads: ``fixed`` and ``moving``, optional
``fixed_labels``/``moving_labels``, ``true_flow`` (the ground-truth pull field on the fixed
grid), ``mask`` (where folding, end-point error and correlation are measured; default the
fixed image's foreground), ``lut`` (label names), ``set`` (the group a pair is summarised in)
and ``name``. Every row is checked before the first registration.

With an ``engine`` (:mod:`vitreg.engine`; :class:`vitreg.cluster.DaskEngine`) the pairs are
registered and scored by :class:`EvaluateWork` wherever the engine runs it; the results are
summarised here in the pairs file's order.
"""

from __future__ import annotations

import json
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

from vitreg.assess import assess
from vitreg.device import choose_device
from vitreg.engine import PairEngine, load_source, model_source
from vitreg.errors import VitregError
from vitreg.field import DisplacementField, check_same_grid, warp_image
from vitreg.files import csv_text, make_folder, write_text
from vitreg.frame import ModelFrame
from vitreg.labels import structure_group
from vitreg.metrics import correlation
from vitreg.nets.vitvnet import VitVNet
from vitreg.pairs import LoadedPair, Pair, check_pairs, load_pair, read_pairs
from vitreg.register import Progress, RegisterSettings, register, settings_from
from vitreg.weights import load_model

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

    :func:`vitreg.assess.assess` gives Dice (labels warped by nearest neighbour), folding and
    SDlogJ (det J on the fixed grid's voxels, counted in the mask) and the end-point error
    in the mask; the image correlation (fixed against the warped moving image, trilinear) is
    measured in the mask too.
    """
    check_same_grid(loaded.fixed, field.grid)
    measured = assess(
        field, loaded.fixed, loaded.labels, loaded.mask, loaded.true_field, device=device
    )
    dice = measured.dice_after
    identity = DisplacementField(disp_mm=torch.zeros_like(field.disp_mm), grid=field.grid)
    before = warp_image(loaded.moving, identity, device)
    after = warp_image(loaded.moving, field, device)
    return PairMetrics(
        dice=dice.scores if dice is not None else None,
        dice_mean=dice.mean if dice is not None else None,
        count_nonpositive=measured.folding.count_nonpositive,
        percent_nonpositive=measured.folding.percent_nonpositive,
        sdlogj=measured.folding.sdlogj,
        epe_mm=measured.epe_mm,
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
    pairs: Sequence[Pair],
    model: VitVNet | None = None,
    frame: ModelFrame | None = None,
    settings: RegisterSettings | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    **register_options: object,
) -> list[PairResult]:
    """Register every pair with :func:`vitreg.register.register` and score it.

    ``settings`` (or, instead, its fields as ``register_options``) and ``model``, ``frame``
    and ``device`` go to ``register``; ``progress`` sees ('pairs', done, total) and the
    registration's own stages.
    """
    settings = settings_from(settings, register_options)
    device_name = str(choose_device(device))
    results = []
    for done, pair in enumerate(pairs):
        if progress is not None:
            progress("pairs", done, len(pairs))
        results.append(evaluate_pair(pair, model, frame, settings, device_name, progress))
    if progress is not None:
        progress("pairs", len(pairs), len(pairs))
    return results


def evaluate_pair(
    pair: Pair,
    model: VitVNet | None,
    frame: ModelFrame | None,
    settings: RegisterSettings,
    device_name: str,
    progress: Progress | None = None,
) -> PairResult:
    """Load ``pair``, register it with :func:`vitreg.register.register` and score it."""
    loaded = load_pair(pair)

    def run() -> DisplacementField:
        registration = register(
            loaded.fixed, loaded.moving, model, frame, device=device_name, progress=progress,
            settings=settings, fixed_mask=loaded.fixed_mask, moving_mask=loaded.moving_mask,
        )  # fmt: skip
        return registration.field

    return measure(loaded, run, device_name)


@dataclass(frozen=True)
class EvaluateWork:
    """One pair evaluated where an engine runs it (picklable, see :mod:`vitreg.engine`).

    ``model``: what :func:`vitreg.engine.load_source` loads once per process; ``device``: as
    the ``device`` option ('auto' picks each worker's own). Time, CPU time and peak memory
    are the worker process's: a worker that runs several pairs at once counts them all.
    """

    model: VitVNet | Path | None
    frame: ModelFrame
    settings: RegisterSettings
    device: str

    def load(self) -> VitVNet | None:
        return load_source(self.model, self.frame)

    def __call__(self, network: VitVNet | None, pair: Pair) -> PairResult:
        device_name = str(choose_device(self.device))
        return evaluate_pair(pair, network, self.frame, self.settings, device_name)

    def failure(self, pair: Pair, message: str) -> PairResult:
        """An evaluation has no failed rows: the pair's problem stops it."""
        raise VitregError(f"{pair.where}: {message}")


def evaluate_elsewhere(
    engine: PairEngine, work: EvaluateWork, pairs: Sequence[Pair], progress: Progress | None
) -> list[PairResult]:
    """Every pair evaluated by ``engine`` running ``work``; the results in ``pairs``' order."""
    results: dict[int, PairResult] = {}
    if progress is not None:
        progress("pairs", 0, len(pairs))
    for position, (pair, result) in enumerate(engine(work, pairs), start=1):
        results[pair.row] = result
        if progress is not None:
            progress("pairs", position, len(pairs))
    return [results[pair.row] for pair in pairs]


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_csv` did: the results per pair, their summary and the files."""

    results: list[PairResult]
    summary: dict
    written: dict[str, Path]


def evaluate_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    model: VitVNet | str | Path | None = None,
    frame: ModelFrame | None = None,
    settings: RegisterSettings | None = None,
    device: str = "auto",
    groups: bool = False,
    progress: Progress | None = None,
    offline: bool | None = None,
    engine: PairEngine | None = None,
) -> Evaluation:
    """``vitreg evaluate`` in one call: check every row of the pairs file, load ``model`` (a
    network, or a checkpoint name or path with its frame), evaluate (here, or by ``engine``
    where it runs :class:`EvaluateWork`), summarise and write (:func:`write_results`)."""
    settings = settings or RegisterSettings()
    choose_device(device)
    pairs = read_pairs(csv_path)
    check_pairs(pairs)
    for pair in pairs:
        settings.check_masks(pair.fixed_mask, pair.moving_mask)
    network, frame = load_model(model, frame, offline)
    if engine is None:
        results = evaluate(pairs, network, frame, settings, device, progress)
    else:
        settings.checked(network, frame)
        work = EvaluateWork(model_source(model, network, offline), frame, settings, device)
        results = evaluate_elsewhere(engine, work, pairs, progress)
    summary = summarise(results)
    return Evaluation(results, summary, write_results(out_dir, results, summary, groups))


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


def write_results(
    out_dir: str | Path, results: Sequence[PairResult], summary: dict, groups: bool = False
) -> dict[str, Path]:
    """Write ``results.csv`` (one row per pair), ``dice.csv`` (per structure, or per group)
    and ``summary.json`` into ``out_dir`` (created), each atomically."""
    out_dir = make_folder(out_dir)
    texts = {
        "results": ("results.csv", csv_text([result.row() for result in results])),
        "dice": ("dice.csv", csv_text(dice_rows(results, groups))),
        "summary": ("summary.json", json.dumps(summary, indent=2) + "\n"),
    }
    return {key: write_text(out_dir / name, text) for key, (name, text) in texts.items()}
