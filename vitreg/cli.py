"""The ``vitreg`` command line: parse, call the Python API, print. Nothing else lives here.

torch and the API modules are imported inside the commands, so ``vitreg --help`` is instant.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
        console=stderr,
        disable=quiet,
        transient=True,
    )


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)


@app.command()
def register(
    fixed: Annotated[Path, typer.Argument(help="Fixed (target) image, .nii/.nii.gz/.mgz.")],
    moving: Annotated[Path, typer.Argument(help="Moving image, resampled onto FIXED.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Warped moving image.")],
    flow: Annotated[Path | None, typer.Option("--flow", help="Displacement field out.")] = None,
    weights: Annotated[
        str, typer.Option(help="Checkpoint name, path, or 'none' (optimisation only).")
    ] = "default",
    optimize: Annotated[
        int, typer.Option(help="Steps of test-time optimisation (local NCC + diffusion).")
    ] = 0,
    smoothness: Annotated[
        float, typer.Option(help="Weight of the diffusion term in --optimize (higher: smoother).")
    ] = 5.0,
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
    offline: Annotated[bool, typer.Option(help="Never download weights.")] = False,
    affine: Annotated[
        bool, typer.Option(help="Affine pre-alignment (moments, rigid, affine by MI) first.")
    ] = True,
    affine_out: Annotated[
        Path | None, typer.Option(help="Write the affine as an ITK .mat (ANTs) or .tfm file.")
    ] = None,
    allow_affine_failure: Annotated[
        bool, typer.Option(help="If the affine fails, warn and go on with the centring only.")
    ] = False,
    diffeo: Annotated[
        bool, typer.Option(help="Diffeomorphic: integrate a stationary velocity (no folding).")
    ] = False,
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
        from vitreg.field import check_same_grid, save_flow
        from vitreg.image import check_writable, load_image, load_labels, save
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
                check_writable(path)
        if affine_out is not None:
            check_affine_path(affine_out)
        fixed_volume, moving_volume = load_image(fixed), load_image(moving)
        label_pair = None
        if fixed_labels is not None and moving_labels is not None:
            label_pair = (load_labels(fixed_labels), load_labels(moving_labels))
            check_same_grid(fixed_volume, label_pair[0])  # before the long work, not after
        model, frame, weights_name = None, None, "none"
        if weights.lower() != "none":
            from vitreg.weights import build_model, outputs_velocity, read_checkpoint, resolve

            bar, report_download = download_progress(quiet)
            with bar:
                path = resolve(weights, offline=offline or None, progress=report_download)
            checkpoint = read_checkpoint(path)
            model, frame, weights_name = build_model(checkpoint), checkpoint.frame, weights
            if outputs_velocity(checkpoint) and not diffeo:
                diffeo = True
                if not quiet:
                    stderr.print(f"{weights}: the model outputs velocities; diffeomorphic mode")
        if not quiet:
            stderr.print(
                f"registering {moving} (moving) to {fixed} (fixed), weights {weights_name}"
            )
        with _progress(quiet) as bar:
            tasks: dict[str, int] = {}

            def report(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            result = run_registration(
                fixed_volume,
                moving_volume,
                model=model,
                frame=frame,
                optimize=optimize,
                smoothness=smoothness,
                device=device,
                progress=report,
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
        if inverse is not None:
            save_flow(inverse_flow, inverse.field, flow_format)
        if affine_out is not None:
            save_affine(affine_out, result.affine_ras)
        summary = {
            "fixed": str(fixed),
            "moving": str(moving),
            "warped": str(output),
            "flow": str(flow) if flow else None,
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
        from vitreg.image import check_writable, load_labels, save
        from vitreg.register import choose_device

        if method not in ("nearest", "linear"):
            raise VitregError(f"--method {method}: expected nearest or linear")
        torch_device = choose_device(device)
        check_writable(output)
        field = _load_field(flow, reference)
        source = load_labels(labels)
        warp_fn = warp_labels_linear if method == "linear" else warp_labels_nearest
        warped = warp_fn(source, field, torch_device)
        save(output, warped.astype(_label_dtype(source)), field.grid)


def _label_dtype(labels) -> str:
    """The label file's own integer type on disk, else int32."""
    import numpy as np

    dtype = np.dtype(labels.header.get_data_dtype()) if labels.header is not None else None
    if dtype is not None and np.issubdtype(dtype, np.integer):
        return dtype.newbyteorder("=").name
    return "int32"


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


if __name__ == "__main__":
    app()
