"""vitreg against affine-only, greedy, ANTs and a SimpleITK baseline on the same pairs and metrics.

Every method is a plain function ``(loaded pair, options) -> DisplacementField`` (the pull
field on the fixed grid, RAS mm) in ``METHODS``; each (pair, method) runs in a fresh worker
process with the same thread limit (``--threads``, default 2: torch, OpenMP, ITK, SimpleITK,
ANTs and greedy's ``-threads``), timed and with its peak memory measured by
``vitreg.evaluate.measure``, and is scored by ``vitreg.evaluate.field_metrics`` (Dice with
nearest-neighbour label warping, det(J) <= 0 and SDlogJ in the mask, end-point error against
the true flow, correlation). A row's time covers its whole registration, affine stage
included, but not the imports (done by the worker first). Writes ``RESULTS.md`` (one table
per set: mean ± sd over its pairs) and a CSV of all rows.

The rows besides vitreg's: identity; SimpleITK Mattes-MI affine; greedy (picsl_greedy, its
quick start: WNCC 2x2x2 affine, then WNCC greedy deformable 100x50x10, composed) and
``greedy -sv`` (the same, stationary-velocity deformable stage); ANTs SyN with a CC metric
(``antsRegistrationSyN.sh``'s stages and parameters but CC radius 2 and no full-resolution
SyN level, ``100x70x50x0``: 510-570 s of CPU time per brain, about 6 minutes at 2 threads;
the recipe's radius 4 and ``100x70x50x20`` would take about 45, extrapolated from its CPU
time per iteration); ANTs ``SyN`` (antspyx preset, MI); SimpleITK MI affine + diffeomorphic
demons. ``--syncc`` adds antspyx's ``SyNCC`` preset.

Needs antspyx and picsl_greedy for the ANTs and greedy rows (``pip install -e .[bench]``).
Example:

    python benchmarks/compare.py /tmp/vitreg-sets/pairs.csv --optimize 100 \\
        --out benchmarks/RESULTS.md --csv /tmp/vitreg-compare.csv
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Options:
    """What the methods may need: the vitreg checkpoint (None: no network rows), the total
    iterations of vitreg's optimisation (None: its default schedule), CPU threads, the device
    and a scratch folder."""

    weights: str | None
    optimize: int | None
    threads: int
    device: str
    scratch: Path


# ---------------------------------------------------------------------------------- methods


def _vitreg(loaded, options: Options, network: bool, optimize: int | None, **register_options):
    """vitreg's pull field; ``register_options`` go to ``register()`` (e.g. ``diffeo=True``)."""
    from vitreg.register import register

    model = frame = None
    if network:
        from vitreg.weights import build_model, read_checkpoint, resolve

        checkpoint = read_checkpoint(resolve(options.weights, offline=True))
        model, frame = build_model(checkpoint), checkpoint.frame
    return register(
        loaded.fixed,
        loaded.moving,
        model=model,
        frame=frame,
        optimize=optimize,
        device=options.device,
        **register_options,
    ).field


def itk_displacement_to_field(dense, grid, scratch: Path):
    """A SimpleITK displacement image on ``grid`` (ITK's convention: LPS mm, the displacement
    from a fixed point to its moving point) as a :class:`~vitreg.field.DisplacementField`
    (RAS mm) on ``grid`` (a :class:`~vitreg.image.Volume`), via an ITK flow file in ``scratch``."""
    import SimpleITK as sitk

    from vitreg.field import DisplacementField, check_same_grid, load_flow

    path = scratch / "itk_field.nii.gz"
    sitk.WriteImage(sitk.Cast(dense, sitk.sitkVectorFloat32), str(path))
    field = load_flow(path)
    check_same_grid(grid, field.grid)
    return DisplacementField(disp_mm=field.disp_mm, grid=grid)


def _itk_field_to_vitreg(transform, loaded, options: Options):
    """Dense pull field of a SimpleITK transform on the fixed grid, via an ITK flow file."""
    import SimpleITK as sitk

    reference = sitk.ReadImage(str(loaded.pair.fixed))
    dense = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(),
    )  # fmt: skip
    return itk_displacement_to_field(dense, loaded.fixed, options.scratch)


