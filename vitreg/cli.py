"""The ``vitreg`` command line: parse, call the Python API, print. Nothing else lives here.

torch and the API modules are imported inside the commands, so ``vitreg --help`` is instant.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from vitreg.cli_weights import weights_app
from vitreg.console import download_progress, stderr, stdout, user_errors
from vitreg.errors import VitregError

app = typer.Typer(
    name="vitreg",
    help="Deformable registration of 3D brain MRI with ViT-V-Net.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
app.add_typer(weights_app, name="weights")


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=True,
    )


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


# Options that the registering commands share.
WeightsOption = Annotated[
    str, typer.Option(help="Checkpoint name, path, or 'none' (optimisation only).")
]
OptimizeOption = Annotated[
    int, typer.Option(help="Steps of test-time optimisation (local NCC + diffusion).")
]
SmoothnessOption = Annotated[
    float, typer.Option(help="Weight of the diffusion term in --optimize (higher: smoother).")
]


AffineOption = Annotated[
    bool, typer.Option(help="Affine pre-alignment (moments, rigid, affine by MI) first.")
]
DiffeoOption = Annotated[
    bool, typer.Option(help="Diffeomorphic: integrate a stationary velocity (no folding).")
]


def _load_model(weights: str, offline: bool, quiet: bool):
    """(model, frame, name) for --weights: (None, None, 'none') for 'none'."""
    if weights.lower() == "none":
        return None, None, "none"
    from vitreg.weights import build_model, read_checkpoint, resolve

    bar, report_download = download_progress(quiet)
    with bar:
        path = resolve(weights, offline=offline or None, progress=report_download)
    checkpoint = read_checkpoint(path)
    return build_model(checkpoint), checkpoint.frame, weights


def _stage_reporter(bar: Progress):
    """A register/batch progress callback that gives each stage its own bar."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return report


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(help="Fixed (target) image, .nii/.nii.gz/.mgz.")],
    moving: Annotated[Path, typer.Argument(help="Moving image, resampled onto FIXED.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped moving image.")],
    flow: Annotated[Path | None, typer.Option("--flow", help="Displacement field out.")] = None,
    weights: WeightsOption = "default",
    optimize: OptimizeOption = 0,
    smoothness: SmoothnessOption = 5.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    flow_format: Annotated[
        str, typer.Option(help="itk (ANTs/SimpleITK, LPS mm) or voxel (fixed-grid voxels).")
    ] = "itk",
    fixed_labels: Annotated[
        Path | None, typer.Option(help="Fixed label map: report Dice before/after.")
    ] = None,
    moving_labels: Annotated[
        Path | None, typer.Option(help="Moving label map: report Dice before/after.")
    ] = None,
    qc: Annotated[
        Path | None, typer.Option("--qc", help="Also write a QC figure (PNG, see 'vitreg qc').")
    ] = None,
    offline: Annotated[bool, typer.Option(help="Never download weights.")] = False,
    affine: AffineOption = True,
    affine_out: Annotated[
        Path | None, typer.Option(help="Write the affine as an ITK .mat (ANTs) or .tfm file.")
    ] = None,
    allow_affine_failure: Annotated[
        bool, typer.Option(help="If the affine fails, warn and go on with the centring only.")
    ] = False,
    diffeo: DiffeoOption = False,
    inverse_flow: Annotated[
        Path | None, typer.Option(help="Moving-to-fixed flow out, on MOVING's grid (ITK).")
    ] = None,
    similarity: Annotated[
        str, typer.Option(help="--optimize similarity: ncc (local), mse or mi (mutual info).")
    ] = "ncc",
    regularizer: Annotated[
        str, typer.Option(help="--optimize penalty: diffusion or bending.")
    ] = "diffusion",
    levels: Annotated[
        str, typer.Option(help="--optimize coarse-to-fine downsampling factors, e.g. 4,2,1.")
    ] = "4,2",
    dice_weight: Annotated[
        float, typer.Option(help="--optimize Dice guidance weight (needs both label maps).")
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages.")] = False,
) -> None:
    """Register MOVING to FIXED; write the warped image (and the flow) on FIXED's grid.

    An affine pre-alignment runs first (--no-affine: the inputs must then be roughly aligned
    in world space already); the written flow includes it, so WARPED is one resampling of
    MOVING and the ITK flow applies alone with antsApplyTransforms -t flow.nii.gz. Outputs
    carry FIXED's header; --inverse-flow carries MOVING's.

    [bold]Example:[/bold] vitreg register fixed.nii.gz moving.nii.gz -o warped.nii.gz
    --flow flow.nii.gz --affine-out affine.mat --inverse-flow inverse.nii.gz --diffeo
    --weights none --optimize 100
    """
    with user_errors():
        from vitreg.affine import check_affine_path, save_affine
        from vitreg.field import check_flow_writable, check_same_grid, save_flow
        from vitreg.image import Volume, check_writable, load_image, load_labels, save
        from vitreg.qc import check_png_writable, qc_figure
        from vitreg.register import choose_device, dice_before_after, invert
        from vitreg.register import register as run_registration

        if flow_format not in ("itk", "voxel"):
            raise VitregError(f"--flow-format {flow_format}: expected itk or voxel")
        if (fixed_labels is None) != (moving_labels is None):
            raise VitregError("--fixed-labels and --moving-labels go together")
        if dice_weight > 0 and fixed_labels is None:
            raise VitregError("--dice-weight needs --fixed-labels and --moving-labels")
        if affine_out is not None and not affine:
            raise VitregError(f"{affine_out}: --affine-out needs the affine step (not --no-affine)")
        level_factors = _parse_levels(levels)
        choose_device(device)
        check_writable(output)
        for path in (flow, inverse_flow):
            if path is not None:
                check_flow_writable(path, flow_format)
        if qc is not None:
            check_png_writable(qc)
        if affine_out is not None:
            check_affine_path(affine_out)
        fixed_volume, moving_volume = load_image(fixed), load_image(moving)
        label_pair = None
        if fixed_labels is not None and moving_labels is not None:
            label_pair = (load_labels(fixed_labels), load_labels(moving_labels))
            check_same_grid(fixed_volume, label_pair[0])  # before the long work, not after
        model, frame, weights_name = _load_model(weights, offline, quiet)
        if not quiet:
            stderr.print(
                f"registering {moving} (moving) to {fixed} (fixed), weights {weights_name}"
            )
        with _progress(quiet) as bar:
            result = run_registration(
                fixed_volume,
                moving_volume,
                model=model,
                frame=frame,
                optimize=optimize,
                smoothness=smoothness,
                device=device,
                progress=_stage_reporter(bar),
                affine=affine,
                allow_affine_failure=allow_affine_failure,
                diffeo=diffeo,
                levels=level_factors,
                similarity=similarity,
                regularizer=regularizer,
                labels=label_pair if dice_weight > 0 else None,
                dice_weight=dice_weight,
            )
            inverse = invert(result, moving_volume) if inverse_flow is not None else None
        for warning in result.warnings:
            stderr.print(f"[yellow]vitreg: warning:[/] {warning}", highlight=False)
        save(output, result.warped.astype("float32"), fixed_volume)
        if flow is not None:
            save_flow(flow, result.field, flow_format)
        if qc is not None:
            warped_volume = Volume(result.warped, fixed_volume.affine, fixed_volume.header, output)
            qc_figure(qc, fixed_volume, moving_volume, warped_volume, result.field)

        if inverse is not None:
            save_flow(inverse_flow, inverse.field, flow_format)
        if affine_out is not None:
            save_affine(affine_out, result.affine_ras)
        summary = {
            "fixed": str(fixed),
            "moving": str(moving),
            "warped": str(output),
            "flow": str(flow) if flow else None,
            "qc": str(qc) if qc else None,
            "weights": weights_name,
            "optimize_steps": optimize,
            "smoothness": smoothness,
            "affine": affine,
            "affine_out": str(affine_out) if affine_out else None,
            "diffeo": diffeo,
            "similarity": similarity,
            "regularizer": regularizer,
            "levels": list(level_factors),
            "dice_weight": dice_weight,
            "device": result.device,
            "seconds": round(result.seconds, 2),
            "ncc_before": round(result.ncc_before, 4),
            "ncc_after": round(result.ncc_after, 4),
        }
        if inverse is not None:
            summary["inverse_flow"] = str(inverse_flow)
            summary["inverse_exact"] = inverse.exact
            summary["inverse_residual_mean_mm"] = round(inverse.residual_mean_mm, 4)
            summary["inverse_residual_max_mm"] = round(inverse.residual_max_mm, 4)
        if label_pair is not None:
            before, after = dice_before_after(*label_pair, result.field)
            summary["dice_before"], summary["dice_after"] = round(before, 4), round(after, 4)
        if as_json:
            summary["affine_ras"] = result.affine_ras.round(6).tolist()
            print(json.dumps(summary))
        elif not quiet:
            _print_table("vitreg register", [(k, str(v)) for k, v in summary.items()])


