"""``vitreg weights``: list, fetch, inspect and import checkpoints (over weights.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vitreg.console import download_progress, stdout, user_errors

weights_app = typer.Typer(
    help="Checkpoints: list, fetch, inspect, import the authors' weights.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


@weights_app.command("list")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Checkpoints in the registry, and whether they are in the local cache.

    [bold]Example:[/bold] vitreg weights list --json
    """
    with user_errors():
        from vitreg.weights import list_checkpoints

        rows = list_checkpoints()
        if as_json:
            print(json.dumps(rows))
            return
        table = Table(title="vitreg checkpoints")
        for column in ("name", "size", "cached", "description"):
            table.add_column(column)
        for row in rows:
            size = f"{row['size'] / 2**20:.1f} MiB" if row["size"] else "-"
            name = row["name"] + (" (default)" if row["default"] else "")
            table.add_row(name, size, "yes" if row["cached"] else "no", row["description"])
        stdout.print(table)


@weights_app.command("fetch")
def fetch_command(
    name: Annotated[str, typer.Argument(help="Checkpoint name from 'vitreg weights list'.")],
    offline: Annotated[bool, typer.Option(help="Only look in the cache.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")] = False,
) -> None:
    """Download a checkpoint into the cache, checking its size and sha256.

    [bold]Example:[/bold] vitreg weights fetch vitvnet-ixi-official
    """
    with user_errors():
        from vitreg.weights import resolve

        bar, report = download_progress(quiet)
        with bar:
            path = resolve(name, offline=offline or None, progress=report)
        stdout.print(str(path))


@weights_app.command("info")
def info_command(
    name_or_path: Annotated[str, typer.Argument(help="Checkpoint name or file.")],
    offline: Annotated[bool, typer.Option(help="Never download.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
) -> None:
    """Config, model frame and training recipe of a checkpoint.

    [bold]Example:[/bold] vitreg weights info ~/.cache/vitreg/vitvnet-ixi-official.safetensors
    """
    with user_errors():
        from vitreg.weights import read_checkpoint, resolve

        checkpoint = read_checkpoint(resolve(name_or_path, offline=offline or None))
        info = {
            "path": str(checkpoint.path),
            "vitreg_version": checkpoint.vitreg_version,
            "parameters": sum(
                t.numel()
                for k, t in checkpoint.state_dict.items()
                if "running_" not in k and "num_batches" not in k
            ),
            "config": checkpoint.config.to_dict(),
            "frame": checkpoint.frame.to_dict(),
            "recipe": checkpoint.recipe,
        }
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

    Loaded with torch.load(weights_only=True): nothing in the file is executed.

    [bold]Example:[/bold] vitreg weights import ViTVNet_dsc0.734.pth.tar --name vitvnet-ixi-official
    """
    with user_errors():
        from vitreg.weights import import_official

        path = import_official(file, name)
        stdout.print(str(path))