def _sitk_affine(fixed, moving):
    """Mattes MI affine, 3 levels, initialised at the centres of mass."""
    import SimpleITK as sitk

    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(fixed, moving)


def identity(loaded, options: Options):
    """No registration: the images as they lie in world space (the starting point)."""
    import torch

    from vitreg.field import DisplacementField

    return DisplacementField(disp_mm=torch.zeros(1, 3, *loaded.fixed.shape), grid=loaded.fixed)


def affine_only(loaded, options: Options):
    """SimpleITK Mattes-MI affine (no deformable stage)."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(loaded.pair.fixed), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(loaded.pair.moving), sitk.sitkFloat32)
    return _itk_field_to_vitreg(_sitk_affine(fixed, moving), loaded, options)


def sitk_demons(loaded, options: Options):
    """SimpleITK: MI affine, then histogram matching and multi-resolution diffeomorphic demons."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(loaded.pair.fixed), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(loaded.pair.moving), sitk.sitkFloat32)
    affine = _sitk_affine(fixed, moving)
    resampled = sitk.Resample(moving, fixed, affine, sitk.sitkLinear, 0.0)
    matched = sitk.HistogramMatching(resampled, fixed, 256, 15, True)
    demons = sitk.DiffeomorphicDemonsRegistrationFilter()
    demons.SetNumberOfIterations(50)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(1.5)
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(fixed)
    # Coarse to fine: each level starts from the previous level's field, resampled.
    for shrink in (4, 2, 1):
        fixed_level = sitk.Shrink(fixed, [shrink] * 3) if shrink > 1 else fixed
        moving_level = sitk.Shrink(matched, [shrink] * 3) if shrink > 1 else matched
        start = sitk.Resample(
            field, fixed_level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64
        )
        field = demons.Execute(fixed_level, moving_level, start)
    deformable = sitk.DisplacementFieldTransform(field)
    # Points go through the demons field first, then the affine (last added, applied first).
    return _itk_field_to_vitreg(sitk.CompositeTransform([affine, deformable]), loaded, options)


GREEDY_AFFINE = "-a -dof 12 -m WNCC 2x2x2 -ia-image-centers -n {iterations}"
GREEDY_DEFORMABLE = "-m WNCC 2x2x2 -n {iterations} -s 1.732vox 0.7071vox -wp 0"


def greedy_registration(
    fixed, moving, threads: int, stationary_velocity: bool = False, iterations="100x50x10"
):
    """greedy's quick start, affine then deformable, through ``picsl_greedy.Greedy3D``.

    ``fixed`` and ``moving`` are SimpleITK images (any grids). Runs
    ``-a -dof 12 -m WNCC 2x2x2 -ia-image-centers -n 100x50x10``, then the deformable stage
    started from that affine (``-it``) with ``-m WNCC 2x2x2 -n 100x50x10 -s 1.732vox 0.7071vox``
    (plus ``-sv``, the stationary-velocity, diffeomorphic model, when
    ``stationary_velocity``), both with ``-d 3 -threads {threads} -seed 1``, then composes the
    two with greedy's reslicer (``-rf fixed -rc composed -r warp affine``).

    Returns greedy's outputs by name: ``"affine"``, the affine stage's 4x4 matrix (numpy), which
    (as greedy's ``.mat`` files) maps fixed RAS mm to moving RAS mm; ``"warp"``, the deformable
    stage's displacement on the fixed grid, applied before the affine; ``"composed"``, the
    whole pull field (``x -> affine(x + warp(x))``) on the fixed grid. Both fields are SimpleITK
    displacement images in greedy's (ITK's) convention: LPS mm, fixed point -> moving point.
    ``tests/test_compare.py`` checks these conventions against SimpleITK and greedy's own
    reslicing. ``-wp 0`` keeps the warp at full precision: by default greedy
    rounds it to 0.1 voxel, which would add steps to the Jacobian determinant. ``-seed 1``
    fixes the random jitter and noise greedy adds (sums over 2 threads may still differ in
    the last digits from run to run).
    """
    from picsl_greedy import Greedy3D

    greedy = Greedy3D()
    common = f"-d 3 -threads {threads} -seed 1 -i fixed moving"
    sv = " -sv" if stationary_velocity else ""
    commands = [
        (f"{common} {GREEDY_AFFINE.format(iterations=iterations)} -o affine", {"affine": None}),
        (
            f"{common} -it affine {GREEDY_DEFORMABLE.format(iterations=iterations)}{sv} -o warp",
            {"warp": None},
        ),
        (f"-d 3 -threads {threads} -rf fixed -rc composed -r warp affine", {"composed": None}),
    ]
    images = {"fixed": fixed, "moving": moving}  # names in the commands; outputs: None
    for command, outputs in commands:  # greedy logs to the process's standard output
        try:
            greedy.execute(command, **images, **outputs)
        except RuntimeError as error:
            raise RuntimeError(f"greedy {command}: {error}") from error
    return {name: greedy[name] for name in ("affine", "warp", "composed")}


