"""QC flags on normal and deliberately broken pairs: what the thresholds were chosen on.

Builds broken pairs from one deformed pair of the benchmark sets (its fixed image and a
damaged copy of its moving image, on the moving grid): ``flipped`` (left-right mirrored
array, same header), ``inverted`` (the head's intensities reversed, a T2-like stand-in for
another modality, registered with local NCC all the same), ``mixed_contrast`` (a
non-monotonic remapping: mid grey brightest, a stand-in for a PD/FLAIR-like contrast),
``cropped`` (only the superior half of the head's slices kept, the grid cut there) and
``unrelated`` (a smooth random texture in a head-sized ellipsoid). Then registers them, the
normal pairs of the sets file (``--sets``: the deformed ones by default) and any other rows
given, with ``vitreg register-batch`` (one process; ``--iterations``), and prints one JSON
line per pair with its flag, reasons and indicators, then the counts.

``--rescore SUMMARY_JSON`` recomputes the flags of a finished run under the current
thresholds (``vitreg.flags.THRESHOLDS``) without registering again.

    OMP_NUM_THREADS=1 python benchmarks/qc_flags.py /work/sets-inter/pairs.csv \\
        --source colin27-aal_00 --sets colin27-aal,mni152-tissue,cross-subject \\
        --out /tmp/qc-flags --qc
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
BROKEN = ("flipped", "inverted", "mixed_contrast", "cropped", "unrelated")


def head_of(data: np.ndarray) -> np.ndarray:
    """The head's voxels: above 10% of the 99th percentile of the non-zero ones."""
    return data > 0.1 * np.percentile(data[data > 0], 99)


def broken_images(image: nib.Nifti1Image, seed: int = 0) -> dict[str, nib.Nifti1Image]:
    """The damaged copies of a moving image (see the module docstring)."""
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine, head = image.affine, head_of(data)
    # The head with its dark CSF and holes filled: where the contrast is remapped.
    filled = ndimage.binary_fill_holes(ndimage.binary_closing(head, iterations=3))
    left_right = int(np.argmax(np.abs(affine[0, :3])))  # the array axis along R-L
    low, high = np.percentile(data[head], [1, 99])
    scaled = np.clip((data - low) / (high - low), 0, 1)
    inverted = np.where(filled, (1.05 - scaled) * high, 0).astype(np.float32)
    # Mid grey (0.6 of the range) brightest, the darkest and brightest tissue dark.
    mixed = np.where(filled, (1 - np.abs(scaled - 0.6) / 0.6) * high, 0).astype(np.float32)
    superior = int(np.argmax(np.abs(affine[2, :3])))  # the array axis along S-I
    ahead = np.argwhere(head)[:, superior]
    cut = int((ahead.min() + ahead.max()) // 2)
    keep = [slice(None)] * 3
    keep[superior] = slice(cut, None) if affine[2, superior] > 0 else slice(0, cut)
    start = [0, 0, 0]
    start[superior] = keep[superior].start or 0
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ np.asarray(start, float) + affine[:3, 3]
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal(data.shape), 3.0)
    index = np.indices(data.shape).astype(float)
    box = np.argwhere(head)
    centre, radius = box.mean(axis=0), (box.max(axis=0) - box.min(axis=0)) / 2
    inside = sum(((index[i] - centre[i]) / radius[i]) ** 2 for i in range(3)) < 1
    unrelated = np.where(inside, high * np.clip(0.6 + 0.2 * texture / texture.std(), 0.05, 1), 0)
    return {
        "flipped": nib.Nifti1Image(np.flip(data, left_right).copy(), affine),
        "inverted": nib.Nifti1Image(inverted, affine),
        "mixed_contrast": nib.Nifti1Image(mixed, affine),
        "cropped": nib.Nifti1Image(data[tuple(keep)].copy(), cropped_affine),
        "unrelated": nib.Nifti1Image(unrelated.astype(np.float32), affine),
    }


