"""Terminal output shared by the command-line modules: stderr console and user-error exit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from vitreg.errors import VitregError

# Messages and progress go to stderr; stdout carries only results (tables or --json).
stderr = Console(stderr=True, soft_wrap=True)
stdout = Console()

USER_ERROR_EXIT_CODE = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a VitregError into one line ``vitreg: error: ...`` on stderr and exit code 2."""
    try:
        yield
    except VitregError as error:
        message = " ".join(str(error).split())
        stderr.print(f"[bold red]vitreg: error:[/] {message}", highlight=False, soft_wrap=True)
        raise typer.Exit(USER_ERROR_EXIT_CODE) from None


def download_progress(quiet: bool = False) -> tuple[Progress, Callable[[int, int], None]]:
    """A rich byte-count progress bar on stderr and the (done, total) callback that drives it."""
    bar = Progress(
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=stderr,
        disable=quiet,
        transient=True,
    )
    task = bar.add_task("download", total=None)

    def report(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total or None)

    return bar, report