def greedy(loaded, options: Options, stationary_velocity: bool = False):
    """greedy (``picsl_greedy``): WNCC affine then WNCC greedy deformable, composed (see
    :func:`greedy_registration`); ``stationary_velocity`` adds ``-sv``."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(loaded.pair.fixed), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(loaded.pair.moving), sitk.sitkFloat32)
    outputs = greedy_registration(fixed, moving, options.threads, stationary_velocity)
    return itk_displacement_to_field(outputs["composed"], loaded.fixed, options.scratch)


def _ants(loaded, options: Options, transform: str):
    import ants

    from vitreg.field import DisplacementField, load_flow

    fixed = ants.image_read(str(loaded.pair.fixed))
    moving = ants.image_read(str(loaded.pair.moving))
    result = ants.registration(
        fixed, moving, type_of_transform=transform, random_seed=1,
        outprefix=str(options.scratch / "ants_"),
    )  # fmt: skip
    # antsApplyTransforms composes the whole transform list into one field on the fixed grid.
    composed = ants.apply_transforms(
        fixed, moving, result["fwdtransforms"], compose=str(options.scratch / "ants_composed_")
    )
    return DisplacementField(disp_mm=load_flow(composed).disp_mm, grid=loaded.fixed)


def antsregistrationsyn_arguments(
    fixed: str, moving: str, prefix: str, cc_radius: int = 4, syn_iterations: str = "100x70x50x20"
) -> list[str]:
    """``antsRegistration`` arguments of ANTs' ``antsRegistrationSyN.sh -t s`` (its defaults:
    CC radius 4, double precision, no histogram matching, intensities winsorised at
    0.5%/99.5%), with the CC radius and the SyN iterations as parameters.

    Stages: centre-of-mass initialisation; ``Rigid[0.1]`` then ``Affine[0.1]``, each with
    ``MI[fixed,moving,1,32,Regular,0.25]``, ``[1000x500x250x100,1e-6,10]`` at shrink factors
    8x4x2x1 and smoothing 3x2x1x0 voxels; then ``SyN[0.1,3,0]`` with ``CC[fixed,moving,1,r]``,
    ``[{syn_iterations},1e-6,10]`` at 8x4x2x1, 3x2x1x0 voxels (the script's choice for images
    of at most 256 voxels a side). ``--random-seed 1`` fixes the MI sampling. Writes
    ``{prefix}0GenericAffine.mat`` and ``{prefix}1Warp.nii.gz`` (and the inverse warp).
    """
    linear = [
        "--metric", f"MI[{fixed},{moving},1,32,Regular,0.25]",
        "--convergence", "[1000x500x250x100,1e-6,10]",
        "--shrink-factors", "8x4x2x1",
        "--smoothing-sigmas", "3x2x1x0vox",
    ]  # fmt: skip
    return [
        "--dimensionality", "3", "--float", "0", "--random-seed", "1",
        "--output", f"[{prefix}]", "--interpolation", "Linear",
        "--use-histogram-matching", "0", "--winsorize-image-intensities", "[0.005,0.995]",
        "--initial-moving-transform", f"[{fixed},{moving},1]",
        "--transform", "Rigid[0.1]", *linear,
        "--transform", "Affine[0.1]", *linear,
        "--transform", "SyN[0.1,3,0]",
        "--metric", f"CC[{fixed},{moving},1,{cc_radius}]",
        "--convergence", f"[{syn_iterations},1e-6,10]",
        "--shrink-factors", "8x4x2x1",
        "--smoothing-sigmas", "3x2x1x0vox",
    ]  # fmt: skip


def ants_syn_cc(loaded, options: Options, cc_radius: int = 4, syn_iterations="100x70x50x20"):
    """ANTs' ``antsRegistrationSyN.sh`` recipe (see :func:`antsregistrationsyn_arguments`) run
    through antspyx's ``antsRegistration`` binding (``ants.registration`` given the argument
    list), its transforms composed into one field on the fixed grid by ``antsApplyTransforms``.

    The preset ``type_of_transform="antsRegistrationSyN[s]"`` of antspyx 0.6.3 is not this
    recipe: it uses CC radius 2 (its ``[s,4]`` radius argument is overwritten), a SyN step of
    0.2, single precision and no winsorising; ``"SyNCC"`` is another recipe (Mattes MI linear
    stages, SyN[0.15,3,0] with CC radius 4 for up to 2100x1200x1200x20 iterations at shrink
    4x3x2x1), far from a few minutes here.
    """
    import ants

    from vitreg.field import DisplacementField, load_flow

    fixed, moving = str(loaded.pair.fixed), str(loaded.pair.moving)
    for path in (fixed, moving):
        if any(character in path for character in ",[]"):
            raise ValueError(f"{path}: antsRegistration's arguments cannot hold ',[]' in paths")
    prefix = str(options.scratch / "antscc_")
    ants.registration(
        antsregistrationsyn_arguments(fixed, moving, prefix, cc_radius, syn_iterations), None
    )
    transforms = [f"{prefix}1Warp.nii.gz", f"{prefix}0GenericAffine.mat"]  # as fwdtransforms
    composed = ants.apply_transforms(
        ants.image_read(fixed), ants.image_read(moving), transforms, compose=f"{prefix}composed_"
    )
    return DisplacementField(disp_mm=load_flow(composed).disp_mm, grid=loaded.fixed)


Method = Callable[[object, Options], object]
ANTS_CC = "ANTs SyN CC radius 2 (antsRegistrationSyN recipe; SyN 100x70x50x0)"
NEEDS_WEIGHTS = {"vitreg network", "vitreg network + optimisation"}
VITREG_ADAM = "vitreg adam (the previous default: 100 Adam steps at levels 4 and 2)"
METHODS: dict[str, Method] = {
    "identity (no registration)": identity,
    "affine (SimpleITK MI)": affine_only,
    "vitreg network": lambda pair, o: _vitreg(pair, o, network=True, optimize=0),
    "vitreg network + optimisation": lambda p, o: _vitreg(p, o, network=True, optimize=o.optimize),
    "vitreg": lambda pair, o: _vitreg(pair, o, network=False, optimize=o.optimize),
    "vitreg --diffeo": lambda p, o: _vitreg(p, o, network=False, optimize=o.optimize, diffeo=True),
    VITREG_ADAM: lambda p, o: _vitreg(p, o, network=False, optimize=100, optimizer="adam"),
    "vitreg --no-affine": lambda p, o: _vitreg(
        p, o, network=False, optimize=o.optimize, affine=False
    ),
    "vitreg adam --similarity mi": lambda p, o: _vitreg(
        p, o, network=False, optimize=100, optimizer="adam", similarity="mi"
    ),
    "vitreg adam --regularizer bending": lambda p, o: _vitreg(
        p, o, network=False, optimize=100, optimizer="adam", regularizer="bending"
    ),
    "greedy": greedy,
    "greedy -sv": lambda pair, o: greedy(pair, o, stationary_velocity=True),
    ANTS_CC: lambda pair, o: ants_syn_cc(pair, o, cc_radius=2, syn_iterations="100x70x50x0"),
    "ANTs SyN": lambda pair, o: _ants(pair, o, "SyN"),
    "ANTs SyNCC": lambda pair, o: _ants(pair, o, "SyNCC"),
    "SimpleITK demons": sitk_demons,
}
# The rows of RESULTS.md, in METHODS' order: identity, affine, vitreg (its default), vitreg
# --diffeo, the previous default (Adam), the network rows (with --weights), greedy, greedy -sv,
# ANTs SyN CC, ANTs SyN, demons. Not by default: ANTs SyNCC (``--syncc``; CC radius 4 for up to
# 2100x1200x1200x20 iterations, far slower than the CC row) and the other vitreg variants.
OPTIONAL_METHODS = {
    "ANTs SyNCC",
    "vitreg --no-affine",
    "vitreg adam --similarity mi",
    "vitreg adam --regularizer bending",
}
DEFAULT_METHODS = [name for name in METHODS if name not in OPTIONAL_METHODS]


# ---------------------------------------------------------------------------------- running


def _worker_setup(threads: int) -> None:
    """Same imports and thread limits in every worker, so baselines of memory are equal."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    for module in ("ants", "picsl_greedy"):  # imported here, so no row's time counts them
        try:
            __import__(module)
        except ImportError:
            pass