BATCH_FAILED_EXIT_CODE = 1


@app.command("register-batch")
def register_batch(
    pairs: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns fixed,moving[,name|id][,fixed_labels,moving_labels]; "
            "relative paths are read from the CSV's folder."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Folder for outputs and summary.")],
    weights: WeightsOption = "default",
    optimize: OptimizeOption = 0,
    smoothness: SmoothnessOption = 5.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    qc: Annotated[bool, typer.Option("--qc", help="Also write NAME_qc.png per pair.")] = False,
    affine: AffineOption = True,
    diffeo: DiffeoOption = False,
    prefetch: Annotated[
        int,
        typer.Option(
            help="Pairs loaded, checked and prepared (affine, framing) ahead, in a background "
            "thread (at least --batch-size)."
        ),
    ] = 2,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Pairs per network call; worth raising on a GPU (same results, more memory)."
        ),
    ] = 1,
    offline: Annotated[bool, typer.Option(help="Never download weights.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the summary JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages.")] = False,
) -> None:
    """Register every pair listed in PAIRS with one model load; resumable.

    A background thread loads and prepares the next pairs (affine, framing) while the
    network runs on --batch-size of them at a time; the batch size does not change results.

    Per pair NAME (the name/id column, else the moving file's name), on the fixed grid:
    NAME_warped.nii.gz, NAME_flow.nii.gz (ITK), NAME_warped_labels.nii.gz (labels given).

    OUT_DIR/summary.csv and summary.json: seconds, NCC, folding (% det J <= 0 in the
    fixed head), SDlogJ and Dice per pair. A rerun skips the pairs already finished.

    A failing pair is reported with its CSV line and the others go on; the exit code is
    then 1 (2 for a usage error such as a bad CSV header).

    [bold]Example:[/bold] vitreg register-batch pairs.csv --out-dir results --weights none
    --optimize 100
    """
    with user_errors():
        from vitreg.batch import check_counts, read_pairs
        from vitreg.batch import register_batch as run_batch
        from vitreg.register import RegisterSettings, choose_device

        choose_device(device)
        check_counts(prefetch, batch_size)
        read_pairs(pairs)  # a bad CSV or bad options are reported before the model loads
        RegisterSettings(optimize=optimize, smoothness=smoothness, diffeo=diffeo)
        model, frame, weights_name = _load_model(weights, offline, quiet)
        if not quiet:
            stderr.print(f"registering the pairs of {pairs} (moving to fixed) into {out_dir}")
        with _progress(quiet) as bar:

            def show_failure(record: dict) -> None:
                if record["status"] == "failed" and not quiet:
                    bar.console.print(
                        f"[red]failed:[/] {record['error']}", highlight=False, soft_wrap=True
                    )

            result = run_batch(
                pairs,
                out_dir,
                model=model,
                frame=frame,
                weights_name=weights_name,
                optimize=optimize,
                smoothness=smoothness,
                device=device,
                qc=qc,
                prefetch=prefetch,
                batch_size=batch_size,
                progress=_stage_reporter(bar),
                on_record=show_failure,
                affine=affine,
                diffeo=diffeo,
            )
    if as_json:
        print(result.summary_json.read_text().strip())
    elif not quiet:
        _print_batch_table(result.records)
        stderr.print(f"summary: {result.summary_csv} and {result.summary_json}")
    if result.failed:
        if not quiet:
            stderr.print(f"[red]{len(result.failed)} of {len(result.records)} pairs failed[/]")
        raise typer.Exit(BATCH_FAILED_EXIT_CODE)


