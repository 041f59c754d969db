"""The README's results table from compare.py's CSV: per set, each method's mean Dice, mean
% det J <= 0 and mean wall seconds, with the number of pairs.

    python benchmarks/readme_table.py benchmarks/RESULTS.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from statistics import fmean

SHORT_NAMES = {
    "identity (no registration)": "identity",
    "affine (SimpleITK MI)": "affine only (SimpleITK MI)",
    "vitreg": "**vitreg** (default)",
    "vitreg --diffeo": "vitreg --diffeo",
    "ANTs SyN CC radius 2 (antsRegistrationSyN recipe; SyN 100x70x50x0)": "ANTs SyN, CC (radius 2)",
    "ANTs SyN": "ANTs SyN defaults (MI)",
    "SimpleITK demons": "SimpleITK demons",
}


def table(rows: list[dict]) -> str:
    """A Markdown table: one row per method, three columns (Dice, % folding, seconds) per set."""
    sets = list(dict.fromkeys(row["set"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    counts = {s: len({r["name"] for r in rows if r["set"] == s}) for s in sets}
    head = "| method | " + " | ".join(f"{s} ({counts[s]}): Dice / % det≤0 / s" for s in sets)
    lines = [head + " |", "|---" * (len(sets) + 1) + "|"]
    for method in methods:
        cells = []
        for set_name in sets:
            mine = [r for r in rows if r["set"] == set_name and r["method"] == method]
            if not mine:
                cells.append("-")
                continue
            dice = fmean([float(r["dice_mean"]) for r in mine])
            folding = fmean([float(r["percent_nonpositive"]) for r in mine])
            seconds = fmean([float(r["seconds"]) for r in mine])
            cells.append(f"{dice:.3f} / {folding:.3f} / {seconds:.0f}")
        lines.append(f"| {SHORT_NAMES.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="RESULTS.csv written by compare.py --csv")
    args = parser.parse_args()
    with args.csv.open(newline="") as file:
        print(table(list(csv.DictReader(file))))


if __name__ == "__main__":
    main()
