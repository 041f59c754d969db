"""Pairs of images listed in a CSV file: one schema and one loader for every command.

A pairs file has a header naming ``fixed`` and ``moving`` (required); every other column is
optional: ``name`` or ``id`` (names the pair's outputs; default: the moving file's name, with
as many parent folders as make the names unique, or ``MOVING_to_FIXED`` where rows share a
moving file: see :func:`_derived_names`), ``fixed_labels`` and ``moving_labels``
(label maps on the images' grids, both or neither), ``true_flow`` (the ground-truth pull field
on the fixed grid, a flow file :func:`vitreg.field.load_flow` reads), ``mask`` (on the fixed
grid: where folding, end-point error and correlation are measured; default the fixed head's
foreground), ``fixed_mask`` and ``moving_mask`` (cost-function masks on each image's own grid,
nonzero inside: voxels outside them do not drive the registration; lesions, resection
cavities, electrodes), ``lut`` (label names, 'index name' lines; default FreeSurfer's), ``set`` (the
group a pair is summarised in; default 'all') and ``split`` (for training: train, val or
test; default train). Other columns are ignored; column names ignore case; relative
paths are read from the CSV file's folder; blank rows are skipped.

:func:`read_pairs` refuses a file that is wrong as a whole (no such file, no fixed or moving
column, no rows, two pairs with one name). A row's own problems (an empty cell, a missing
file) are listed by :func:`row_problems`, so each caller picks its policy: stop before any
work, naming every bad row (:func:`check_pairs`: evaluation, training), or let that pair fail
when it is loaded while the others go on (:func:`load_pair`: register-batch).
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitreg.errors import VitregError
from vitreg.field import DisplacementField, check_same_grid, load_flow
from vitreg.frame import foreground_mask
from vitreg.image import IMAGE_SUFFIXES, Volume, load_image, load_labels
from vitreg.labels import FREESURFER_ASEG, read_lut

PATH_COLUMNS = (
    "fixed",
    "moving",
    "fixed_labels",
    "moving_labels",
    "true_flow",
    "mask",
    "lut",
    "fixed_mask",
    "moving_mask",
)
NAME_COLUMNS = ("name", "id")


@dataclass(frozen=True)
class Pair:
    """One pair of images and the files that go with it; a file not given is None.

    ``row`` is the pair's line in ``source`` (the CSV file; the header is line 1), or 0 and
    None for a pair given directly (``vitreg register``).
    """

    row: int
    name: str
    fixed: Path | None
    moving: Path | None
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    true_flow: Path | None = None
    mask: Path | None = None
    lut: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    set: str = "all"
    split: str = "train"
    source: Path | None = None

    @property
    def where(self) -> str:
        """``pairs.csv:4`` for messages; empty for a pair given directly."""
        return f"{self.source}:{self.row}" if self.source is not None else ""

    def paths(self) -> dict[str, Path]:
        """The files given, by column name."""
        return {column: getattr(self, column) for column in PATH_COLUMNS if getattr(self, column)}


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header (column names lower-cased) and the non-blank rows of a CSV file, each with
    its line number and its cells stripped; a missing or headerless file is a VitregError."""
    path = Path(path)
    if not path.is_file():
        raise VitregError(f"{path}: no such CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise VitregError(f"{path}: cannot read the CSV file ({error})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise VitregError(f"{path}: empty file; expected a header line")
    columns = [cell.strip().lower() for cell in header]
    rows = []
    for values in reader:
        if any(value.strip() for value in values):
            cells = dict(zip(columns, (value.strip() for value in values), strict=False))
            rows.append((reader.line_num, cells))
    return columns, rows


def read_pairs(csv_path: str | Path, unique_names: bool = True) -> list[Pair]:
    """The pairs of a pairs file (see the module docstring), in file order.

    ``unique_names``: two pairs with one output name are an error (the names name files).
    """
    csv_path = Path(csv_path)
    columns, rows = read_table(csv_path)
    return pairs_from_rows(csv_path, columns, rows, unique_names)


def pairs_from_rows(
    csv_path: Path,
    columns: list[str],
    rows: list[tuple[int, dict[str, str]]],
    unique_names: bool = True,
) -> list[Pair]:
    """The pairs of the rows :func:`read_table` read from ``csv_path``."""
    missing = [column for column in ("fixed", "moving") if column not in columns]
    if missing:
        raise VitregError(
            f"{csv_path}:1: no {' or '.join(missing)} column in the header {columns}; "
            "expected fixed,moving[,name][,fixed_labels,moving_labels]"
        )
    if not rows:
        raise VitregError(f"{csv_path}: no pairs listed below the header")

    def path_of(cells: dict[str, str], column: str) -> Path | None:
        value = cells.get(column, "")
        return csv_path.parent / Path(value).expanduser() if value else None

    name_column = next((column for column in NAME_COLUMNS if column in columns), None)
    lines = [line for line, _ in rows]
    derived = _derived_names(
        [path_of(cells, "fixed") for _, cells in rows],
        [path_of(cells, "moving") for _, cells in rows],
        lines,
    )
    pairs, seen = [], {}
    for (line, cells), fallback in zip(rows, derived, strict=True):
        given = cells.get(name_column, "") if name_column else ""
        name = _safe_name(given) if given else fallback
        if unique_names and name in seen:
            raise VitregError(
                f"{csv_path}:{line}: output name {name!r} is also that of line {seen[name]}; "
                "give each pair its own name in a 'name' column"
            )
        seen.setdefault(name, line)
        pairs.append(
            Pair(
                row=line,
                name=name,
                **{column: path_of(cells, column) for column in PATH_COLUMNS},
                set=cells.get("set") or "all",
                split=(cells.get("split") or "train").lower(),
                source=csv_path,
            )
        )
    return pairs


def row_problems(pair: Pair) -> list[str]:
    """What is wrong with one pair before its files are read (empty cells, files that do not
    exist), each as ``where: problem``; empty for a good pair."""
    where = f"{pair.where}: " if pair.where else ""
    problems = []
    for role in ("fixed", "moving"):
        if getattr(pair, role) is None:
            problems.append(f"{where}no {role} image in this row")
    if (pair.fixed_labels is None) != (pair.moving_labels is None):
        problems.append(f"{where}fixed_labels and moving_labels go together; only one is given")
    for column, path in pair.paths().items():
        if not path.exists():
            problems.append(f"{where}{column} {path}: no such file")
    return problems


def check_pairs(pairs: list[Pair]) -> None:
    """Raise one VitregError that names every bad row of ``pairs`` (see :func:`row_problems`)."""
    bad_rows = [problems for problems in map(row_problems, pairs) if problems]
    if bad_rows:
        source = pairs[0].source or "pairs"
        listed = "; ".join(problem for problems in bad_rows for problem in problems)
        raise VitregError(f"{source}: {len(bad_rows)} bad row(s): {listed}")


@dataclass(frozen=True)
class LoadedPair:
    """A pair's files read and checked: the fixed-side files lie on the fixed grid.

    ``labels``: (fixed, moving) label maps or None. ``true_field``: the true pull field or
    None. ``mask``: (X, Y, Z) bool on the fixed grid, the given mask or else the fixed head's
    foreground, never empty. ``names``: label names (the LUT's, else FreeSurfer's).
    ``fixed_mask``/``moving_mask``: the cost-function masks (on the fixed and the moving
    grid, not empty), or None.
    """

    pair: Pair
    fixed: Volume
    moving: Volume
    labels: tuple[Volume, Volume] | None
    true_field: DisplacementField | None
    mask: np.ndarray
    names: dict[int, str]
    fixed_mask: Volume | None = None
    moving_mask: Volume | None = None


def load_pair(pair: Pair) -> LoadedPair:
    """Read and check every file of ``pair``; a VitregError names the file and the problem."""
    problems = row_problems(pair)
    if problems:
        raise VitregError(problems[0].removeprefix(f"{pair.where}: "))
    fixed, moving = load_image(pair.fixed), load_image(pair.moving)
    labels = None
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        labels = (load_labels(pair.fixed_labels), load_labels(pair.moving_labels))
        check_same_grid(fixed, labels[0])
    true_field = None
    if pair.true_flow is not None:
        true_field = load_flow(pair.true_flow)
        check_same_grid(fixed, true_field.grid)
    if pair.mask is not None:
        mask_volume = load_labels(pair.mask)
        check_same_grid(fixed, mask_volume)
        mask = mask_volume.data > 0
    else:
        mask = foreground_mask(fixed.data)
    if not mask.any():
        raise VitregError(f"{pair.mask or pair.fixed}: the mask is empty")
    names = read_lut(pair.lut) if pair.lut is not None else FREESURFER_ASEG
    fixed_mask = load_cost_mask(pair.fixed_mask, fixed, "fixed_mask")
    moving_mask = load_cost_mask(pair.moving_mask, moving, "moving_mask")
    return LoadedPair(pair, fixed, moving, labels, true_field, mask, names, fixed_mask, moving_mask)


def load_cost_mask(path: Path | None, image: Volume, role: str) -> Volume | None:
    """A cost-function mask read and checked against its ``image``'s grid (nonzero inside),
    or None without a path; a VitregError names the file when it lies on another grid or
    holds no voxel inside."""
    if path is None:
        return None
    mask = load_labels(path)
    check_same_grid(image, mask)
    if not (mask.data > 0).any():
        raise VitregError(f"{path}: the {role.replace('_', ' ')} is empty (no nonzero voxel)")
    return mask


def _stem(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _safe_name(text: str) -> str:
    """A file-name-safe version of ``text``: letters (any script's), digits, '.', '_', '-';
    each run of other characters (spaces, slashes, ...) becomes one '_'."""
    return re.sub(r"[^\w.-]+", "_", text.strip()).strip("._") or "pair"


def _distinguishing_names(paths: list[Path | None], rows: list[int]) -> list[str]:
    """A name per path: its stem, with as many parent folders as tell the distinct paths
    apart (a row without a path: ``rowN``); equal paths get equal names.

    ``sub01/mri/brain.mgz`` and ``sub02/mri/brain.mgz`` become ``sub01_mri_brain`` and
    ``sub02_mri_brain``; ``atlas.nii.gz`` on every row stays ``atlas``.
    """
    parts = [
        [*path.parent.parts, _stem(path)] if path is not None else [f"row{row}"]
        for path, row in zip(paths, rows, strict=True)
    ]
    distinct = len({tuple(p) for p in parts})
    deepest = max((len(p) for p in parts), default=1)
    for depth in range(1, deepest + 1):
        names = [_safe_name("_".join(p[-depth:])) for p in parts]
        if len(set(names)) == distinct:
            return names
    return [_safe_name("_".join(p)) for p in parts]


def _derived_names(
    fixed: list[Path | None], moving: list[Path | None], rows: list[int]
) -> list[str]:
    """Output names of pairs without a ``name`` column, from the files that differ between
    rows.

    When the moving files all differ, a pair is named after its moving file (see
    :func:`_distinguishing_names`): ``sub01/mri/brain.mgz`` gives ``sub01_mri_brain``.
    Otherwise (one atlas registered to many subjects, one subject to many templates) it is
    ``MOVING_to_FIXED``, each side named the same way: ``atlas.nii.gz`` to
    ``sub01/T1.nii.gz`` gives ``atlas_to_sub01_T1``, ``sub01_T1.nii.gz`` to
    ``templates/A.nii.gz`` gives ``sub01_T1_to_A``. Two rows with the same fixed and moving
    files get one name (and :func:`read_pairs` asks for a ``name`` column).
    """
    moving_names = _distinguishing_names(moving, rows)
    if len(set(moving_names)) == len(moving_names):
        return moving_names
    fixed_names = _distinguishing_names(fixed, rows)
    return [f"{m}_to_{f}" for m, f in zip(moving_names, fixed_names, strict=True)]
