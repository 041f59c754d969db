"""``vitreg weights``: list, fetch, inspect and import checkpoints (a thin layer on weights.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vitreg.console import stderr, stdout, user_errors

weights_app = typer.Typer(
    help="Checkpoints: list, fetch (verified, cached), inspect, import the authors' weights.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _human_size(size: int | None) -> str:
    """Bytes -> '12.3 MiB', or '-' when unknown."""
    return f"{size / 2**20:.1f} MiB" if size else "-"


@weights_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Checkpoints in the registry and in the cache, and whether each is available locally.

    [bold]Example:[/bold] vitreg weights list --json
    """
    with user_errors():
        from vitreg.weights import cache_dir, list_checkpoints

        rows = list_checkpoints()
        if as_json:
            print(json.dumps(rows))
            return
        table = Table(title="vitreg checkpoints", caption=f"cache: {cache_dir()}")
        for column in ("name", "size", "cached", "description"):
            table.add_column(column)
        for row in rows:
            name = row["name"] + (" (default)" if row["default"] else "")
            cached = "yes" if row["cached"] else "no"
            table.add_row(name, _human_size(row["size"]), cached, row["description"])
        stdout.print(table)


@weights_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help="Checkpoint name from 'vitreg weights list'.")],
    offline: Annotated[
        bool, typer.Option("--offline", help="Only look locally (also VITREG_OFFLINE=1).")
    ] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
) -> None:
    """Download a checkpoint into the cache, checking its size and sha256; prints its path.

    Nothing is downloaded when the checkpoint is already cached or shipped.

    [bold]Example:[/bold] vitreg weights fetch vitvnet-ixi-official --offline
    """
    with user_errors():
        from vitreg.weights import resolve

        path = resolve(name, offline=True if offline else None, progress=not quiet)
        stdout.print(str(path), highlight=False, soft_wrap=True)


@weights_app.command("info")
def info_command(
    name_or_path: Annotated[str, typer.Argument(help="Checkpoint name or .safetensors file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Config, model frame and training recipe of a checkpoint (never downloads).

    For a registry name that is not cached, shows what the registry says instead.

    [bold]Example:[/bold] vitreg weights info vitvnet-ixi-official --json
    """
    with user_errors():
        from vitreg.weights import checkpoint_info

        info = checkpoint_info(name_or_path)
        if as_json:
            print(json.dumps(info))
        else:
            stdout.print_json(json.dumps(info))


@weights_app.command("import")
def import_command(
    file: Annotated[Path, typer.Argument(help="The authors' checkpoint (torch.save .pth.tar).")],
    name: Annotated[str, typer.Option(help="Name to store it under in the cache.")],
) -> None:
    """Convert the authors' published ViT-V-Net checkpoint to vitreg's safetensors format.

    Read with torch.load(weights_only=True), so nothing in the file is run; only the model
    tensors are kept, each checked against the published architecture. Prints the new path.

    [bold]Example:[/bold] vitreg weights import dsc0.734.pth.tar --name vitvnet-ixi-official
    """
    with user_errors():
        from vitreg.weights import import_official

        stderr.print(f"importing {file} (read with weights_only=True) ...", highlight=False)
        path = import_official(file, name)
        stdout.print(str(path), highlight=False, soft_wrap=True)
