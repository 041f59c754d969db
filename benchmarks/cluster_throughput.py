"""Throughput of ``register-batch --scheduler local:N``: pairs per minute with N workers.

Reproduce (the figures of docs/batches.md; 2 x 4 registrations of the
example pair at 1 mm, about 3 minutes on 2 cores):

    python benchmarks/cluster_throughput.py --copies 4 --workers 1,2

The pairs are ``--copies`` rows of one pair (default: the example pair in ``examples/``,
each row under its own name, so each is registered and written in full), registered with
``--weights none`` (test-time optimisation alone, the greedy default or ``--iterations``) on
the default 160x192x224 frame at 1 mm (``--shape``/``--spacing`` shrink it for a quick check).
For each N of ``--workers`` a fresh ``LocalCluster`` of N one-thread worker processes is
started and warmed (vitreg imported on every worker: ``startup_seconds``, not counted); then
the batch runs into a fresh folder and ``pairs_per_minute`` = pairs / minutes from the first
submission to the last record. ``pair_seconds`` is the median of the pairs' own times
(registration and writing, on the worker). N = 0 is the plain run in this process, without a
scheduler. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def integers(text: str) -> tuple[int, ...]:
    return tuple(int(item) for item in text.split(","))


def copies_csv(source: Path, copies: int, folder: Path) -> Path:
    """A pairs file of ``copies`` rows of the first pair of ``source``, named copy0, ..."""
    from vitreg.pairs import read_pairs

    pair = read_pairs(source)[0]
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "fixed", "moving"])
        writer.writerows([f"copy{k}", pair.fixed, pair.moving] for k in range(copies))
    return path


def run(pairs_csv: Path, out_dir: Path, workers: int, options: dict) -> dict:
    """One batch with ``workers`` local workers (0: in this process): its throughput."""
    from vitreg.batch import register_batch
    from vitreg.cluster import DaskEngine

    startup = 0.0
    engine = DaskEngine(f"local:{workers}") if workers else None
    try:
        if engine is not None:
            start = time.perf_counter()
            engine.client().run(__import__, "vitreg.batch")
            startup = time.perf_counter() - start
        start = time.perf_counter()
        result = register_batch(pairs_csv, out_dir, "none", engine=engine, **options)
        seconds = time.perf_counter() - start
    finally:
        if engine is not None:
            engine.close()
    done = [record for record in result.records if record["status"] == "ok"]
    if len(done) != len(result.records):
        raise SystemExit(f"{len(result.records) - len(done)} pairs failed: see {out_dir}")
    return {
        "workers": workers,
        "pairs": len(done),
        "seconds": round(seconds, 3),
        "pairs_per_minute": round(60 * len(done) / seconds, 3),
        "pair_seconds": round(statistics.median(record["seconds"] for record in done), 2),
        "startup_seconds": round(startup, 2),
    }


def measure(args: argparse.Namespace) -> dict:
    """Every run of ``args.workers``, and what the figures depend on."""
    from vitreg.cluster import cpu_place
    from vitreg.frame import ModelFrame

    frame = ModelFrame(shape=args.shape, spacing=(args.spacing,) * 3)
    options = dict(frame=frame, iterations=args.iterations, levels=args.levels)
    with tempfile.TemporaryDirectory(prefix="vitreg-throughput-") as folder:
        pairs_csv = copies_csv(args.pairs, args.copies, Path(folder))
        runs = [
            run(pairs_csv, Path(folder) / f"out-{workers}", workers, options)
            for workers in args.workers
        ]
    return {
        "benchmark": "cluster_throughput",
        "pairs_csv": str(args.pairs),
        "copies": args.copies,
        "frame": {"shape": list(frame.shape), "spacing_mm": args.spacing},
        "iterations": list(args.iterations) if args.iterations else "default",
        "levels": list(args.levels) if args.levels else "default",
        "cpus": len(cpu_place()[1]),
        "load_average_before": [round(value, 2) for value in os.getloadavg()],
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=EXAMPLES / "pairs.csv")
    parser.add_argument("--copies", type=int, default=8, help="rows of the first pair")
    parser.add_argument("--workers", type=integers, default=(1, 2), help="e.g. 0,1,2")
    parser.add_argument("--iterations", type=integers, default=None, help="e.g. 100,30,10")
    parser.add_argument("--levels", type=integers, default=None, help="e.g. 4,2,1")
    parser.add_argument("--shape", type=integers, default=(160, 192, 224), help="frame grid")
    parser.add_argument("--spacing", type=float, default=1.0, help="frame voxel size, mm")
    print(json.dumps(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
