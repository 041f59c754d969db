"""ViT-V-Net CPU forward, side by side: the plain fp32 forward against each faster path.

Reproduce: ``python benchmarks/forward.py --threads 2 --repeats 2``. Each path runs in a fresh
child process (so one path's memory cannot pollute another's); the child reports its repeats'
seconds and its peak resident set size (``ru_maxrss``, what ``/usr/bin/time -v`` reports),
taken before it loads the plain path's flow to compare, and the CPU time of all its threads
(``time.process_time``), a steadier figure than wall time on a shared machine. Prints a
markdown table and, with ``--json``, one JSON line per path.

Paths (all take the same random 1x2xDxHxW input and the same random model, seed 0, whose
registration head is re-drawn with std 6 so that the flow spreads over about a voxel and a
0.05-voxel tolerance means something):

- ``plain``: ``model(x)`` under ``torch.inference_mode`` (the reference, as in training code);
- ``streamed``: ``model.infer(x, channels_last=False)``: full-resolution layers in depth chunks;
- ``fast``: ``model.infer(x)``: streamed and channels-last 3D (what ``vitreg register`` runs);
- ``bf16``: ``model.bfloat16().infer(x.bfloat16())``: bfloat16 weights and activations;
- ``compile``: ``torch.compile(model)(x)``; its first call (compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("plain", "streamed", "fast", "bf16", "compile")
DEFAULT_PATHS = ("plain", "streamed", "fast", "bf16")


def build(size: tuple[int, int, int], batch: int):
    """The seeded random model (head re-drawn, see the module docstring) and input."""
    import torch

    from vitreg.nets.vitvnet import VitVNet, VitVNetConfig

    torch.manual_seed(0)
    model = VitVNet(VitVNetConfig(img_size=size)).eval()
    with torch.no_grad():
        model.reg_head[0].weight.normal_(std=6.0)
    return model, torch.rand(batch, 2, *size)


def run_path(path: str, model, moving_fixed):
    """A callable running one path once, returning the flow as float32."""
    import torch

    if path == "plain":
        return lambda: model(moving_fixed)
    if path == "streamed":
        return lambda: model.infer(moving_fixed, channels_last=False)
    if path == "fast":
        return lambda: model.infer(moving_fixed)
    if path == "bf16":
        model_bf16, input_bf16 = model.bfloat16(), moving_fixed.bfloat16()
        return lambda: model_bf16.infer(input_bf16).float()
    if path == "compile":
        compiled = torch.compile(model)
        return lambda: compiled(moving_fixed)
    raise ValueError(path)


def child(args: argparse.Namespace) -> None:
    """Run one path in this (fresh) process and print one JSON line."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    model, moving_fixed = build(tuple(args.size), args.batch)
    forward = run_path(args.child, model, moving_fixed)
    seconds, first_call = [], None
    with torch.inference_mode():
        if args.child == "compile":
            start = time.perf_counter()
            forward()
            first_call = time.perf_counter() - start
        cpu_seconds = []
        for _ in range(args.repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            flow = forward()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "path": args.child,
        "seconds": [round(s, 2) for s in seconds],
        "best_seconds": round(min(seconds), 2),
        "cpu_seconds": [round(s, 2) for s in cpu_seconds],
        "peak_rss_gib": round(peak_gib, 2),
        "flow_std_vox": round(float(flow.float().std()), 3),
    }
    if args.child == "compile":
        result["first_call_seconds"] = round(first_call, 1)
    if args.save_flow:
        np.save(args.save_flow, flow.float().numpy())
    elif args.reference:
        reference = torch.from_numpy(np.load(args.reference))
        result["max_flow_diff_vox"] = float((flow.float() - reference).abs().max())
    print(json.dumps(result))


def run_child(path: str, args: argparse.Namespace, flow_file: Path, first: bool) -> dict:
    """Spawn a fresh interpreter for ``path``; the first one saves the reference flow."""
    command = [
        sys.executable,
        __file__,
        "--child",
        path,
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--batch",
        str(args.batch),
        "--size",
        *map(str, args.size),
    ]
    command += ["--save-flow", str(flow_file)] if first else ["--reference", str(flow_file)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"path": path, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """Markdown table with ratios to the plain path."""
    plain = results[0]
    lines = [
        "| path | forward s (repeats) | x faster | CPU s (all threads) | peak RSS GiB | "
        "x less memory | max abs flow diff (vox) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['path']} | failed: {row['error']} | | | | | |")
            continue
        diff = row.get("max_flow_diff_vox")
        extra = ""
        if "first_call_seconds" in row:
            extra = f" (+{row['first_call_seconds']} s compiling)"
        lines.append(
            f"| {row['path']} | {' / '.join(map(str, row['seconds']))}{extra} | "
            f"{plain['best_seconds'] / row['best_seconds']:.2f} | "
            f"{' / '.join(map(str, row['cpu_seconds']))} | {row['peak_rss_gib']} | "
            f"{plain['peak_rss_gib'] / row['peak_rss_gib']:.2f} | "
            f"{'reference' if diff is None else f'{diff:.2e}'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 192, 224))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(DEFAULT_PATHS))
    parser.add_argument("--json", action="store_true", help="also print one JSON line a path")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--save-flow", help=argparse.SUPPRESS)
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    paths = ["plain"] + [p for p in args.paths if p != "plain"]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        flow_file = Path(folder) / "plain_flow.npy"
        for index, path in enumerate(paths):
            results.append(run_child(path, args, flow_file, first=index == 0))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
    print(
        f"ViT-V-Net forward, input {args.batch}x2x{'x'.join(map(str, args.size))}, "
        f"{args.threads} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPUs available\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
