"""A batch split over independent jobs (a job array): which pairs a shard takes, and the
check that the shards' summaries, merged, hold every pair exactly once.

Shard ``K/N`` (``0 <= K < N``, as ``$SLURM_ARRAY_TASK_ID`` counts) takes the pairs at
positions K, K + N, K + 2N, ... of the pairs file (0-based, in file order), so shards differ
by at most one pair and a pair's shard follows from its position alone. Each shard writes
``summary.shard-K-of-N.json`` (and ``.csv``) beside the outputs, holding besides its records
the shard's place (``shard``: ``index``, ``count``, ``pairs_in_csv`` and the names of the
pairs it was given), so the merge needs nothing but the summaries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vitreg.errors import OptionError, VitregError
from vitreg.pairs import Pair

SHARD_SUMMARY_GLOB = "summary.shard-*-of-*.json"
SHARD_PATTERN = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
NAMES_SHOWN = 10
"""How many pair names an error lists before '(and N more)'."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count) of a batch."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise OptionError("shard", f"{self.index}/{self.count}", "expected K/N with 0 <= K < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``'3/100'`` -> Shard(3, 100); OptionError naming ``shard`` otherwise."""
        match = SHARD_PATTERN.fullmatch(text)
        if match is None:
            raise OptionError("shard", text, "expected K/N with 0 <= K < N, e.g. 0/10")
        return cls(int(match[1]), int(match[2]))

    @property
    def stem(self) -> str:
        """The shard's summary files without suffix: ``summary.shard-K-of-N``."""
        return f"summary.shard-{self.index}-of-{self.count}"

    def select(self, pairs: Sequence[Pair]) -> list[Pair]:
        """The shard's pairs: every ``count``-th from position ``index`` (0-based)."""
        return list(pairs[self.index :: self.count])

    def header(self, pairs: Sequence[Pair]) -> dict:
        """What the shard's summary records about its place among all ``pairs`` of the file."""
        return {
            "index": self.index,
            "count": self.count,
            "pairs_in_csv": len(pairs),
            "pairs": [pair.name for pair in self.select(pairs)],
        }


def read_shard_summaries(folders: Sequence[str | Path]) -> dict[Path, dict]:
    """Every ``summary.shard-K-of-N.json`` in ``folders``, read, by path (sorted).

    VitregError for a folder that does not exist, a folder list without any shard summary,
    or a summary that cannot be read or lacks its shard header.
    """
    summaries = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise VitregError(f"{folder}: no such folder")
        for path in sorted(folder.glob(SHARD_SUMMARY_GLOB)):
            summaries[path] = _read_summary(path)
    if not summaries:
        shown = ", ".join(map(str, folders))
        raise VitregError(f"{shown}: no shard summaries ({SHARD_SUMMARY_GLOB}) found")
    return summaries


def _read_summary(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        shard, records = report["shard"], report["pairs"]
        for key in ("index", "count", "pairs_in_csv", "pairs"):
            shard[key]  # noqa: B018 (a KeyError here means: not a shard summary)
        names = [record["name"] for record in records]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise VitregError(f"{path}: not a readable shard summary ({error!r})") from None
    if len(set(names)) != len(names):
        raise VitregError(f"{path}: a pair is recorded twice in one summary")
    return report


def _names(names: Sequence[str]) -> str:
    """Up to NAMES_SHOWN names, then how many more."""
    shown = ", ".join(names[:NAMES_SHOWN])
    more = len(names) - NAMES_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def _one_value(summaries: dict[Path, dict], what: str, value_of: Callable[[dict], object]):
    """The value all summaries agree on; VitregError naming one file of each value."""
    values: dict[str, tuple[object, Path]] = {}
    for path, report in summaries.items():
        value = value_of(report)
        values.setdefault(json.dumps(value, sort_keys=True), (value, path))
    if len(values) > 1:
        listed = "; ".join(f"{path}: {value}" for value, path in values.values())
        raise VitregError(f"the shard summaries differ in {what}: {listed}")
    return next(iter(values.values()))[0]


def _shard_problems(summaries: dict[Path, dict], count: int, total: int) -> list[str]:
    """Shards with two summaries or none."""
    problems = []
    by_index: dict[int, list[Path]] = {}
    for path, report in summaries.items():
        by_index.setdefault(report["shard"]["index"], []).append(path)
    for index, paths in sorted(by_index.items()):
        if len(paths) > 1:
            listed = ", ".join(map(str, paths))
            problems.append(f"shard {index} of {count} has {len(paths)} summaries: {listed}")
    absent = [index for index in range(count) if index not in by_index]
    if absent:
        never = sum(len(range(index, total, count)) for index in absent)
        problems.append(
            f"no summary of shard {', '.join(map(str, absent))} of {count} ({never} pairs "
            f"never registered: run each with --shard K/{count})"
        )
    return problems


def _pair_problems(summaries: dict[Path, dict], count: int) -> list[str]:
    """Pairs a shard was given but did not record, recorded but not given, or recorded by
    two shards."""
    problems = []
    recorded_in: dict[str, list[Path]] = {}
    for path, report in summaries.items():
        index, given = report["shard"]["index"], report["shard"]["pairs"]
        recorded = [record["name"] for record in report["pairs"]]
        for name in recorded:
            recorded_in.setdefault(name, []).append(path)
        missing = sorted(set(given) - set(recorded), key=given.index)
        if missing:
            problems.append(
                f"{path}: {len(missing)} of the {len(given)} pairs of shard {index} not done "
                f"(rerun it with --shard {index}/{count}): {_names(missing)}"
            )
        foreign = sorted(set(recorded) - set(given))
        if foreign:
            problems.append(f"{path}: pairs not given to shard {index}: {_names(foreign)}")
    twice = sorted(name for name, paths in recorded_in.items() if len(paths) > 1)
    if twice:
        problems.append(f"{len(twice)} pairs recorded by two shards: {_names(twice)}")
    return problems


def merged_records(summaries: dict[Path, dict]) -> tuple[list[dict], dict]:
    """The records of all shards in CSV order, and what the shards share: ``csv``,
    ``settings``, ``shards`` (N) and ``pairs_in_csv``.

    Checks that the shards come from one pairs file and one set of settings, that each shard
    0..N-1 has exactly one summary, and that each pair given to a shard has exactly one
    record; otherwise one VitregError lists every hole and every duplicate, by name.
    """
    count = _one_value(summaries, "the shard count N", lambda r: r["shard"]["count"])
    total = _one_value(summaries, "the number of pairs", lambda r: r["shard"]["pairs_in_csv"])
    csv = _one_value(summaries, "the pairs file", lambda r: r.get("csv"))
    settings = _one_value(summaries, "the settings", lambda r: r.get("settings"))
    problems = _shard_problems(summaries, count, total) + _pair_problems(summaries, count)
    given = [name for report in summaries.values() for name in report["shard"]["pairs"]]
    if not problems and (len(set(given)) != len(given) or len(given) != total):
        problems.append(
            f"the pairs given to the shards are not the {total} pairs of the pairs file, each "
            "once (did the file change between the shards' runs?)"
        )
    if problems:
        raise VitregError(f"cannot merge: {len(problems)} problem(s): " + "; ".join(problems))
    records = [record for report in summaries.values() for record in report["pairs"]]
    shared = {"csv": csv, "settings": settings, "shards": count, "pairs_in_csv": total}
    return sorted(records, key=lambda record: record["row"]), shared
