"""``vitreg register`` end to end on the example pair with a random full-size checkpoint.

Reproduce: ``python benchmarks/register_e2e.py --threads 2``. There is no trained checkpoint
yet, so the script saves a randomly initialised published-size model (seed 0) with
``vitreg.weights.save_checkpoint`` into a temporary folder and registers the shipped example
pair (``examples/``) with ``--weights`` pointing at it, on the CPU. Two fresh child processes:

1. the command line itself (``python -m vitreg.cli register ... --json``): wall time and peak
   RSS of the whole command (imports, load, frame, network, resample, write);
2. the same steps through the Python API with a timer per stage: load (both NIfTI files),
   affine + frame (the affine pre-alignment, then reorient/resample/normalise onto the
   160x192x224 grid), network (the forward pass),
   resample (NCC before/after, flow to the fixed grid, warping the moving image), write (the
   warped image and the ITK flow).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def save_random_checkpoint(path: Path) -> Path:
    """A seeded, randomly initialised published-size ViT-V-Net checkpoint at ``path``."""
    import torch

    from vitreg.frame import ModelFrame
    from vitreg.nets.vitvnet import VitVNet
    from vitreg.weights import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(path, VitVNet(), ModelFrame(), {"note": "random init, benchmark"})


def stages(args: argparse.Namespace) -> None:
    """Child: run the register steps through the API, timing each; print one JSON line."""
    start = time.perf_counter()
    import torch

    from vitreg.field import save_flow
    from vitreg.image import load_image, save
    from vitreg.register import register
    from vitreg.weights import build_model, read_checkpoint

    torch.set_num_threads(args.threads)
    imported = time.perf_counter()
    checkpoint = read_checkpoint(args.weights)
    model = build_model(checkpoint)
    built = time.perf_counter()
    fixed, moving = load_image(EXAMPLES / "fixed.nii.gz"), load_image(EXAMPLES / "moving.nii.gz")
    loaded = time.perf_counter()
    marks: dict[str, float] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(f"{stage}_{'end' if done == total else 'start'}", time.perf_counter())

    result = register(fixed, moving, model=model, frame=checkpoint.frame, device="cpu",
                      progress=progress)  # fmt: skip
    registered = time.perf_counter()
    out = Path(args.out)
    save(out / "warped.nii.gz", result.warped.astype("float32"), fixed)
    save_flow(out / "flow.nii.gz", result.field, "itk")
    written = time.perf_counter()
    seconds = {
        "import": imported - start,
        "read checkpoint + build model": built - imported,
        "load images": loaded - built,
        "affine + frame": marks["network_start"] - loaded,
        "network": marks["network_end"] - marks["network_start"],
        "resample (NCC, flow to fixed grid, warp)": registered - marks["network_end"],
        "write (warped + ITK flow)": written - registered,
    }
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"stages_seconds": seconds, "peak_rss_gib": peak_gib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stages", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages:
        stages(args)
        return

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        weights = save_random_checkpoint(folder / "random.safetensors")
        cli = [
            sys.executable, "-m", "vitreg.cli", "register",
            str(EXAMPLES / "fixed.nii.gz"), str(EXAMPLES / "moving.nii.gz"),
            "-o", str(folder / "warped.nii.gz"), "--flow", str(folder / "flow.nii.gz"),
            "--weights", str(weights), "--device", "cpu", "--json",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cli, env=env, capture_output=True, text=True, check=True)
        cli_seconds = time.perf_counter() - start
        cli_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        child = [sys.executable, __file__, "--stages", "--threads", str(args.threads),
                 "--weights", str(weights), "--out", str(folder)]  # fmt: skip
        staged = json.loads(
            subprocess.run(child, env=env, capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    print(f"vitreg register, example pair, random full-size checkpoint, {args.threads} threads\n")
    print("| stage | seconds |\n|---|---|")
    for stage, seconds in staged["stages_seconds"].items():
        print(f"| {stage} | {seconds:.2f} |")
    print(f"| total (API, same process) | {sum(staged['stages_seconds'].values()):.2f} |")
    print(f"| peak RSS (API process) | {staged['peak_rss_gib']:.2f} GiB |")
    print(
        f"\n`vitreg register` command: {cli_seconds:.1f} s wall (it reports "
        f"{summary['seconds']} s inside register()), peak RSS "
        f"{cli_peak / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