def _print_batch_table(records: list[dict]) -> None:
    table = Table(title="vitreg register-batch")
    columns = ("row", "name", "status", "seconds", "percent_folding", "dice_after", "error")
    for column in columns:
        table.add_column(column.replace("percent_folding", "% folding"))
    for record in records:
        status = (
            "ok (earlier run)"
            if record["status"] == "ok" and record["resumed"]
            else record["status"]
        )
        values = {**record, "status": status}
        table.add_row(*(str(values.get(column, "")) for column in columns))
    stdout.print(table)


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
) -> None:
    """Quality-control figure: axial, coronal and sagittal slices through the fixed head.

    Columns: fixed, moving (resampled onto FIXED's grid), warped, a checkerboard of fixed and
    warped, and with --flow the deformed grid and the Jacobian determinant with a colour
    bar. Neurological view (the subject's right on the right), letters on every panel.

    [bold]Example:[/bold] vitreg qc fixed.nii.gz moving.nii.gz warped.nii.gz --flow
    flow.nii.gz -o qc.png
    """
    with user_errors():
        from vitreg.image import load_image
        from vitreg.qc import check_png_writable, qc_figure

        if dpi < 20 or dpi > 600:
            raise VitregError(f"--dpi {dpi}: expected 20 to 600")
        check_png_writable(output)
        fixed_volume = load_image(fixed)
        field = _load_field(flow, fixed) if flow is not None else None
        qc_figure(
            output,
            fixed_volume,
            load_image(moving),
            load_image(warped),
            field,
            title=title,
            dpi=dpi,
        )


