"""CPU forward time and peak memory of ViT-V-Net at 1x2x160x192x224; prints one JSON line.

Reproduce: ``python benchmarks/forward.py --threads 2 --repeats 2``. Peak memory is the
process's peak resident set size (``ru_maxrss``), i.e. what ``/usr/bin/time -v`` reports.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from vitreg.nets.vitvnet import VitVNet, VitVNetConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 192, 224))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VitVNet(VitVNetConfig(img_size=tuple(args.size))).eval()
    moving_fixed = torch.rand(1, 2, *args.size)
    seconds = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            flow = model(moving_fixed)
            seconds.append(time.perf_counter() - start)
            del flow
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "benchmark": "vitvnet_forward_cpu",
                "input": [1, 2, *args.size],
                "threads": args.threads,
                "seconds": [round(s, 2) for s in seconds],
                "best_seconds": round(min(seconds), 2),
                "peak_rss_gib": round(peak_kib / 2**20, 2),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpus_available": len(__import__("os").sched_getaffinity(0)),
            }
        )
    )


if __name__ == "__main__":
    main()
