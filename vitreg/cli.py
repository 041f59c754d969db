"""The ``vitreg`` command line: parse, call the Python API once, print. Nothing else lives here.

torch and the API modules are imported inside the commands, so ``vitreg --help`` is instant.
Every example in a command's help runs as written from the repository root (it uses the
example pair in ``examples/``); ``tests/test_cli.py`` runs them all, in order.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Annotated

import typer

from vitreg.cli_train import train
from vitreg.cli_weights import weights_app
from vitreg.console import (
    DeviceOption,
    JsonOption,
    QuietOption,
    error_text,
    say,
    show_error,
    show_result,
    show_table,
    stage_progress,
    user_errors,
    warn,
)
from vitreg.errors import OptionError, VitregError

app = typer.Typer(
    name="vitreg",
    help="Deformable registration of 3D brain MRI with ViT-V-Net.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(weights_app, name="weights")

BATCH_FAILED_EXIT_CODE = 1

# Options that several commands share.
WeightsOption = Annotated[
    str, typer.Option(help="Checkpoint name, path, or 'none' (optimisation only).")
]
OptimizeOption = Annotated[
    int | None,
    typer.Option(
        help="Total iterations of test-time optimisation, split over --levels; 0: none "
        "(network only). Default: the optimiser's schedule (see --iterations)."
    ),
]
OptimizerOption = Annotated[
    str,
    typer.Option(
        help="greedy (local NCC, Gaussian-smoothed updates; fast) or adam (gradient descent "
        "on --similarity + --smoothness x --regularizer; for MI, MSE, bending, Dice guidance)."
    ),
]
IterationsOption = Annotated[
    str | None,
    typer.Option(
        help="Iterations at each level, e.g. 100,30,10 (or 100x30x10, as greedy's -n). "
        "Default greedy: 100,50,20 on levels 4,2,1 (20,5 on 2,1 after a network)."
    ),
]
LevelsOption = Annotated[
    str | None,
    typer.Option(help="Coarse-to-fine downsampling factors, e.g. 4,2,1 (default per optimiser)."),
]
SmoothnessOption = Annotated[
    float, typer.Option(help="--optimizer adam: weight of the penalty (higher: smoother).")
]
AffineOption = Annotated[
    bool, typer.Option(help="Affine pre-alignment (moments, rigid, affine by MI) first.")
]
CheckFlipOption = Annotated[
    bool,
    typer.Option(
        help="QC: also fit the left-right mirrored moving image (one more affine) and flag "
        "the pair 'check' when it fits better (flipped?)."
    ),
]
DiffeoOption = Annotated[
    bool, typer.Option(help="Diffeomorphic: integrate a stationary velocity (no folding).")
]
OfflineOption = Annotated[bool, typer.Option(help="Never download weights.")]
FlowArgument = Annotated[Path, typer.Argument(help="Flow written by 'vitreg register'.")]
ReadFlowFormatOption = Annotated[
    str,
    typer.Option(
        "--flow-format",
        help="How to read flows: auto (5D: itk, 4D: voxel), itk, voxel or freesurfer (RAS mm, "
        "as mri_synthmorph writes; 4D like voxel, so it must be named).",
    ),
]
TransformOption = Annotated[
    list[str] | None,
    typer.Option(
        "-t",
        "--transform",
        metavar="FILE",
        help="Instead of FLOW: transforms in antsApplyTransforms order, repeated (-t "
        "PREFIX1Warp.nii.gz -t PREFIX0GenericAffine.mat; \\[affine.mat,1] inverts): "
        "ITK/ANTs affines and warps, greedy matrices, FreeSurfer .lta files.",
    ),
]


# register's own options
FlowFormatOption = Annotated[
    str,
    typer.Option(
        help="itk (ANTs/SimpleITK, LPS mm), voxel (fixed-grid voxels) or freesurfer (RAS mm, "
        "as mri_synthmorph writes; .mgz allowed)."
    ),
]
AntsPrefixOption = Annotated[
    str | None,
    typer.Option(
        help="Also write PREFIX0GenericAffine.mat and PREFIX1Warp.nii.gz (+ "
        "PREFIX1InverseWarp.nii.gz with --inverse-flow), as antsRegistration names them."
    ),
]
FixedLabelsOption = Annotated[
    Path | None, typer.Option(help="Fixed label map: report Dice before/after.")
]
MovingLabelsOption = Annotated[
    Path | None, typer.Option(help="Moving label map: report Dice before/after.")
]
FixedMaskOption = Annotated[
    Path | None,
    typer.Option(
        help="Cost-function mask on FIXED's grid (nonzero inside): voxels outside it do not "
        "drive the registration (lesion, resection cavity, electrodes excluded)."
    ),
]
MovingMaskOption = Annotated[
    Path | None,
    typer.Option(help="Cost-function mask on MOVING's grid (nonzero inside), as --fixed-mask."),
]
QcPathOption = Annotated[
    Path | None, typer.Option("--qc", help="Also write a QC figure (PNG, see 'vitreg qc').")
]
AffineOutOption = Annotated[
    Path | None,
    typer.Option(help="Write the affine: ITK .mat (ANTs) / .tfm / .txt, or FreeSurfer .lta."),
]
AllowFailureOption = Annotated[
    bool, typer.Option(help="If the affine fails, warn and go on with the centring only.")
]
InverseOption = Annotated[
    Path | None, typer.Option(help="Moving-to-fixed flow out, on MOVING's grid.")
]
SimilarityOption = Annotated[
    str, typer.Option(help="--optimizer adam: ncc (local), mse or mi (mutual information).")
]
RegularizerOption = Annotated[
    str, typer.Option(help="--optimizer adam: penalty, diffusion or bending.")
]
DiceWeightOption = Annotated[
    float, typer.Option(help="--optimizer adam: Dice guidance weight (needs both label maps).")
]
WindowOption = Annotated[
    int | None,
    typer.Option(help="--optimizer greedy: local NCC window, voxels per side (odd; default 5)."),
]
SigmaUpdateOption = Annotated[
    float | None,
    typer.Option(help="--optimizer greedy: Gaussian sigma of each update, voxels (default 2)."),
]
SigmaFieldOption = Annotated[
    float | None,
    typer.Option(
        help="--optimizer greedy: Gaussian sigma of the field at the coarse levels, voxels "
        "(default 0.7071)."
    ),
]
SigmaFieldFullOption = Annotated[
    float | None,
    typer.Option(
        help="--optimizer greedy: Gaussian sigma of the field at full resolution, voxels "
        "(default 0.5; the --sigma-field value with --diffeo, --additive or a mask)."
    ),
]
AdditiveOption = Annotated[
    bool,
    typer.Option(
        "--additive",
        help="--optimizer greedy: add each update to the field instead of composing the two "
        "(a little faster; may fold where the motion is large).",
    ),
]

# register-batch's and evaluate's own options
PrefetchOption = Annotated[
    int,
    typer.Option(
        help="Pairs loaded, checked and prepared (affine, framing) ahead, in a background "
        "thread (at least --batch-size)."
    ),
]
BatchSizeOption = Annotated[
    int,
    typer.Option(
        help="Pairs per network call; worth raising on a GPU (same results, more memory)."
    ),
]
SummaryJsonOption = Annotated[
    bool, typer.Option("--json", help="Print only the summary JSON on stdout.")
]

# Many pairs on many machines: a Dask cluster (vitreg.cluster), or shards of a job array
SchedulerOption = Annotated[
    str | None,
    typer.Option(
        help="Run the pairs on a Dask cluster: its scheduler's address (tcp://host:8786), "
        "a scheduler file (.json), or local:N (N worker processes here). Needs the "
        "'distributed' package (pip install 'vitreg[cluster]')."
    ),
]
ShardOption = Annotated[
    str | None,
    typer.Option(
        help="K/N: only every N-th pair from the K-th (0 <= K < N; in a Slurm job array "
        "--array=0-99: $SLURM_ARRAY_TASK_ID/100), with the summary "
        "summary.shard-K-of-N.csv/json; join the shards with 'vitreg batch-merge'."
    ),
]


def _engine(scheduler: str | None) -> contextlib.AbstractContextManager:
    """The Dask engine for --scheduler (closed on exit), or None without one."""
    if scheduler is None:
        return contextlib.nullcontext()
    from vitreg.cluster import DaskEngine

    return DaskEngine(scheduler)


def _integers(text: str | None, option: str) -> tuple[int, ...] | None:
    """'4,2,1' or '4x2x1' -> (4, 2, 1), None -> None; else a user error about ``option``."""
    if text is None:
        return None
    try:
        return tuple(int(item) for item in re.split(r"[,x]", text))
    except ValueError:
        raise OptionError(option, text, "expected integers separated by ',' or 'x'") from None


def _given(**options: object) -> dict:
    """The options that were given (not None): the others keep the library's defaults."""
    return {name: value for name, value in options.items() if value is not None}


