"""Files written whole or not at all: atomic replacement, CSV and JSON tables, output folders."""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from vitreg.errors import VitregError


def plain_file_mode() -> int:
    """File mode a plain ``open`` would give (0o666 minus the umask), not mkstemp's 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it onto ``target``.

    The file gets the permissions a plain ``open`` would give (umask), and on failure the
    temporary is removed, so a half-written output never appears under ``target``'s name.
    """
    target = Path(target)
    try:
        handle, name = tempfile.mkstemp(
            prefix=temporary_prefix(target), suffix=_suffix(target), dir=target.parent
        )
    except OSError as error:
        raise VitregError(f"{target}: cannot write ({error.strerror})") from None
    # The cleanup is armed at once: a signal (KeyboardInterrupt) even between the file's
    # creation and its first use must not leave it behind.
    try:
        os.close(handle)
        yield Path(name)
        os.chmod(name, plain_file_mode())
        os.replace(name, target)
    except BaseException as error:
        Path(name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in WRITE_ERRORS:
            raise VitregError(f"{target}: cannot write ({error.strerror})") from None
        raise


WRITE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
)
"""Errors of the file system while a file is written (full disk, quota, read-only, ...):
the user's to fix, so they become a VitregError naming the file."""


def _suffix(target: Path) -> str:
    return ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix


def temporary_prefix(target: Path) -> str:
    """The name with which :func:`atomic_path`'s temporaries for ``target`` begin."""
    return f".{target.name}."


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of ``target`` that a killed process left (``kill -9`` while
    :func:`atomic_path` was writing); returns them. Only for a caller that knows no other
    process is writing ``target`` now (it holds a lock)."""
    target = Path(target)
    stale = sorted(target.parent.glob(f"{glob.escape(temporary_prefix(target))}*{_suffix(target)}"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def check_folder_writable(folder: str | Path, target: str | Path) -> None:
    """VitregError unless a file can be created in ``folder`` (for ``target``, which the
    message names): a probe file is created and removed, so a read-only file system, a full
    inode table or a permission the process lacks (even as root, over NFS) shows now, before
    long work, with the system's reason."""
    try:
        handle, name = tempfile.mkstemp(prefix=".vitreg-probe.", dir=folder)
    except OSError as error:
        raise VitregError(
            f"{target}: output directory {folder} is not writable ({error.strerror})"
        ) from None
    os.close(handle)
    os.unlink(name)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (newlines as given); its folder must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        raise VitregError(f"{path}: output directory {path.parent} does not exist")
    with atomic_path(path) as temporary:
        temporary.write_text(text, newline="")
    return path


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` under a header of ``columns`` (default: the first row's keys).

    Keys not among the columns are left out; None becomes an empty cell.
    """
    columns = list(columns) if columns is not None else list(rows[0]) if rows else []
    buffer = io.StringIO()
    if columns:
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in columns})
    return buffer.getvalue()


def write_csv(path: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` as a CSV file atomically (see :func:`csv_text`)."""
    return write_text(path, csv_text(rows, columns))


def write_json(path: str | Path, value: object, indent: int | None = 1) -> Path:
    """Write ``value`` as a JSON file atomically, with a final newline."""
    return write_text(path, json.dumps(value, indent=indent) + "\n")


def make_folder(path: str | Path, what: str = "output folder") -> Path:
    """Create the folder ``path`` (and its parents) if needed; VitregError if it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VitregError(f"{path}: cannot create the {what} ({error.strerror})") from None
    return path
