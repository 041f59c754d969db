"""ViT-V-Net on a CUDA GPU: per-pair inference latency and a training step's time and memory.

Reproduce: ``python benchmarks/gpu.py`` (about 3-6 minutes on an H100, most of it
``torch.compile``; ``--no-compile`` skips that). Without CUDA it prints one line saying so and
exits 0. Prints markdown tables and, with ``--json``, one JSON line per row.

Inference (published size 160x192x224, the seeded random model with its registration head
re-drawn with std 6 so the flow spreads over about a voxel): per call latency measured
between ``torch.cuda.synchronize()`` calls, median of ``--iterations`` after ``--warmup``, at
batch 1 and at each batch of ``--batches`` (per pair = latency / batch). Paths: ``fp32``
(TF32 off: true fp32), ``tf32`` (PyTorch's default for cuDNN convolutions), ``bf16`` (autocast),
each in channels-last 3D, and ``bf16+graphs`` (``torch.compile(mode="reduce-overhead")``, which
captures CUDA graphs). The max flow difference to the fp32 path is stated for each.

Training step at batch 2 (forward, local NCC + diffusion loss as in the paper, backward, Adam):
``plain fp32`` (the official recipe's computation) against ``bf16 + activation checkpointing``;
seconds per step, pairs per second and ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SIZE = (160, 192, 224)


def seeded_model():
    """Seed 0 published-size model, head re-drawn (see the module docstring)."""
    from vitreg.nets.vitvnet import VitVNet, VitVNetConfig

    torch.manual_seed(0)
    model = VitVNet(VitVNetConfig(img_size=SIZE))
    with torch.no_grad():
        model.reg_head[0].weight.normal_(std=6.0)
    return model


def timed(call, warmup: int, iterations: int) -> float:
    """Median seconds of ``call()`` between CUDA synchronisations."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def inference(args: argparse.Namespace) -> list[dict]:
    """Latency rows for each path and batch."""
    model = seeded_model().cuda().eval().to(memory_format=torch.channels_last_3d)
    rows, reference = [], {}
    paths = ["fp32", "tf32", "bf16"] + ([] if args.no_compile else ["bf16+graphs"])
    for path in paths:
        torch.backends.cudnn.allow_tf32 = path != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = path != "fp32"
        network = model
        compile_seconds = None
        if path == "bf16+graphs":
            network = torch.compile(model, mode="reduce-overhead", dynamic=False)
        batches = args.batches
        if path == "bf16+graphs":  # one compilation per shape: batch 1 and the largest only
            batches = sorted({1, max(args.batches)})
        for batch in batches:
            torch.manual_seed(batch)
            moving_fixed = torch.rand(batch, 2, *SIZE, device="cuda")
            moving_fixed = moving_fixed.contiguous(memory_format=torch.channels_last_3d)

            def call(network=network, moving_fixed=moving_fixed, path=path):
                with (
                    torch.inference_mode(),
                    torch.autocast("cuda", dtype=torch.bfloat16, enabled=path.startswith("bf16")),
                ):
                    return network(moving_fixed)

            if path == "bf16+graphs":
                start = time.perf_counter()
                call()
                torch.cuda.synchronize()
                compile_seconds = time.perf_counter() - start
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(call, args.warmup, args.iterations)
            flow = call().float()
            if path == "fp32":
                reference[batch] = flow.clone()
            row = {
                "path": path,
                "batch": batch,
                "latency_ms": round(1e3 * seconds, 2),
                "ms_per_pair": round(1e3 * seconds / batch, 2),
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "max_flow_diff_vox": float((flow - reference[batch]).abs().max()),
                "flow_std_vox": round(float(reference[batch].std()), 3),
            }
            if compile_seconds is not None:
                row["first_call_seconds"] = round(compile_seconds, 1)
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            del moving_fixed, flow
    torch.backends.cudnn.allow_tf32 = True
    return rows


def training(args: argparse.Namespace) -> list[dict]:
    """Rows for the plain fp32 and the bf16 + checkpointing training step at batch 2."""
    from vitreg.losses import diffusion, local_ncc
    from vitreg.transform import warp

    rows = []
    for recipe in ("plain fp32", "bf16 + checkpointing"):
        lean = recipe != "plain fp32"
        torch.backends.cudnn.allow_tf32 = lean
        torch.backends.cuda.matmul.allow_tf32 = lean
        model = seeded_model().cuda().train().checkpoint_activations(lean)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
        torch.manual_seed(0)
        moving_fixed = torch.rand(2, 2, *SIZE, device="cuda")

        def step(model=model, optimizer=optimizer, moving_fixed=moving_fixed, lean=lean):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=lean):
                flow = model(moving_fixed)
            flow = flow.float()
            warped = warp(moving_fixed[:, :1], flow)
            loss = local_ncc(moving_fixed[:, 1:], warped) + diffusion(flow)
            loss.backward()
            optimizer.step()

        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        seconds = timed(step, 1, args.train_iterations)
        rows.append(
            {
                "recipe": recipe,
                "batch": 2,
                "seconds_per_step": round(seconds, 3),
                "pairs_per_second": round(2 / seconds, 2),
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            }
        )
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
        del model, optimizer, moving_fixed
        torch.cuda.empty_cache()
    torch.backends.cudnn.allow_tf32 = True
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--train-iterations", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu.py: no CUDA device on this machine; the GPU benchmark did not run.")
        return
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    rows = inference(args)
    print("| path | batch | latency ms | ms per pair | max memory GiB | max flow diff vs fp32 |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        extra = ""
        if "first_call_seconds" in row:
            extra = f" (first call {row['first_call_seconds']} s)"
        print(
            f"| {row['path']} | {row['batch']} | {row['latency_ms']}{extra} | "
            f"{row['ms_per_pair']} | {row['max_memory_gib']} | {row['max_flow_diff_vox']:.2e} |"
        )
    best = min(rows, key=lambda row: row["ms_per_pair"])
    print(f"\nbest per pair: {best['ms_per_pair']} ms ({best['path']}, batch {best['batch']})\n")
    if not args.skip_training:
        train_rows = training(args)
        plain = train_rows[0]
        print("| training step, batch 2 | s per step | pairs/s | x throughput | max memory GiB |")
        print("|---|---|---|---|---|")
        for row in train_rows:
            print(
                f"| {row['recipe']} | {row['seconds_per_step']} | {row['pairs_per_second']} | "
                f"{row['pairs_per_second'] / plain['pairs_per_second']:.2f} | "
                f"{row['max_memory_gib']} |"
            )


if __name__ == "__main__":
    main()
