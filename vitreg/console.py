"""Terminal output of the command line: user errors, messages, progress bars and results.

Messages and progress go to stderr; stdout carries only results (a table, or JSON with
``--json``). Library errors name Python parameters; :func:`user_errors` shows them as flags.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from vitreg.errors import NO_VALUE, VitregError

stderr = Console(stderr=True, soft_wrap=True)
stdout = Console()

# Options every command that prints, or computes, shares.
JsonOption = Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="No progress, messages or table.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]

USER_ERROR_EXIT_CODE = 2
FLAGS = {
    "atlas_is_moving": "--atlas-moving",
    "labels": "--fixed-labels and --moving-labels",
    "csv_out": "--csv",
    "out_dir": "--out-dir",
    "transforms": "-t/--transform",
}
"""Library parameters whose flag is not ``--`` + the name with dashes."""


def flag_spelling(name: str, value: object = NO_VALUE) -> str:
    """A library parameter as the command line spells it: ``--name value``, ``--name`` or
    ``--no-name`` for booleans, sequences as ``4,2``."""
    flag = FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is NO_VALUE or value is True:
        return flag
    if value is False:
        return "--no-" + flag.removeprefix("--")
    if isinstance(value, tuple | list):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


STOP_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""A command stopped by Ctrl-C (SIGINT) or SIGTERM (a job scheduler's time limit, ``kill``)
exits as shells report a process that signal ended."""


@contextmanager
def user_errors(interrupted: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn a VitregError into one line ``vitreg: error: ...`` on stderr and exit code 2, and
    Ctrl-C (SIGINT) or SIGTERM into one line ``vitreg: interrupted[; INTERRUPTED]`` and exit
    code 130 or 143; ``interrupted`` (or what it returns when called then) says what is left.

    Both signals raise KeyboardInterrupt, which unwinds the program and so removes its
    temporaries: files are written whole or not at all (:func:`vitreg.files.atomic_path`).
    A library may turn the interrupt into an error of its own when it lands inside its code
    (safetensors reports a torch ValueError): any error that follows a signal is therefore
    reported as the interruption.
    """
    received: list[int] = []
    try:
        with _stop_signals_raise(received):
            yield
    except Exception as error:
        if received:
            _stop(received[0], interrupted)
        if isinstance(error, VitregError):
            show_error(error_text(error))
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None
        raise
    except KeyboardInterrupt:
        _stop(received[0] if received else signal.SIGINT, interrupted)


def _stop(signal_number: int, interrupted: str | Callable[[], str]) -> NoReturn:
    note = interrupted() if callable(interrupted) else interrupted
    stderr.print(f"[red]vitreg: interrupted[/]{escape('; ' + note if note else '')}")
    raise typer.Exit(STOP_EXIT_CODES[signal_number]) from None


@contextmanager
def _stop_signals_raise(received: list[int]) -> Iterator[None]:
    """While inside, SIGINT and SIGTERM are appended to ``received`` and raise
    KeyboardInterrupt (in the main thread, where Python runs signal handlers; elsewhere
    nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signal_number: int, frame: object) -> None:
        received.append(signal_number)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, stop) for number in STOP_EXIT_CODES}
    try:
        yield
    finally:
        for number, handler in previous.items():
            # None: a handler not set from Python; give the default back
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def show_error(message: str) -> None:
    """``vitreg: error: MESSAGE`` on stderr (also with --quiet: an error is not a message)."""
    # literally: a path may hold [brackets] or ':x:' (rich markup, emoji codes)
    stderr.print(
        f"[bold red]vitreg: error:[/] {escape(message)}",
        highlight=False,
        soft_wrap=True,
        emoji=False,
    )


def error_text(error: VitregError) -> str:
    """The error's message on one line, its parameters spelled as flags."""
    return " ".join(error.render(flag_spelling).split())


def say(quiet: bool, message: str, style: str = "") -> None:
    """A message on stderr, unless ``quiet``."""
    if not quiet:
        stderr.print(f"[{style}]{message}[/]" if style else message, highlight=False)


def warn(quiet: bool, warnings: tuple[str, ...] | list[str]) -> None:
    """Each warning as ``vitreg: warning: ...`` on stderr, unless ``quiet``."""
    for warning in warnings:
        say(quiet, f"[yellow]vitreg: warning:[/] {warning}")


def show_result(
    title: str, rows: list[tuple[str, str]], data: object, as_json: bool, quiet: bool
) -> None:
    """The result on stdout: ``data`` as one line of JSON with ``as_json``, else a two-column
    table of ``rows`` unless ``quiet``."""
    if as_json:
        print(json.dumps(data))
    elif not quiet:
        show_table(title, ["", ""], [list(row) for row in rows], header=False)


def show_table(title: str, columns: list[str], rows: list[list[str]], header: bool = True) -> None:
    """A table on stdout; numbers (and the first column but text) right-aligned."""
    table = Table(title=title, show_header=header)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    stdout.print(table)


@contextmanager
def stage_progress(quiet: bool, header: str = "") -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing one bar per stage on stderr.

    ``header`` is printed when the first stage is reported (once the inputs are checked).
    """
    bar = Progress(
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
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if not tasks and header and not quiet:
            bar.console.print(header, highlight=False)
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar:
        yield report


@contextmanager
def download_progress(quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A ``report(bytes_done, bytes_total)`` callback drawing a download bar on stderr."""
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

    with bar:
        yield report


class _StepsPerSecond(ProgressColumn):
    """Steps per second of a task (rich's own speed columns count bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} it/s" if speed else "- it/s")


@contextmanager
def train_progress(quiet: bool) -> Iterator[Callable[[str, int, int, dict], None]]:
    """The callback :func:`vitreg.train.train` drives: a bar (loss, it/s, ETA) per stage on
    stderr and one line per finished epoch."""
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
            say(quiet, epoch_line(info, total))
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

    with bar:
        yield report


def epoch_line(row: dict, epochs: int) -> str:
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
