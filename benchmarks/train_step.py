"""Time and peak memory of one ViT-V-Net training step (the paper's recipe); table + JSON.

The step is :func:`vitreg.train.train_step`: forward (bf16 autocast on CUDA), MSE + 0.02 x
diffusion, backward, Adam (amsgrad). Random images, published configuration at ``--size``.
Peak memory: ``torch.cuda.max_memory_allocated`` (and reserved) on CUDA, the process's peak
RSS (``ru_maxrss``) on CPU. The paper reports 18.5 GiB of GPU memory for ViT-V-Net training.

Reproduce: ``python benchmarks/train_step.py`` (160x192x224, batch 2, CUDA if present);
on a small CPU machine ``python benchmarks/train_step.py --size 96 128 128 --batch 1 --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch

from vitreg.data import TrainBatch
from vitreg.device import choose_device
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig
from vitreg.train import TrainRecipe, train_step


def machine(device: torch.device) -> str:
    """CPU model and count, and the GPU's name, in words."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if "model name" in line]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu} ({len(os.sched_getaffinity(0))} cores available)"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, nargs=3, default=(160, 192, 224))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument(
        "--checkpoint-activations", action="store_true", help="recompute in the backward pass"
    )
    args = parser.parse_args()

    device = choose_device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    recipe = TrainRecipe(
        batch_size=args.batch,
        bf16=not args.no_bf16,
        checkpoint_activations=args.checkpoint_activations,
    )
    model = VitVNet(VitVNetConfig(img_size=tuple(args.size))).to(device).train()
    model.checkpoint_activations(recipe.checkpoint_activations)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, amsgrad=recipe.amsgrad)
    shape = (args.batch, 1, *args.size)
    fixed, moving = torch.rand(shape, device=device), torch.rand(shape, device=device)
    batch = TrainBatch(fixed=fixed, moving=moving)

    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    train_step(model, optimizer, batch, recipe)  # warm-up: allocator, cuDNN/oneDNN plans
    synchronise()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, batch, recipe)
        synchronise()
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = {
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        }
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = {"peak_rss_gib": round(peak_kib / 2**20, 2)}
    result = {
        "benchmark": "vitvnet_train_step",
        "input": [args.batch, 2, *args.size],
        "device": str(device),
        "bf16": recipe.bf16 and device.type == "cuda",
        "checkpoint_activations": recipe.checkpoint_activations,
        "threads": args.threads if device.type == "cpu" else None,
        "seconds": [round(s, 3) for s in seconds],
        "median_seconds": round(statistics.median(seconds), 3),
        **peak,
        "torch": torch.__version__,
        "machine": machine(device),
    }
    print(f"{'input':<26}{'device':<8}{'median s/step':>14}  peak memory")
    memory = ", ".join(f"{k} {v}" for k, v in peak.items())
    shape_text = "x".join(map(str, result["input"]))
    print(f"{shape_text:<26}{device.type:<8}{result['median_seconds']:>14}  {memory}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