def _with_fallback_note(header: str, weights: str) -> str:
    """``header``, and on a second line (printed once, when the first stage starts, after the
    inputs were checked) that 'default' falls back to optimisation alone when no default
    checkpoint is installed."""
    from vitreg.weights import DEFAULT_ALIAS, NO_DEFAULT_NOTE, default_installed

    if weights != DEFAULT_ALIAS or default_installed():
        return header
    return f"{header}\nvitreg: {NO_DEFAULT_NOTE}"


def _method_text(registration) -> str:
    """'network + greedy (levels 2,1; iterations 20,5)' and the like."""
    parts = ["network"] if registration.network else []
    plan = registration.optimisation
    if plan:
        levels = ",".join(str(n) for n in plan["levels"])
        iterations = ",".join(str(n) for n in plan["iterations"])
        parts.append(f"{plan['optimizer']} (levels {levels}; iterations {iterations})")
    return " + ".join(parts) or "affine only"


def _change(before: float | None, after: float | None, digits: int) -> str:
    return "-" if before is None else f"{before:.{digits}f} → {after:.{digits}f}"


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(help="Fixed (target) image, .nii/.nii.gz/.mgz.")],
    moving: Annotated[Path, typer.Argument(help="Moving image, resampled onto FIXED.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped moving image.")],
    flow: Annotated[Path | None, typer.Option("--flow", help="Displacement field out.")] = None,
    weights: WeightsOption = "default",
    optimize: OptimizeOption = None,
    optimizer: OptimizerOption = "greedy",
    iterations: IterationsOption = None,
    levels: LevelsOption = None,
    smoothness: SmoothnessOption = 5.0,
    device: DeviceOption = "auto",
    flow_format: FlowFormatOption = "itk",
    ants_prefix: AntsPrefixOption = None,
    fixed_labels: FixedLabelsOption = None,
    moving_labels: MovingLabelsOption = None,
    fixed_mask: FixedMaskOption = None,
    moving_mask: MovingMaskOption = None,
    qc: QcPathOption = None,
    offline: OfflineOption = False,
    affine: AffineOption = True,
    affine_out: AffineOutOption = None,
    allow_affine_failure: AllowFailureOption = False,
    check_flip: CheckFlipOption = False,
    diffeo: DiffeoOption = False,
    inverse_flow: InverseOption = None,
    similarity: SimilarityOption = "ncc",
    regularizer: RegularizerOption = "diffusion",
    dice_weight: DiceWeightOption = 0.0,
    window: WindowOption = None,
    sigma_update: SigmaUpdateOption = None,
    sigma_field: SigmaFieldOption = None,
    sigma_field_full: SigmaFieldFullOption = None,
    additive: AdditiveOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Register MOVING to FIXED; write the warped image (and the flow) on FIXED's grid.

    An affine pre-alignment runs first (--no-affine: the inputs must then be roughly aligned
    in world space already); the written flow includes it, so WARPED is one resampling of
    MOVING and the ITK flow applies alone with antsApplyTransforms -t flow.nii.gz. Outputs
    carry FIXED's header; --inverse-flow carries MOVING's. The table shows the files
    written, NCC and Dice before → after, folding, the time and the QC flag (ok, check or
    fail, with its reasons); --json adds the QC indicators and every setting.

    Without a trained checkpoint installed (the default's case today), the field comes from
    test-time optimisation alone: the greedy optimiser (local NCC, Gaussian-smoothed updates,
    levels 4,2,1); with one, the network predicts it and a short optimisation refines it.

    [bold]Example:[/bold] vitreg register examples/fixed.nii.gz examples/moving.nii.gz
    -o warped.nii.gz --flow flow.nii.gz --fixed-labels examples/fixed_labels.nii.gz
    --moving-labels examples/moving_labels.nii.gz
    """
    started = time.time_ns()

    def left_behind() -> str:
        """What an interruption leaves: the outputs are written all together or not at all."""
        outputs = [output, flow, inverse_flow, affine_out, qc]
        written = [p for p in outputs if p and p.is_file() and p.stat().st_mtime_ns >= started]
        return "the outputs were written" if written else "nothing was written"

    with user_errors(interrupted=left_behind):
        from vitreg.pairs import Pair
        from vitreg.register import RegisterSettings
        from vitreg.workflow import OutputPaths, register_pair

        settings = RegisterSettings(
            optimize=optimize,
            optimizer=optimizer,
            iterations=_integers(iterations, "iterations"),
            levels=_integers(levels, "levels"),
            smoothness=smoothness,
            affine=affine,
            allow_affine_failure=allow_affine_failure,
            check_flip=check_flip,
            diffeo=diffeo,
            similarity=similarity,
            regularizer=regularizer,
            dice_weight=dice_weight,
            **_given(
                window=window,
                sigma_update=sigma_update,
                sigma_field=sigma_field,
                sigma_field_full=sigma_field_full,
            ),
            **({"compositive": False} if additive else {}),
        )
        pair = Pair(
            0, moving.name, fixed, moving, fixed_labels, moving_labels,
            fixed_mask=fixed_mask, moving_mask=moving_mask,
        )  # fmt: skip
        paths = OutputPaths(
            output, flow, flow_format, inverse_flow, affine_out, qc=qc, ants_prefix=ants_prefix
        )
        header = f"registering {moving} (moving) to {fixed} (fixed), weights {weights}"
        with stage_progress(quiet, _with_fallback_note(header, weights)) as progress:
            result = register_pair(
                pair, paths, weights, settings=settings, device=device, progress=progress,
                offline=offline or None,
            )  # fmt: skip
        warn(quiet, result.registration.warnings)
        _show_registration(result, paths, weights, settings, as_json, quiet)


def _show_registration(result, paths, weights: str, settings, as_json: bool, quiet: bool) -> None:
    """The register table (what a user looks at first) or the full JSON report."""
    summary = result.summary()
    pair = result.loaded.pair
    outputs = {name: str(path) for name, path in paths.files().items()}
    report = {
        "fixed": str(pair.fixed),
        "moving": str(pair.moving),
        "weights": weights,
        "outputs": outputs,
        **summary,
        "affine_ras": result.registration.affine_ras.round(6).tolist(),
        "affine_stages": list(result.registration.affine_stages),
        "network": result.registration.network,
        "optimisation": result.registration.optimisation,
        "settings": settings.to_dict(),
    }
    rows = [(f"wrote {name}", path) for name, path in outputs.items()]
    rows.append(("method", _method_text(result.registration)))
    rows.append(("NCC", _change(summary["ncc_before"], summary["ncc_after"], 3)))
    rows.append(("Dice", _change(summary.get("dice_before"), summary.get("dice_after"), 3)))
    rows.append(("% folding (det J ≤ 0)", f"{summary['percent_nonpositive']:.4f}"))
    rows.append(("seconds", f"{summary['seconds']:.1f} on {summary['device']}"))
    rows.append(("QC flag", "; ".join([summary["qc_flag"], *summary["qc_reasons"]])))
    show_result("vitreg register", rows, report, as_json, quiet)


@app.command("register-batch")
def register_batch(
    pairs: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns fixed,moving[,name|id][,fixed_labels,moving_labels]"
            "[,fixed_mask][,moving_mask] (cost-function masks, as register's --fixed-mask); "
            "relative paths are read from the CSV's folder."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for outputs and summary.")],
    weights: WeightsOption = "default",
    optimize: OptimizeOption = None,
    optimizer: OptimizerOption = "greedy",
    iterations: IterationsOption = None,
    levels: LevelsOption = None,
    smoothness: SmoothnessOption = 5.0,
    device: DeviceOption = "auto",
    qc: Annotated[bool, typer.Option("--qc", help="Also write NAME_qc.png per pair.")] = False,
    report: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Also write OUT_DIR/report.html: every pair's QC figure, indicators and flag, "
            "flagged pairs first, and the failed rows (implies --qc; opens offline).",
        ),
    ] = False,
    affine: AffineOption = True,
    check_flip: CheckFlipOption = False,
    diffeo: DiffeoOption = False,
    prefetch: PrefetchOption = 2,
    batch_size: BatchSizeOption = 1,
    offline: OfflineOption = False,
    scheduler: SchedulerOption = None,
    shard: ShardOption = None,
    as_json: SummaryJsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Register every pair listed in PAIRS with one model load; resumable.

    A background thread loads and prepares the next pairs (affine, framing) while the
    network runs on --batch-size of them at a time; the batch size does not change results.

    Per pair NAME (the name/id column, else the moving file's name, or MOVING_to_FIXED where
    rows share a moving file), on the fixed grid: NAME_warped.nii.gz, NAME_flow.nii.gz
    (ITK), NAME_warped_labels.nii.gz (labels given).

    OUT_DIR/summary.csv and summary.json: seconds, NCC, folding (% det J <= 0 in the
    fixed head), SDlogJ, Dice and the QC flag (ok, check or fail) with its reasons and
    indicators per pair; the number of flagged pairs is printed. A rerun (after Ctrl-C, a
    crash) skips the pairs already finished. One run at a time per OUT_DIR: a second one
    stops at once.

    A failing pair is reported with its CSV line and the others go on; the exit code is
    then 1 (2 for a usage error such as a bad CSV header).

    Many machines: --scheduler runs the pairs on a Dask cluster (each worker loads the
    model once and writes its pairs' files; this process keeps the summary). --shard K/N
    runs one part of a job array; 'vitreg batch-merge' then checks and joins the shards.

    [bold]Example:[/bold] vitreg register-batch examples/pairs.csv --out-dir results
    --iterations 10,5,0 --report
    """

    def resumes() -> str:
        """What an interruption leaves: the summary (the shard's own) to resume from."""
        from vitreg.shards import Shard

        stem = "summary" if shard is None else Shard.parse(shard).stem
        return f"the pairs finished are recorded in {out_dir / stem}.csv; the same command resumes"

    with user_errors(interrupted=resumes):
        from vitreg.batch import register_batch as run_batch
        from vitreg.register import RegisterSettings
        from vitreg.shards import Shard

        settings = RegisterSettings(
            optimize=optimize, optimizer=optimizer, iterations=_integers(iterations, "iterations"),
            levels=_integers(levels, "levels"), smoothness=smoothness, affine=affine,
            diffeo=diffeo, check_flip=check_flip,
        )  # fmt: skip
        part = Shard.parse(shard) if shard is not None else None
        header = f"registering the pairs of {pairs} (moving to fixed) into {out_dir}"
        with (
            _engine(scheduler) as engine,
            stage_progress(quiet, _with_fallback_note(header, weights)) as progress,
        ):

            def show_failure(record: dict, error: VitregError | None) -> None:
                if error is not None:
                    show_error(f"{pairs}:{record['row']}: {error_text(error)}")

            result = run_batch(
                pairs, out_dir, weights, settings=settings, device=device, qc=qc,
                prefetch=prefetch, batch_size=batch_size, progress=progress,
                on_record=show_failure, offline=offline or None, report=report, shard=part,
                engine=engine,
            )  # fmt: skip
    if as_json:
        print(result.summary_json.read_text().strip())
    elif not quiet:
        columns = ("row", "name", "status", "qc_flag", "seconds", "percent_nonpositive")
        rows = [
            [record.get(column, "") for column in columns]
            + [record.get("dice_after", "")]
            + ["ok (earlier run)" if record["resumed"] else record["error"]]
            for record in result.records
        ]
        titles = ["row", "name", "status", "QC", "seconds", "% folding", "Dice after", "note"]
        show_table("vitreg register-batch", titles, rows)
        say(quiet, f"summary: {result.summary_csv} and {result.summary_json}")
        if result.report is not None:
            say(quiet, f"report: {result.report}")
    flagged = result.flagged
    registered = len(result.records) - len(result.failed)
    count = len(flagged["check"]) + len(flagged["fail"])
    say(
        quiet,
        f"QC: {count} of {registered} registered pairs flagged ({len(flagged['fail'])} fail, "
        f"{len(flagged['check'])} check)",
        "yellow" if count else "",
    )
    if result.failed:
        say(quiet, f"{len(result.failed)} of {len(result.records)} pairs failed", "red")
        raise typer.Exit(BATCH_FAILED_EXIT_CODE)


@app.command("batch-merge")
def batch_merge(
    folders: Annotated[
        list[Path],
        typer.Argument(help="Folders holding the shards' summary.shard-K-of-N.json files."),
    ],
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Folder for the merged summary (default: the first)."),
    ] = None,
    as_json: SummaryJsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Join the summaries of 'register-batch --shard K/N' runs into summary.csv and
    summary.json, checking that every shard 0..N-1 ran and every pair is recorded once.

    Holes (a shard that never ran, pairs a shard did not finish) and pairs recorded twice
    are named, and nothing is written (exit code 2); a failed pair is a failed row (exit
    code 1). A later register-batch without --shard resumes from the merged summary.

    [bold]Example:[/bold] vitreg batch-merge shards
    """
    with user_errors():
        from vitreg.batch import merge_shards

        result = merge_shards(folders, out_dir)
    if as_json:
        print(result.summary_json.read_text().strip())
    elif not quiet:
        counts = {s: sum(r["status"] == s for r in result.records) for s in ("ok", "failed")}
        rows = [("pairs", str(len(result.records))), *((k, str(v)) for k, v in counts.items())]
        rows.append(("wrote", f"{result.summary_csv} and {result.summary_json}"))
        show_result("vitreg batch-merge", rows, {}, False, quiet)
    if result.failed:
        say(quiet, f"{len(result.failed)} of {len(result.records)} pairs failed", "red")
        raise typer.Exit(BATCH_FAILED_EXIT_CODE)


@app.command()
def qc(
    fixed: Annotated[Path, typer.Argument(help="Fixed image.")],
    moving: Annotated[Path, typer.Argument(help="Moving image (any grid).")],
    warped: Annotated[Path, typer.Argument(help="Warped moving image, on FIXED's grid.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The figure, .png.")],
    flow: Annotated[
        Path | None,
        typer.Option(help="Flow on FIXED's grid: adds the deformed grid and det J panels."),
    ] = None,
    title: Annotated[str | None, typer.Option(help="Figure title (default: file names).")] = None,
    dpi: Annotated[int, typer.Option(help="Resolution (pixels per inch of a 2.1 in panel).")] = 90,
    flow_format: ReadFlowFormatOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Quality-control figure: axial, coronal and sagittal slices through the fixed head.

    Columns: fixed, moving (resampled onto FIXED's grid), warped, a checkerboard of fixed and
    warped, and with --flow the deformed grid and the Jacobian determinant with a colour
    bar. Neurological view (the subject's right on the right), letters on every panel.

    [bold]Example:[/bold] vitreg qc examples/fixed.nii.gz examples/moving.nii.gz
    warped.nii.gz --flow flow.nii.gz -o qc.png
    """
    with user_errors():
        from vitreg.qc import qc_files

        path = qc_files(fixed, moving, warped, output, flow, title, dpi, flow_format)
        show_result("vitreg qc", [("wrote", str(path))], {"qc": str(path)}, as_json, quiet)


@app.command()
def evaluate(
    pairs: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns fixed, moving [, fixed_labels, moving_labels, true_flow, "
            "mask, lut, set, name, fixed_mask, moving_mask]; paths relative to the CSV (mask: "
            "where folding and errors are measured; fixed_mask/moving_mask: cost-function "
            "masks, as register's --fixed-mask)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.csv, dice.csv and summary.json.")
    ],
    weights: WeightsOption = "default",
    optimize: OptimizeOption = None,
    optimizer: OptimizerOption = "greedy",
    iterations: IterationsOption = None,
    levels: LevelsOption = None,
    smoothness: SmoothnessOption = 5.0,
    device: DeviceOption = "auto",
    groups: Annotated[
        bool, typer.Option("--groups", help="Merge left/right structures (Dice averaged).")
    ] = False,
    affine: AffineOption = True,
    diffeo: DiffeoOption = False,
    offline: OfflineOption = False,
    scheduler: SchedulerOption = None,
    as_json: SummaryJsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Register every pair of PAIRS and score it: Dice per structure, folding (det <= 0),
    SDlogJ, end-point error against a true flow, wall time and peak memory.

    [bold]Example:[/bold] vitreg evaluate examples/pairs.csv --out eval --iterations 10,5,0
    --groups
    """
    with user_errors():
        from vitreg.evaluate import evaluate_csv
        from vitreg.register import RegisterSettings

        settings = RegisterSettings(
            optimize=optimize, optimizer=optimizer, iterations=_integers(iterations, "iterations"),
            levels=_integers(levels, "levels"), smoothness=smoothness, affine=affine,
            diffeo=diffeo,
        )  # fmt: skip
        header = f"evaluating the pairs of {pairs}, weights {weights}"
        with (
            _engine(scheduler) as engine,
            stage_progress(quiet, _with_fallback_note(header, weights)) as progress,
        ):
            result = evaluate_csv(
                pairs, out, weights, settings=settings, device=device, groups=groups,
                progress=progress, offline=offline or None, engine=engine,
            )  # fmt: skip
    if as_json:
        show_result("", [], result.summary, True, quiet)
    elif not quiet:
        _show_evaluation(result.summary, groups)
        say(quiet, f"wrote {', '.join(str(path) for path in result.written.values())}")


def _cell(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


EVALUATION_COLUMNS = {
    "dice_mean": ("Dice", 3),
    "percent_nonpositive": ("% det≤0", 3),
    "sdlogj": ("SDlogJ", 3),
    "epe_mm": ("EPE mm", 2),
    "correlation_after": ("corr", 3),
    "seconds": ("seconds", 1),
    "peak_memory_mib": ("peak MiB", 0),
}


def _show_evaluation(summary: dict, groups: bool) -> None:
    """Mean ± sd per set of the scalar metrics (and of the structure groups with --groups)."""
    titles = ["set", "pairs", *(title for title, _ in EVALUATION_COLUMNS.values())]
    rows = [
        [name, values["pairs"]]
        + [_cell(values[key], digits) for key, (_, digits) in EVALUATION_COLUMNS.items()]
        for name, values in summary.items()
    ]
    show_table("vitreg evaluate (mean ± sd)", titles, rows)
    for set_name, values in summary.items():
        if groups and values["groups"]:
            rows = [[name, _cell(stats, 3)] for name, stats in sorted(values["groups"].items())]
            title = f"Dice per structure, left/right merged: {set_name}"
            show_table(title, ["structure", "Dice"], rows)


OptionalFlowArgument = Annotated[
    Path | None,
    typer.Argument(help="Flow written by 'vitreg register' (or ANTs, greedy, SynthMorph)."),
]


@app.command()
def warp(
    image: Annotated[Path, typer.Argument(help="Image to warp (on any grid).")],
    flow: OptionalFlowArgument = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped image.")] = ...,
    transform: TransformOption = None,
    flow_format: ReadFlowFormatOption = "auto",
    reference: Annotated[
        Path | None,
        typer.Option(help="Output grid (with -t), or the fixed image whose header is copied."),
    ] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Apply a saved flow, or a list of transforms (-t, as antsApplyTransforms), to IMAGE
    (trilinear); the output lies on the flow's grid (with -t: --reference's, else the first
    warp's).

    [bold]Example:[/bold] vitreg warp examples/moving.nii.gz flow.nii.gz
    -o moving_on_fixed.nii.gz --reference examples/fixed.nii.gz
    """
    with user_errors():
        from vitreg.exchange import warp_image_with

        path = warp_image_with(image, output, flow, transform or (), reference, flow_format, device)
        data = {"image": str(image), "flow": _flow_text(flow, transform), "warped": str(path)}
        show_result("vitreg warp", [("wrote", str(path))], data, as_json, quiet)


def _flow_text(flow: Path | None, transforms: list[str] | None) -> str:
    """The flow file, or the transform list as antsApplyTransforms' arguments."""
    return str(flow) if flow is not None else " ".join(f"-t {t}" for t in transforms or ())


@app.command("warp-labels")
def warp_labels(
    labels: Annotated[Path, typer.Argument(help="Integer label map (e.g. aseg.mgz).")],
    flow: OptionalFlowArgument = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped label map.")] = ...,
    transform: TransformOption = None,
    flow_format: ReadFlowFormatOption = "auto",
    method: Annotated[
        str, typer.Option(help="nearest, or linear (one-hot trilinear then argmax).")
    ] = "nearest",
    reference: Annotated[
        Path | None,
        typer.Option(help="Output grid (with -t), or the fixed image whose header is copied."),
    ] = None,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Warp a label map with a saved flow or a list of transforms (-t, as
    antsApplyTransforms); keeps the label values and integer type.

    [bold]Example:[/bold] vitreg warp-labels examples/moving_labels.nii.gz flow.nii.gz
    -o warped_labels.nii.gz --method linear
    """
    with user_errors():
        from vitreg.exchange import warp_labels_with

        path = warp_labels_with(
            labels, output, flow, transform or (), method, reference, flow_format, device
        )
        data = {
            "labels": str(labels),
            "flow": _flow_text(flow, transform),
            "warped": str(path),
            "method": method,
        }
        show_result("vitreg warp-labels", [("wrote", str(path))], data, as_json, quiet)


@app.command()
def jacobian(
    flow: FlowArgument,
    output: Annotated[Path, typer.Option("-o", "--output", help="Jacobian determinant map.")],
    mask: Annotated[Path | None, typer.Option(help="Only count voxels inside this mask.")] = None,
    flow_format: ReadFlowFormatOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Jacobian determinant of x + u on the flow's grid; prints folding and SDlogJ.

    [bold]Example:[/bold] vitreg jacobian flow.nii.gz -o jacdet.nii.gz
    --mask examples/fixed_labels.nii.gz
    """
    with user_errors():
        from vitreg.assess import jacobian_file

        summary = jacobian_file(flow, output, mask, flow_format)
        rows = [(key, str(value)) for key, value in summary.items()]
        show_result("vitreg jacobian", rows, summary, as_json, quiet)


@app.command()
def dice(
    a: Annotated[Path, typer.Argument(help="First label map (e.g. the fixed aseg).")],
    b: Annotated[Path, typer.Argument(help="Second label map on the same grid.")],
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated labels (default: all non-zero).")
    ] = None,
    lut: Annotated[
        Path | None, typer.Option(help="Colour table 'index name ...' (default FreeSurfer).")
    ] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Also write a CSV file.")] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Per-label Dice of two label maps on the same grid, with names and the mean.

    [bold]Example:[/bold] vitreg dice examples/fixed_labels.nii.gz warped_labels.nii.gz
    --lut examples/tissue_lut.txt --csv dice.csv
    """
    with user_errors():
        from vitreg.assess import dice_files

        wanted = _integers(labels, "labels") if labels else None
        report = dice_files(a, b, wanted, lut, csv_out)
    if as_json:
        show_result("", [], report, True, quiet)
        return
    if not quiet:
        rows = [[row["label"], row["name"], f"{row['dice']:.4f}"] for row in report["labels"]]
        rows.append(["", "mean", f"{report['mean']:.4f}"])
        show_table(f"Dice {a.name} vs {b.name}", ["label", "name", "dice"], rows)
    for side in ("a", "b"):
        if report[f"missing_in_{side}"]:
            labels_missing = ", ".join(map(str, report[f"missing_in_{side}"]))
            say(quiet, f"labels missing in {side}: {labels_missing}")


app.command()(train)

if __name__ == "__main__":
    app()
