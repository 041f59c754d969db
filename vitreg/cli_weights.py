"""``vitreg weights``: list, fetch, inspect and import checkpoints (a thin layer on weights.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitreg.console import (
    JsonOption,
    QuietOption,
    download_progress,
    say,
    show_result,
    show_table,
    stdout,
    user_errors,
)

weights_app = typer.Typer(
    help="Checkpoints: list, fetch (verified, cached), inspect, import the authors' weights.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _human_size(size: int | None) -> str:
    """Bytes -> '12.3 MiB', or '-' when unknown."""
    return f"{size / 2**20:.1f} MiB" if size else "-"


@weights_app.command("list")
def list_command(as_json: JsonOption = False, quiet: QuietOption = False) -> None:
    """Checkpoints in the registry and in the cache, and whether each is available locally.

    [bold]Example:[/bold] vitreg weights list
    """
    with user_errors():
        from vitreg.weights import cache_dir, list_checkpoints

        rows = list_checkpoints()
    if as_json:
        show_result("", [], rows, True, quiet)
        return
    if not quiet:
        table = [
            [
                row["name"] + (" (default)" if row["default"] else ""),
                _human_size(row["size"]),
                "yes" if row["cached"] else "no",
                row["description"],
            ]
            for row in rows
        ]
        show_table("vitreg checkpoints", ["name", "size", "cached", "description"], table)
        say(quiet, f"cache: {cache_dir()}")


@weights_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help="Checkpoint name from 'vitreg weights list'.")],
    offline: Annotated[
        bool, typer.Option("--offline", help="Only look locally (also VITREG_OFFLINE=1).")
    ] = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Download a checkpoint into the cache, checking its size and sha256; prints its path.

    Nothing is downloaded when the checkpoint is already cached or shipped.

    [bold]Example:[/bold] vitreg weights fetch vitvnet-ixi-official --offline
    """
    with user_errors():
        from vitreg.weights import resolve

        with download_progress(quiet) as report:
            path = resolve(name, offline=True if offline else None, progress=report)
        _show_path(path, as_json, quiet)


def _show_path(path: Path, as_json: bool, quiet: bool) -> None:
    """The checkpoint's path: alone on stdout (for scripts), or as JSON."""
    if as_json:
        show_result("", [], {"path": str(path)}, True, quiet)
    elif not quiet:
        stdout.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("info")
def info_command(
    name_or_path: Annotated[str, typer.Argument(help="Checkpoint name or .safetensors file.")],
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Config, model frame and training recipe of a checkpoint (never downloads).

    For a registry name that is not cached, shows what the registry says instead.

    [bold]Example:[/bold] vitreg weights info vitvnet-ixi-official
    """
    with user_errors():
        from vitreg.weights import checkpoint_info

        info = checkpoint_info(name_or_path)
    if as_json:
        show_result("", [], info, True, quiet)
    elif not quiet:
        import json

        stdout.print_json(json.dumps(info))


@weights_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="The authors' checkpoint (torch.save .pth.tar).")],
    name: Annotated[str, typer.Option(help="Name to store it under in the cache.")],
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Convert the authors' published ViT-V-Net checkpoint to vitreg's safetensors format.

    Read with torch.load(weights_only=True), so nothing in the file is run; only the model
    tensors are kept, each checked against the published architecture. Prints the new path.

    [bold]Example:[/bold] vitreg weights import dsc0.734.pth.tar --name vitvnet-ixi-official
    """
    with user_errors():
        from vitreg.weights import import_official

        say(quiet, f"importing {file} (read with weights_only=True) ...")
        path = import_official(file, name)
        _show_path(path, as_json, quiet)
