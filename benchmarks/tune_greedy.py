"""Choose the greedy optimiser's defaults: mean Dice of candidate schedules on the deformed sets.

Each pair is prepared once (vitreg's affine pre-alignment and framing, as ``register`` does),
then every candidate schedule optimises it from a zero field and the result is scored like
``benchmarks/compare.py`` scores its rows (``vitreg.evaluate.field_metrics``: Dice with
nearest-neighbour label warping, % det(J) <= 0 in the mask, end-point error). Prints one JSON
line per (schedule, pair), then the mean per schedule. Give only the tuning pairs: the
deformed sets, the ``tuning`` set and the two inter-brain pairs without Colin27 (``--only``);
the pairs ``compare.py`` reports are held out.

    python benchmarks/tune_greedy.py /tmp/vitreg-sets/pairs.csv --threads 2 \\
        --sets colin27-aal,mni152-tissue,tuning \\
        --only icbm2009c_vs_mni152-fsl,mni152-fsl_vs_icbm2009c \\
        --schedule '{"sigma_update": 2.5, "compositive": true}' \\
        --schedule '{"sigma_update": 1.732, "compositive": true}'

A schedule is a JSON object of :class:`vitreg.optimize.GreedySchedule` fields; the fields it
does not give keep their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from statistics import mean

import torch

from vitreg.evaluate import field_metrics, load_pair, read_pairs
from vitreg.frame import ModelFrame
from vitreg.optimize import GreedySchedule, greedy_optimize
from vitreg.register import RegisterSettings, finish_registration, prepare_pair


def schedule_from(text: str) -> GreedySchedule:
    """A GreedySchedule from a JSON object of its fields (lists become tuples)."""
    values = json.loads(text)
    return GreedySchedule(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", help="pairs.csv from make_sets.py")
    parser.add_argument("--sets", default="colin27-aal,mni152-tissue", help="comma-separated")
    parser.add_argument("--only", help="comma-separated pair names, added to --sets' pairs")
    parser.add_argument("--schedule", action="append", required=True, help="JSON, repeatable")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = set(args.sets.split(","))
    names = set(args.only.split(",")) if args.only else set()
    pairs = [pair for pair in read_pairs(args.pairs) if pair.set in wanted or pair.name in names]
    schedules = [schedule_from(text) for text in args.schedule]
    scores: dict[int, list[float]] = {i: [] for i in range(len(schedules))}
    for pair in pairs:
        loaded = load_pair(pair)
        prepared = prepare_pair(
            loaded.fixed, loaded.moving, ModelFrame(), RegisterSettings(), torch.device("cpu")
        )
        for index, schedule in enumerate(schedules):
            start, cpu = time.perf_counter(), time.process_time()
            zero = torch.zeros(1, 3, *prepared.fixed.shape[2:])
            state = greedy_optimize(prepared.fixed, prepared.moving, zero, schedule)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            settings = RegisterSettings(
                optimize=0, diffeo=schedule.diffeo, integration_steps=schedule.integration_steps
            )
            result = finish_registration(dataclasses.replace(prepared, output=state), settings)
            metrics = field_metrics(loaded, result.field)
            scores[index].append(metrics.dice_mean)
            row = {
                "schedule": args.schedule[index],
                "pair": pair.name,
                "dice": round(metrics.dice_mean, 4),
                "percent_nonpositive": round(metrics.percent_nonpositive, 4),
                "epe_mm": None if metrics.epe_mm is None else round(metrics.epe_mm, 3),
                "optimise_seconds": round(seconds, 1),
                "optimise_cpu_seconds": round(cpu, 1),
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row), flush=True)
    for index, text in enumerate(args.schedule):
        summary = {"schedule": text, "pairs": len(scores[index])}
        summary["mean_dice"] = round(mean(scores[index]), 4) if scores[index] else None
        print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
