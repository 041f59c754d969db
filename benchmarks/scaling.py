"""CPU forward time and peak memory against volume size and batch size, plain vs fast path.

Reproduce: ``python benchmarks/scaling.py --threads 2``. Every (path, size, batch) runs in a
fresh child process of ``benchmarks/forward.py``: ``--repeats`` timed calls (the first one
includes oneDNN's set-up, as a user's single call does) and the peak RSS of that child.
Writes ``benchmarks/scaling.md`` (a markdown table) and ``benchmarks/scaling.png`` (time and
memory against voxels), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CUBES = (96, 128, 160, 192, 224)


def measure(path: str, size: tuple[int, int, int], batch: int, args) -> dict:
    """One fresh child of forward.py for ``path`` at ``size`` and ``batch``."""
    command = [
        sys.executable, str(HERE / "forward.py"), "--child", path, "--threads",
        str(args.threads), "--repeats", str(args.repeats), "--batch", str(batch),
        "--size", *map(str, size),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], out: Path) -> None:
    """Two panels (seconds, GiB) against million voxels, one line per path, batch 1 only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for path in sorted({row["path"] for row in rows}):
        mine = [r for r in rows if r["path"] == path and r["batch"] == 1 and "error" not in r]
        voxels = [r["megavoxels"] for r in mine]
        time_axis.plot(voxels, [r["best_seconds"] for r in mine], "o-", label=path)
        memory_axis.plot(voxels, [r["peak_rss_gib"] for r in mine], "o-", label=path)
    time_axis.set(xlabel="million voxels (batch 1)", ylabel="forward seconds", title="time")
    memory_axis.set(xlabel="million voxels (batch 1)", ylabel="peak RSS GiB", title="memory")
    for axis in (time_axis, memory_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(f"ViT-V-Net CPU forward ({platform.machine()}, {rows[0]['threads']} threads)")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cubes", type=int, nargs="+", default=list(CUBES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=96, help="cube edge for batches")
    parser.add_argument("--paths", nargs="+", default=["plain", "fast"])
    args = parser.parse_args()

    configs = [(edge, 1) for edge in args.cubes]
    configs += [(args.batch_size, b) for b in args.batches if (args.batch_size, b) not in configs]
    rows = []
    for edge, batch in configs:
        for path in args.paths:
            result = measure(path, (edge, edge, edge), batch, args)
            rows.append(
                {"path": path, "size": edge, "batch": batch, "threads": args.threads,
                 "megavoxels": edge**3 / 1e6, **result}
            )  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    lines = [
        f"ViT-V-Net CPU forward, {args.threads} threads, best of {args.repeats} call(s), "
        "fresh process per row.\n",
        "| size | batch | path | seconds | s per pair | CPU s (all threads) | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']}^3 | {row['batch']} | {row['path']} | failed | | | |")
            continue
        lines.append(
            f"| {row['size']}^3 | {row['batch']} | {row['path']} | {row['best_seconds']} | "
            f"{row['best_seconds'] / row['batch']:.2f} | {min(row['cpu_seconds'])} | "
            f"{row['peak_rss_gib']} |"
        )
    table = "\n".join(lines) + "\n"
    (HERE / "scaling.md").write_text(table)
    plot(rows, HERE / "scaling.png")
    print(table)


if __name__ == "__main__":
    main()
