"""Example pair: vitreg (optimisation only) against ANTs SyN; Dice, folding and time as JSON.

Needs antspyx (``pip install antspyx``), which is not a vitreg dependency. Reproduce with:

    python benchmarks/example_vs_ants.py --steps 100 --threads 2

Both methods start from the pair as it is (already in MNI space); ANTs runs ``SyNOnly``
(deformable only, as vitreg) with its defaults and ``genericLabel`` label warping; vitreg
warps labels with nearest neighbour. Dice is over the CSF/GM/WM labels of examples/.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def vitreg_run(steps: int, folder: Path, options: dict) -> dict:
    from vitreg.field import save_flow, warp_labels_nearest
    from vitreg.image import load_image, load_labels
    from vitreg.metrics import dice_per_label, folding, jacobian_determinant
    from vitreg.register import register

    fixed = load_image(EXAMPLES / "fixed.nii.gz")
    moving = load_image(EXAMPLES / "moving.nii.gz")
    start = time.perf_counter()
    result = register(fixed, moving, optimize=steps, device="cpu", **options)
    seconds = time.perf_counter() - start
    save_flow(folder / "vitreg_flow.nii.gz", result.field)
    ants_agreement = _ants_applies_flow(folder / "vitreg_flow.nii.gz", result.warped, fixed.data)
    labels = warp_labels_nearest(load_labels(EXAMPLES / "moving_labels.nii.gz"), result.field)
    dice = dice_per_label(load_labels(EXAMPLES / "fixed_labels.nii.gz").data, labels)
    jacdet = jacobian_determinant(result.field.to_voxels()[0].numpy())
    fold = folding(jacdet, fixed.data > 0)
    return {
        "method": f"vitreg --weights none --optimize {steps} {_flags(options)}".strip(),
        "seconds": round(seconds, 1),
        "dice": {str(k): round(v, 4) for k, v in dice.scores.items()},
        "dice_mean": round(dice.mean, 4),
        "percent_det_nonpositive_in_brain": round(fold.percent_nonpositive, 4),
        "sdlogj_in_brain": round(fold.sdlogj, 4),
        "ants_apply_transforms_corr_with_warped": ants_agreement,
    }


def _flags(options: dict) -> str:
    """The command-line flags that give ``options``."""
    flags = []
    for key, value in options.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else f"--no-{name[2:]}")
        elif isinstance(value, tuple):
            flags.append(f"{name} {','.join(map(str, value))}")
        else:
            flags.append(f"{name} {value}")
    return " ".join(flags)


def _ants_applies_flow(flow: Path, warped: np.ndarray, fixed: np.ndarray) -> float:
    """Correlation inside the head of vitreg's WARPED and ANTs applying vitreg's ITK flow."""
    import ants

    theirs = ants.apply_transforms(
        ants.image_read(str(EXAMPLES / "fixed.nii.gz")),
        ants.image_read(str(EXAMPLES / "moving.nii.gz")),
        [str(flow)],
        interpolator="linear",
    ).numpy()
    head = fixed > 0
    return round(float(np.corrcoef(warped[head], theirs[head])[0, 1]), 6)


def ants_run(folder: Path) -> dict:
    import ants

    from vitreg.field import load_flow
    from vitreg.image import load_labels
    from vitreg.metrics import dice_per_label, folding, jacobian_determinant

    fixed = ants.image_read(str(EXAMPLES / "fixed.nii.gz"))
    moving = ants.image_read(str(EXAMPLES / "moving.nii.gz"))
    start = time.perf_counter()
    registration = ants.registration(fixed, moving, type_of_transform="SyNOnly", random_seed=1)
    seconds = time.perf_counter() - start
    labels = ants.apply_transforms(
        fixed,
        ants.image_read(str(EXAMPLES / "moving_labels.nii.gz")),
        registration["fwdtransforms"],
        interpolator="genericLabel",
    )
    dice = dice_per_label(
        load_labels(EXAMPLES / "fixed_labels.nii.gz").data, labels.numpy().astype(np.int64)
    )
    warp_file = next(t for t in registration["fwdtransforms"] if t.endswith("Warp.nii.gz"))
    field = load_flow(warp_file)
    fixed_data = fixed.numpy()
    jacdet = jacobian_determinant(field.to_voxels()[0].numpy())
    fold = folding(jacdet, fixed_data > 0)
    return {
        "method": "ANTs SyNOnly (antspyx defaults)",
        "seconds": round(seconds, 1),
        "dice": {str(k): round(v, 4) for k, v in dice.scores.items()},
        "dice_mean": round(dice.mean, 4),
        "percent_det_nonpositive_in_brain": round(fold.percent_nonpositive, 4),
        "sdlogj_in_brain": round(fold.sdlogj, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-affine", action="store_true", help="skip the affine step")
    parser.add_argument("--diffeo", action="store_true")
    parser.add_argument("--similarity", default="ncc")
    parser.add_argument("--regularizer", default="diffusion")
    parser.add_argument("--levels", default="4,2")
    parser.add_argument("--smoothness", type=float, default=5.0)
    parser.add_argument("--skip-ants", action="store_true", help="vitreg only")
    args = parser.parse_args()
    options = {
        "affine": not args.no_affine,
        "diffeo": args.diffeo,
        "similarity": args.similarity,
        "regularizer": args.regularizer,
        "levels": tuple(int(n) for n in args.levels.split(",")),
        "smoothness": args.smoothness,
    }
    torch.set_num_threads(args.threads)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = [vitreg_run(args.steps, Path(folder), options)]
        if not args.skip_ants:
            rows.append(ants_run(Path(folder)))
    for row in rows:
        print(json.dumps({"benchmark": "example_pair_vs_ants", "threads": args.threads, **row}))


if __name__ == "__main__":
    main()