@app.command()
def evaluate(
    pairs: Annotated[
        Path,
        typer.Argument(
            help="CSV with columns fixed, moving [, fixed_labels, moving_labels, true_flow, "
            "mask, lut, set, name]; paths relative to the CSV."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for results.csv, dice.csv and summary.json.")
    ],
    weights: WeightsOption = "default",
    optimize: OptimizeOption = 0,
    smoothness: SmoothnessOption = 5.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    groups: Annotated[
        bool, typer.Option("--groups", help="Merge left/right structures (Dice averaged).")
    ] = False,
    affine: AffineOption = True,
    diffeo: DiffeoOption = False,
    offline: Annotated[bool, typer.Option(help="Never download weights.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print only the summary JSON on stdout.")
    ] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages.")] = False,
) -> None:
    """Register every pair of PAIRS and score it: Dice per structure, folding (det <= 0),
    SDlogJ, end-point error against a true flow, wall time and peak memory.

    [bold]Example:[/bold] vitreg evaluate sets/pairs.csv --out eval/ --weights none
    --optimize 100 --groups
    """
    with user_errors():
        from vitreg.evaluate import evaluate as run_evaluation
        from vitreg.evaluate import read_pairs, summarise, write_results
        from vitreg.register import choose_device

        choose_device(device)
        pair_list = read_pairs(pairs)
        model, frame, weights_name = _load_model(weights, offline, quiet)
        if not quiet:
            stderr.print(f"evaluating {len(pair_list)} pairs from {pairs}, weights {weights_name}")
        with _progress(quiet) as bar:
            results = run_evaluation(
                pair_list,
                progress=_stage_reporter(bar),
                model=model,
                frame=frame,
                optimize=optimize,
                smoothness=smoothness,
                device=device,
                affine=affine,
                diffeo=diffeo,
            )
        summary = summarise(results)
        written = write_results(out, results, summary, groups)
        if as_json:
            print(json.dumps(summary))
            return
        if not quiet:
            _print_summary(summary, groups)
            stderr.print(f"wrote {', '.join(str(path) for path in written.values())}")


def _cell(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _print_summary(summary: dict, groups: bool) -> None:
    """Mean ± sd per set of the scalar metrics (and of the structure groups with --groups)."""
    columns = {
        "dice_mean": ("Dice", 3),
        "percent_nonpositive": ("% det≤0", 3),
        "sdlogj": ("SDlogJ", 3),
        "epe_mm": ("EPE mm", 2),
        "correlation_after": ("corr", 3),
        "seconds": ("seconds", 1),
        "peak_memory_mib": ("peak MiB", 0),
    }
    table = Table(title="vitreg evaluate (mean ± sd)")
    table.add_column("set")
    table.add_column("pairs", justify="right")
    for title, _ in columns.values():
        table.add_column(title, justify="right")
    for set_name, values in summary.items():
        cells = [_cell(values[key], digits) for key, (_, digits) in columns.items()]
        table.add_row(set_name, str(values["pairs"]), *cells)
    stdout.print(table)
    if not groups:
        return
    for set_name, values in summary.items():
        if values["groups"]:
            group_table = Table(title=f"Dice per structure, left/right merged: {set_name}")
            group_table.add_column("structure")
            group_table.add_column("Dice", justify="right")
            for name, stats in sorted(values["groups"].items()):
                group_table.add_row(name, _cell(stats, 3))
            stdout.print(group_table)


def _parse_levels(text: str) -> tuple[int, ...]:
    """'4,2,1' -> (4, 2, 1); a bad entry is a user error."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise VitregError(f"--levels {text!r}: expected comma-separated integers") from None


@app.command()
def warp(
    image: Annotated[Path, typer.Argument(help="Image to warp (on any grid).")],
    flow: Annotated[Path, typer.Argument(help="Flow written by 'vitreg register'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped image.")],
    reference: Annotated[
        Path | None, typer.Option(help="Fixed image: its header is copied (same grid).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Apply a saved flow to IMAGE (trilinear); the output lies on the flow's (fixed) grid.

    [bold]Example:[/bold] vitreg warp moving_T2.nii.gz flow.nii.gz -o T2_on_fixed.nii.gz
    """
    with user_errors():
        from vitreg.field import warp_image
        from vitreg.image import check_writable, load_image, save
        from vitreg.register import choose_device

        torch_device = choose_device(device)
        check_writable(output)
        field = _load_field(flow, reference)
        warped = warp_image(load_image(image), field, torch_device)
        save(output, warped.astype("float32"), field.grid)


def _load_field(flow: Path, reference: Path | None):
    """The flow, with the reference image as its grid when given (after a grid check)."""
    from vitreg.field import DisplacementField, check_same_grid, load_flow
    from vitreg.image import load_image

    field = load_flow(flow)
    if reference is None:
        return field
    grid = load_image(reference)
    check_same_grid(grid, field.grid)
    return DisplacementField(disp_mm=field.disp_mm, grid=grid)


@app.command("warp-labels")
def warp_labels(
    labels: Annotated[Path, typer.Argument(help="Integer label map (e.g. aseg.mgz).")],
    flow: Annotated[Path, typer.Argument(help="Flow written by 'vitreg register'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped label map.")],
    method: Annotated[
        str, typer.Option(help="nearest, or linear (one-hot trilinear then argmax).")
    ] = "nearest",
    reference: Annotated[
        Path | None, typer.Option(help="Fixed image: its header is copied (same grid).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Warp a label map with a saved flow; keeps the label values and integer type.

    [bold]Example:[/bold] vitreg warp-labels moving_aseg.nii.gz flow.nii.gz -o warped_aseg.nii.gz
    --method linear
    """
    with user_errors():
        from vitreg.field import warp_labels_linear, warp_labels_nearest
        from vitreg.image import check_writable, label_dtype, load_labels, save
        from vitreg.register import choose_device

        if method not in ("nearest", "linear"):
            raise VitregError(f"--method {method}: expected nearest or linear")
        torch_device = choose_device(device)
        check_writable(output)
        field = _load_field(flow, reference)
        source = load_labels(labels)
        warp_fn = warp_labels_linear if method == "linear" else warp_labels_nearest
        warped = warp_fn(source, field, torch_device)
        save(output, warped.astype(label_dtype(source)), field.grid)


@app.command()
def jacobian(
    flow: Annotated[Path, typer.Argument(help="Flow written by 'vitreg register'.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Jacobian determinant map.")],
    mask: Annotated[Path | None, typer.Option(help="Only count voxels inside this mask.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Jacobian determinant of x + u on the flow's grid; prints folding and SDlogJ.

    [bold]Example:[/bold] vitreg jacobian flow.nii.gz -o jacdet.nii.gz --mask brainmask.nii.gz
    """
    with user_errors():
        from vitreg.field import check_same_grid, load_flow
        from vitreg.image import check_writable, load_labels, save
        from vitreg.metrics import folding, jacobian_determinant

        check_writable(output)
        field = load_flow(flow)
        jacdet = jacobian_determinant(field.to_voxels()[0].numpy()).astype("float32")
        region = None
        if mask is not None:
            mask_volume = load_labels(mask)
            check_same_grid(field.grid, mask_volume)
            region = mask_volume.data > 0
        stats = folding(jacdet, region)
        save(output, jacdet, field.grid)
        summary = {
            "flow": str(flow),
            "voxels": int(region.sum()) if region is not None else int(jacdet.size),
            "count_nonpositive": stats.count_nonpositive,
            "percent_nonpositive": round(stats.percent_nonpositive, 6),
            "sdlogj": round(stats.sdlogj, 6),
        }
        if as_json:
            print(json.dumps(summary))
        else:
            _print_table("vitreg jacobian", [(k, str(v)) for k, v in summary.items()])


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
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Per-label Dice of two label maps on the same grid, with names and the mean.

    [bold]Example:[/bold] vitreg dice fixed_aseg.nii.gz warped_aseg.nii.gz --labels 2,3,41,42
    """
    with user_errors():
        from vitreg.field import check_same_grid
        from vitreg.image import load_labels
        from vitreg.labels import FREESURFER_ASEG, parse_label_list, read_lut
        from vitreg.metrics import dice_per_label

        names = read_lut(lut) if lut is not None else FREESURFER_ASEG
        wanted = parse_label_list(labels) if labels else None
        first, second = load_labels(a), load_labels(b)
        check_same_grid(first, second)
        result = dice_per_label(first.data, second.data, wanted)
        rows = [
            {"label": label, "name": names.get(label, ""), "dice": round(score, 6)}
            for label, score in result.scores.items()
        ]
        report = {
            "a": str(a),
            "b": str(b),
            "labels": rows,
            "mean": round(result.mean, 6),
            "missing_in_a": result.missing_in_a,
            "missing_in_b": result.missing_in_b,
        }
        if csv_out is not None:
            _write_csv(csv_out, rows)
        if as_json:
            print(json.dumps(report))
            return
        table = Table(title=f"Dice {a.name} vs {b.name}")
        for column in ("label", "name", "dice"):
            table.add_column(column, justify="right" if column != "name" else "left")
        for row in rows:
            table.add_row(str(row["label"]), row["name"], f"{row['dice']:.4f}")
        table.add_section()
        table.add_row("", "mean", f"{result.mean:.4f}")
        stdout.print(table)
        for side, missing in (("a", result.missing_in_a), ("b", result.missing_in_b)):
            if missing:
                stderr.print(f"labels missing in {side}: {', '.join(map(str, missing))}")


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Write rows atomically (temporary file beside the target, then rename)."""
    from vitreg.image import atomic_path

    if not path.parent.is_dir():
        raise VitregError(f"{path}: output directory {path.parent} does not exist")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["label", "name", "dice"])
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), newline="")


class _StepsPerSecond(ProgressColumn):
    """Steps per second of a task (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} it/s" if speed else "- it/s")


def _train_progress(quiet: bool):
    """A rich bar (loss, it/s, ETA) on stderr and the callback :func:`vitreg.train.train` drives."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[loss]}"),
        _StepsPerSecond(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int, info: dict) -> None:
        if stage == "epoch":
            if not quiet:
                stderr.print(_epoch_line(info, total))
            return
        description = f"epoch {info['epoch']}/{info['epochs']}" if stage == "train" else stage
        if stage not in tasks or (stage == "train" and done == 1):
            if stage in tasks:
                bar.remove_task(tasks[stage])
            tasks[stage] = bar.add_task(description, total=total, loss="")
        loss = f"loss {info['loss']:.5f}" if "loss" in info else ""
        bar.update(tasks[stage], completed=done, total=total, description=description, loss=loss)
        if stage == "validate" and done == total:
            bar.remove_task(tasks.pop(stage))

    return bar, report


def _epoch_line(row: dict, epochs: int) -> str:
    """One stderr line per finished epoch."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.5f}"]
    for key, label, digits in (
        ("val_loss", "val loss", 5),
        ("val_dice", "val Dice", 4),
        ("val_folding_percent", "% folded", 4),
    ):
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.{digits}f}")
    parts.append(f"{row['seconds']:.1f} s")
    return ", ".join(parts)


@app.command()
def train(
    data: Annotated[
        Path, typer.Argument(help="CSV (image[,labels][,split] or fixed,moving,...) or a folder.")
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the run.")],
    atlas: Annotated[
        Path | None, typer.Option(help="Pair every image with this atlas (it is the fixed image).")
    ] = None,
    atlas_moving: Annotated[
        bool, typer.Option(help="The atlas is the moving image (the IXI protocol).")
    ] = False,
    epochs: Annotated[int, typer.Option(help="Epochs (the paper: 500).")] = 500,
    batch_size: Annotated[int, typer.Option(help="Pairs per step and process.")] = 2,
    lr: Annotated[float, typer.Option(help="Adam learning rate (poly decay, power 0.9).")] = 1e-4,
    similarity: Annotated[str, typer.Option(help="mse (the paper) or ncc (local 9^3).")] = "mse",
    reg_weight: Annotated[float, typer.Option(help="Weight of the diffusion term.")] = 0.02,
    dice_weight: Annotated[
        float, typer.Option(help="Weight of a soft Dice loss on the labels (0: off).")
    ] = 0.0,
    int_steps: Annotated[
        int, typer.Option(help="Diffeomorphic: integrate a velocity in N steps (0: off).")
    ] = 0,
    flip: Annotated[bool, typer.Option(help="Random flips along each axis.")] = True,
    dropout: Annotated[float, typer.Option(help="Dropout of the transformer.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    val_fraction: Annotated[
        float, typer.Option(help="Held out for validation when no row says 'val'.")
    ] = 0.1,
    size: Annotated[
        tuple[int, int, int], typer.Option(help="Frame grid D H W (multiples of 32).")
    ] = (160, 192, 224),
    spacing: Annotated[tuple[float, float, float], typer.Option(help="Frame voxel mm.")] = (
        1.0,
        1.0,
        1.0,
    ),
    orientation: Annotated[str, typer.Option(help="Frame axis codes, e.g. LIA.")] = "LIA",
    config: Annotated[
        Path | None, typer.Option(help="JSON of ViT-V-Net config fields to change.")
    ] = None,
    init: Annotated[
        str | None, typer.Option(help="Start from this checkpoint (its config and frame).")
    ] = None,
    cache: Annotated[Path | None, typer.Option(help="Cache folder (default OUTPUT/cache).")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue OUTPUT's run with the options it started with.")
    ] = False,
    max_minutes: Annotated[
        float | None, typer.Option(help="Save and stop after this many minutes.")
    ] = None,
    no_bf16: Annotated[bool, typer.Option("--no-bf16", help="No bf16 autocast on CUDA.")] = False,
    checkpoint_activations: Annotated[
        bool,
        typer.Option(help="Recompute activations in the backward pass: less memory, more time."),
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress or messages.")] = False,
) -> None:
    """Train ViT-V-Net with the paper's recipe; resumable; torchrun for several GPUs.

    Writes OUTPUT/best.safetensors (by validation Dice) and last.safetensors, which
    'vitreg register --weights' takes directly, metrics.csv, curves.png and state.safetensors
    (for --resume). Several GPUs: torchrun --nproc-per-node 4 -m vitreg.cli train ...

    [bold]Example:[/bold] vitreg train subjects.csv -o run1 --epochs 500 --max-minutes 600
    """
    with user_errors():
        from vitreg.frame import ModelFrame
        from vitreg.nets.vitvnet import VitVNetConfig
        from vitreg.train import TrainRecipe
        from vitreg.train import train as run_training

        recipe = TrainRecipe(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            flip=flip,
            dropout=dropout,
            similarity=similarity,
            reg_weight=reg_weight,
            dice_weight=dice_weight,
            int_steps=int_steps,
            seed=seed,
            bf16=not no_bf16,
            checkpoint_activations=checkpoint_activations,
            val_fraction=val_fraction,
        )
        frame = ModelFrame(orientation=orientation.upper(), spacing=spacing, shape=size)
        net_config = None
        if config is not None:
            try:
                changes = json.loads(config.read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise VitregError(f"{config}: not a readable JSON file ({error})") from None
            if not isinstance(changes, dict):
                raise VitregError(f"{config}: expected a JSON object of config fields")
            net_config = VitVNetConfig.from_dict({**VitVNetConfig().to_dict(), **changes})
        rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
        quiet = quiet or rank != 0
        bar, report = _train_progress(quiet)
        if resume and not quiet:
            stderr.print(f"resuming {output / 'state.safetensors'} with its recorded options")
        with bar:
            result = run_training(
                data,
                output,
                recipe,
                frame=frame,
                config=net_config,
                init=init,
                atlas=atlas,
                atlas_is_moving=atlas_moving,
                cache=cache,
                resume=resume,
                max_minutes=max_minutes,
                device=device,
                progress=report,
            )
        if rank != 0:
            return
        summary = {
            "output": str(result.output),
            "epochs_done": result.epochs_done,
            "epochs": result.epochs,
            "stopped_early": result.stopped_early,
            "best_epoch": result.best_epoch,
            "best_metric": result.best_metric,
            "best_value": None if result.best_value is None else round(result.best_value, 6),
            "best": str(result.best),
            "last": str(result.last),
        }
        if result.stopped_early and not quiet:
            stderr.print(f"time budget used; continue: vitreg train {data} -o {output} --resume")
        if as_json:
            print(json.dumps(summary))
        elif not quiet:
            _print_table("vitreg train", [(k, str(v)) for k, v in summary.items()])


if __name__ == "__main__":
    app()