def run_one(method: str, pair, options: Options) -> dict:
    """Run ``method`` on ``pair`` in this process and return its result row."""
    from vitreg.evaluate import load_pair, measure

    _worker_setup(options.threads)
    loaded = load_pair(pair)
    with tempfile.TemporaryDirectory(dir=options.scratch) as scratch:
        method_options = Options(**{**options.__dict__, "scratch": Path(scratch)})
        device = "cpu" if not method.startswith("vitreg") else options.device
        result = measure(loaded, lambda: METHODS[method](loaded, method_options), device)
    # Other work on the machine inflates wall time (less so CPU time): record how busy it was.
    return {"method": method, **result.row(), "load_average_1min": os.getloadavg()[0]}


def run_isolated(method: str, pair, options: Options) -> dict:
    """``run_one`` in a fresh spawned process (clean memory figures, no shared state)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(run_one, method, pair, options).result()


def machine() -> str:
    """CPU model, cores available, memory, GPU, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        memory = float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    versions = [f"torch {torch.__version__}"]
    for module in ("ants", "SimpleITK"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} missing")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {memory:.0f} GiB, {gpu}; " + ", ".join(versions)


COLUMNS = (
    ("dice_mean", "Dice", 3),
    ("percent_nonpositive", "% det≤0", 3),
    ("sdlogj", "SDlogJ", 3),
    ("epe_mm", "EPE mm", 2),
    ("correlation_after", "corr", 3),
    ("seconds", "seconds", 1),
    ("cpu_seconds", "CPU s", 1),
    ("peak_memory_mib", "peak MiB", 0),
    ("load_average_1min", "load", 1),
)