def write_pairs(sets_csv: Path, source: str, sets: list[str], out: Path) -> Path:
    """The broken pairs of ``source`` and the pairs of ``sets`` as one pairs file in ``out``."""
    with sets_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    base = sets_csv.parent
    origin = next(row for row in rows if row["name"] == source)
    moving = nib.load(str(base / origin["moving"]))
    out.mkdir(parents=True, exist_ok=True)
    columns = ("fixed", "moving", "fixed_labels", "moving_labels", "mask")
    lines = [["set", "name", *columns]]

    def paths_of(row: dict) -> list[str]:
        return [str((base / row[key]).resolve()) if row.get(key) else "" for key in columns]

    for row in rows:
        if row["set"] in sets:
            lines.append([row["set"], row["name"], *paths_of(row)])
    for name, image in broken_images(moving).items():
        path = out / f"{source}_{name}.nii.gz"
        nib.save(image, str(path))
        cells = paths_of(origin)
        cells[1] = str(path)  # the source's fixed image, labels and mask; a broken moving one
        lines.append(["broken", f"{source}_{name}", *cells])
    pairs = out / "pairs.csv"
    with pairs.open("w", newline="") as handle:
        csv.writer(handle).writerows(lines)
    return pairs


def rescore(summary_json: Path) -> list[dict]:
    """The records of a finished run with their flags recomputed under today's thresholds."""
    from vitreg.flags import Indicators, qc_flag

    records = json.loads(summary_json.read_text())["pairs"]
    fields = Indicators.__dataclass_fields__
    for record in records:
        if record.get("status") != "ok":
            continue
        values = {name: record.get(name) for name in fields}
        values["affine_scales"] = tuple(values["affine_scales"])
        record.update(qc_flag(Indicators(**values)).to_dict())
    return records


def report(records: list[dict], sets: dict[str, str]) -> None:
    """One JSON line per pair, then the flag counts per group (normal / broken)."""
    from vitreg.flags import Indicators

    counts: dict[str, dict[str, int]] = {}
    for record in records:
        group = "broken" if sets.get(record["name"]) == "broken" else "normal"
        flag = record.get("qc_flag") if record["status"] == "ok" else "failed"
        counts.setdefault(group, {}).setdefault(flag, 0)
        counts[group][flag] += 1
        keys = ["name", "status", "error", "qc_flag", "qc_reasons", "dice_after", "seconds"]
        line = {key: record.get(key) for key in keys + list(Indicators.__dataclass_fields__)}
        print(json.dumps(line))
    print(json.dumps({"counts": counts}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sets_csv", type=Path, help="the benchmark sets' pairs.csv")
    parser.add_argument("--source", default="colin27-aal_00", help="pair the broken ones copy")
    parser.add_argument("--sets", default="colin27-aal,mni152-tissue", help="normal pairs' sets")
    parser.add_argument("--out", type=Path, default=Path("/tmp/qc-flags"))
    parser.add_argument("--iterations", help="per level, e.g. 50,15,0 (default: vitreg's)")
    parser.add_argument("--qc", action="store_true", help="also write the QC figures")
    parser.add_argument("--rescore", type=Path, help="a finished run's summary.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.rescore is not None:
        records = rescore(args.rescore)
    else:
        from vitreg.batch import register_batch
        from vitreg.register import RegisterSettings

        pairs = write_pairs(args.sets_csv, args.source, args.sets.split(","), args.out)
        iterations = None
        if args.iterations:
            iterations = tuple(int(n) for n in args.iterations.split(","))
        settings = RegisterSettings(
            iterations=iterations, allow_affine_failure=True, check_flip=True
        )
        records = register_batch(
            pairs, args.out / "results", "none", settings=settings, qc=args.qc
        ).records
    with (args.out / "pairs.csv").open() as handle:
        sets = {row["name"]: row["set"] for row in csv.DictReader(handle)}
    report(records, sets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