def results_markdown(rows: list[dict], skipped: dict[str, str], header: str) -> str:
    """One table per set: mean ± sd over the set's pairs of every column, per method."""
    from vitreg.evaluate import mean_sd

    lines = [header, ""]
    for set_name in dict.fromkeys(row["set"] for row in rows):
        members = [row for row in rows if row["set"] == set_name]
        pairs = len({row["name"] for row in members})
        lines += [f"## {set_name} ({pairs} pairs)", ""]
        lines.append("| method | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for method in dict.fromkeys(row["method"] for row in members):
            cells = []
            for key, _, digits in COLUMNS:
                values = [r[key] for r in members if r["method"] == method and r[key] is not None]
                stats = mean_sd(values)
                cells.append(
                    "-" if stats["mean"] is None
                    else f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"
                )  # fmt: skip
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    for method, reason in skipped.items():
        lines.append(f"- {method}: skipped ({reason})")
    return "\n".join(lines) + "\n"


def write_rows(path: Path, rows: list[dict]) -> None:
    """All result rows as CSV (rewritten whole, through a temporary file)."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(path)


def read_rows(path: Path) -> list[dict]:
    """Rows written by :func:`write_rows`, numbers as floats and empty cells as None."""

    def value(text: str):
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with path.open(newline="") as handle:
        return [{key: value(text) for key, text in row.items()} for row in csv.DictReader(handle)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", type=Path, help="pairs.csv from make_sets.py")
    parser.add_argument("--weights", help="vitreg checkpoint; without it no network rows")
    parser.add_argument(
        "--optimize", type=int, help="vitreg's total optimisation iterations (default: its own)"
    )
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated")
    parser.add_argument("--syncc", action="store_true", help="also run ANTs SyNCC")
    parser.add_argument("--only", help="comma-separated pair names (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="device for vitreg (cpu or cuda)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument(
        "--csv", type=Path, help="also write every (pair, method) row here, after each row"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows already in --csv, run the rest"
    )
    args = parser.parse_args(argv)

    from vitreg.evaluate import read_pairs

    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    if args.syncc and "ANTs SyNCC" not in methods:
        methods.append("ANTs SyNCC")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {list(METHODS)}")
    skipped = {}
    if args.weights is None:
        for name in [m for m in methods if m in NEEDS_WEIGHTS]:
            skipped[name] = "no checkpoint: pass --weights"
            methods.remove(name)
            print(f"{name}: skipped, no checkpoint (pass --weights)", file=sys.stderr)
    pairs = read_pairs(args.pairs)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",")}
        pairs = [pair for pair in pairs if pair.name in wanted]
    rows = read_rows(args.csv) if args.resume and args.csv and args.csv.exists() else []
    done = {(row["name"], row["method"]) for row in rows}
    with tempfile.TemporaryDirectory(prefix="vitreg-compare-") as scratch:
        options = Options(args.weights, args.optimize, args.threads, args.device, Path(scratch))
        for pair in pairs:
            for method in methods:
                if (pair.name, method) in done:
                    continue
                start = time.perf_counter()
                row = run_isolated(method, pair, options)
                rows.append(row)
                if args.csv is not None:
                    write_rows(args.csv, rows)
                print(
                    f"{pair.name} | {method}: Dice {row['dice_mean']}, EPE {row['epe_mm']}, "
                    f"{row['seconds']:.1f} s ({time.perf_counter() - start:.1f} s with scoring), "
                    f"{row['peak_memory_mib']:.0f} MiB",
                    file=sys.stderr,
                )
    command = "python " + " ".join(shlex.quote(arg) for arg in sys.argv)
    header = (
        "# vitreg benchmark results\n\n"
        f"Date: {datetime.date.today().isoformat()}. Machine: {machine()}.\n\n"
        f"Command: `{command}`\n\n"
        "Mean ± sd over the pairs of each set. Dice: mean over labels (nearest-neighbour "
        "label warping); % det≤0 and SDlogJ of the pull field on the fixed grid, in the brain "
        "mask; EPE: mean end-point error against the true flow in the mask (mm); corr: "
        "correlation of the fixed and warped moving images in the mask; seconds: the "
        "registration's wall time; CPU s: its CPU time over all threads; peak MiB: peak "
        "resident memory of the worker process (imports included; CUDA max allocated for "
        "vitreg on a GPU); load: the machine's 1-minute load average when the row ended "
        "(above the thread count, other work was slowing the wall time)."
    )
    wanted = {pair.name for pair in pairs}
    shown = [row for row in rows if row["name"] in wanted and row["method"] in methods]
    args.out.write_text(results_markdown(shown, skipped, header))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
