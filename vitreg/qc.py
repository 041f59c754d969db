"""Quality-control figures: orthogonal slices of a registration, like Fig. 2 of the paper.

Every panel is drawn on the fixed image's grid, turned to the closest RAS+ axis order so
that the three views have one orientation whatever the files' voxel order: neurological
convention (the subject's right on the image's right), anterior and superior up, and, in
the sagittal view, anterior on the right. Letters on the panel edges say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from vitreg.assess import Assessment, assess
from vitreg.errors import OptionError
from vitreg.field import DisplacementField, check_same_grid, load_flow
from vitreg.files import atomic_path
from vitreg.frame import foreground_center_mm, foreground_mask, resample
from vitreg.image import Volume, check_writable, load_image

# (name, array axis normal to the slice, in-plane axes (horizontal, vertical), edge letters
# (left, right, bottom, top)) in RAS+ axis order.
VIEWS = (
    ("axial", 2, (0, 1), ("L", "R", "P", "A")),
    ("coronal", 1, (0, 2), ("L", "R", "I", "S")),
    ("sagittal", 0, (1, 2), ("P", "A", "I", "S")),
)
JACDET_RANGE = (0.0, 2.0)
JACDET_LEVELS = 120
JACDET_OVER = "darkred"
EDGE_LETTER_COLOUR = "yellow"
GRID_LINES = 28


@dataclass(frozen=True)
class DisplayGrid:
    """The fixed grid in RAS+ axis order: how to turn its arrays, and its voxel sizes in mm.

    ``ornt`` is nibabel's orientation transform from the file's axes to RAS+; ``spacing`` the
    voxel size along the turned axes; ``centre`` the voxel (turned) the slices go through.
    """

    ornt: np.ndarray
    spacing: tuple[float, float, float]
    centre: tuple[int, int, int]

    def turn(self, array: np.ndarray) -> np.ndarray:
        """(X, Y, Z) on the fixed grid -> the same voxels in RAS+ axis order."""
        return nib.orientations.apply_orientation(array, self.ornt)

    def turn_vectors(self, flow_vox: np.ndarray) -> np.ndarray:
        """(3, X, Y, Z) voxel displacements along the file's axes -> (3, ...) along RAS+ axes."""
        turned = np.zeros((3, *self.turn(flow_vox[0]).shape), dtype=np.float32)
        for axis, (new_axis, flip) in enumerate(self.ornt):
            turned[int(new_axis)] = flip * self.turn(flow_vox[axis])
        return turned


def display_grid(fixed: Volume) -> DisplayGrid:
    """The display orientation of ``fixed`` and the voxel of its head's centre."""
    ornt = nib.orientations.io_orientation(fixed.affine)
    spacing = [0.0, 0.0, 0.0]
    for axis, (new_axis, _) in enumerate(ornt):
        spacing[int(new_axis)] = fixed.spacing[axis]
    centre_mm = foreground_center_mm(fixed)
    centre_vox = np.rint(nib.affines.apply_affine(np.linalg.inv(fixed.affine), centre_mm))
    centre_vox = np.clip(centre_vox, 0, np.asarray(fixed.shape) - 1).astype(int)
    centre = [0, 0, 0]
    for axis, (new_axis, flip) in enumerate(ornt):
        value = int(centre_vox[axis])
        centre[int(new_axis)] = value if flip > 0 else fixed.shape[axis] - 1 - value
    return DisplayGrid(ornt=ornt, spacing=tuple(spacing), centre=tuple(centre))


def _grey_range(image: np.ndarray) -> tuple[float, float]:
    """Display window: 1st and 99th percentiles of the foreground."""
    values = image[foreground_mask(image)]
    if values.size < 2:
        values = image.ravel()
    low, high = np.percentile(values, [1, 99])
    return float(low), float(max(high, low + 1e-6))


def _checkerboard(first: np.ndarray, second: np.ndarray, tiles: int = 8) -> np.ndarray:
    """2D tiles alternating between two same-shape, already windowed [0, 1] slices."""
    rows = (np.arange(first.shape[0]) * tiles // first.shape[0])[:, None]
    cols = (np.arange(first.shape[1]) * tiles // first.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, first, second)


def _plane(volume: np.ndarray, normal: int, index: int) -> np.ndarray:
    """The slice ``index`` across axis ``normal`` as (vertical, horizontal) for imshow.

    The in-plane axes keep their order (horizontal = the lower one), which gives each view
    of ``VIEWS`` its orientation once the volume is in RAS+ order.
    """
    return np.take(volume, index, axis=normal).T


def check_png_writable(path: str | Path) -> Path:
    """Raise VitregError unless ``path`` is a .png that can be created (before long work)."""
    return check_writable(path, (".png",))


def qc_figure(
    path: str | Path,
    fixed: Volume,
    moving: Volume,
    warped: Volume,
    field: DisplacementField | None = None,
    title: str | None = None,
    dpi: int = 90,
    assessment: Assessment | None = None,
) -> Path:
    """Write a PNG of three orthogonal slices through the fixed head's centre.

    Columns: fixed; moving resampled onto the fixed grid through world coordinates (what
    the pair looked like before registration); warped; a checkerboard of fixed and warped;
    and, with a ``field`` on the fixed grid, the deformed grid (fixed voxel x drawn at
    x + in-plane displacement) and the Jacobian determinant of x + u with a colour bar
    (det <= 0, folding, in black). ``warped`` and ``field`` must lie on the fixed grid.
    ``assessment``: the field's, when already made (:func:`vitreg.assess.assess` with the
    fixed image: its det J map and folding in the fixed head are drawn).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_png_writable(path)
    check_same_grid(fixed, warped)
    if field is not None:
        check_same_grid(fixed, field.grid)
    grid = display_grid(fixed)
    moving_on_fixed = resample(moving.data, moving.affine, fixed.affine, fixed.shape)[0, 0].numpy()
    images = {
        "fixed": grid.turn(fixed.data),
        "moving (on fixed grid)": grid.turn(moving_on_fixed),
        "warped": grid.turn(warped.data),
    }
    windows = {name: _grey_range(image) for name, image in images.items()}
    jacdet, flow_turned, percent_folding = None, None, None
    if field is not None:
        assessment = assessment or assess(field, fixed)
        percent_folding = assessment.folding.percent_nonpositive
        jacdet = grid.turn(assessment.jacdet)
        flow_turned = grid.turn_vectors(field.to_voxels()[0].numpy())

    columns = list(images) + ["checkerboard fixed | warped"]
    if field is not None:
        columns += ["deformed grid", "Jacobian determinant"]
    figure = Figure(
        facecolor="white",
        figsize=(2.1 * len(columns) + 0.7, 2.1 * len(VIEWS) + 0.6),
        dpi=dpi,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(VIEWS), len(columns), squeeze=False)
    jacdet_image = None
    for row, view in enumerate(VIEWS):
        drawn = _draw_view(axes[row], view, grid, images, windows, columns, jacdet, flow_turned)
        jacdet_image = drawn or jacdet_image
        if row == 0:
            for ax, name in zip(axes[row], columns, strict=True):
                ax.set_title(name, fontsize=9)
    if jacdet_image is not None:
        bar = figure.colorbar(
            jacdet_image, ax=axes[:, -1].tolist(), shrink=0.9, extend="both", pad=0.02
        )
        bar.set_label("det J (black: <= 0, folding)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    heading = title or f"{Path(moving.path).name} -> {Path(fixed.path).name}"
    if percent_folding is not None:
        heading += f"   folding {percent_folding:.3f} % of head voxels"
    figure.suptitle(
        f"{heading}\nneurological view (R on the right), slices through the fixed head's centre",
        fontsize=9,
    )
    with atomic_path(path) as temporary:
        _save_palette_png(figure, temporary)
    return path


def _draw_view(
    axes,
    view: tuple,
    grid: DisplayGrid,
    images: dict[str, np.ndarray],
    windows: dict[str, tuple[float, float]],
    columns: list[str],
    jacdet: np.ndarray | None,
    flow_turned: np.ndarray | None,
):
    """One row of the figure: every column's panel in ``view`` (an entry of VIEWS), drawn
    on ``axes``; returns the Jacobian panel's image (for the colour bar) or None."""
    name_of_view, normal, in_plane, letters = view
    index = grid.centre[normal]
    aspect = grid.spacing[in_plane[1]] / grid.spacing[in_plane[0]]
    panels = {}
    for name, image in images.items():
        low, high = windows[name]
        panels[name] = np.clip((_plane(image, normal, index) - low) / (high - low), 0, 1)
    panels["checkerboard fixed | warped"] = _checkerboard(panels["fixed"], panels["warped"])
    jacdet_image = None
    for ax, name in zip(axes, columns, strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        if name in panels:
            ax.imshow(panels[name], cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect)
        elif name == "deformed grid":
            _draw_deformed_grid(ax, flow_turned, normal, index, in_plane, aspect)
        else:
            jacdet_image = ax.imshow(
                _plane(jacdet, normal, index),
                cmap=_jacdet_colormap(),
                vmin=JACDET_RANGE[0] + 1e-6,
                vmax=JACDET_RANGE[1],
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
        _edge_letters(ax, letters)
    axes[0].set_ylabel(f"{name_of_view}, {_slice_label(grid, normal)}", fontsize=9)
    return jacdet_image


def _save_palette_png(figure, path: Path) -> None:
    """Draw and write a 256-colour PNG whose palette holds every colour the figure uses.

    128 greys (images, text, grid lines) and the Jacobian colour map's own levels, so the
    mapping to the palette is nearest-colour without visible loss, at less than half the
    size of matplotlib's RGBA PNG (brain slices compress poorly).
    """
    from matplotlib import colors
    from PIL import Image

    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[..., :3]
    greys = np.repeat(np.linspace(0, 1, 128)[:, None], 3, axis=1)
    cmap = _jacdet_colormap()
    levels = cmap(np.arange(cmap.N))[:, :3]
    accents = np.array([colors.to_rgb(name) for name in (EDGE_LETTER_COLOUR, JACDET_OVER)])
    palette = np.rint(255 * np.concatenate([greys, levels, accents])).astype(np.uint8)
    # Nearest palette entry per distinct colour (a few thousand), not per pixel.
    packed = rgb.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)
    distinct, inverse = np.unique(packed.ravel(), return_inverse=True)
    distinct_rgb = np.stack([(distinct >> 16) & 255, (distinct >> 8) & 255, distinct & 255], 1)
    distance = ((distinct_rgb[:, None, :] - palette[None, :, :].astype(np.int32)) ** 2).sum(-1)
    indices = distance.argmin(axis=1).astype(np.uint8)[inverse].reshape(rgb.shape[:2])
    image = Image.fromarray(indices)  # "L"; putpalette makes it "P"
    image.putpalette(palette.ravel().tolist())
    image.save(path, format="PNG", optimize=True)


def _slice_label(grid: DisplayGrid, normal: int) -> str:
    return f"slice {grid.centre[normal] + 1}"


def _jacdet_colormap():
    from matplotlib import colormaps

    return (
        colormaps["RdBu_r"].resampled(JACDET_LEVELS).with_extremes(under="black", over=JACDET_OVER)
    )


def _edge_letters(ax, letters: tuple[str, str, str, str]) -> None:
    """Anatomical letters at the middle of the left, right, bottom and top edges."""
    from matplotlib import patheffects

    style = {
        "fontsize": 7,
        "color": EDGE_LETTER_COLOUR,
        "weight": "bold",
        "transform": ax.transAxes,
        "path_effects": [patheffects.withStroke(linewidth=1.5, foreground="black")],
    }
    ax.text(0.02, 0.5, letters[0], ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters[1], ha="right", va="center", **style)
    ax.text(0.5, 0.02, letters[2], ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, letters[3], ha="center", va="top", **style)


def _draw_deformed_grid(
    ax, flow_turned: np.ndarray, normal: int, index: int, in_plane: tuple[int, int], aspect: float
) -> None:
    """Lines of the fixed grid moved by the in-plane displacement (voxels of the turned grid)."""
    horizontal = _plane(flow_turned[in_plane[0]], normal, index)
    vertical = _plane(flow_turned[in_plane[1]], normal, index)
    rows, cols = horizontal.shape
    step = max(1, max(rows, cols) // GRID_LINES)
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float32)
    moved_x, moved_y = xs + horizontal, ys + vertical
    ax.set_facecolor("white")
    for r in range(0, rows, step):
        ax.plot(moved_x[r, :], moved_y[r, :], color="black", linewidth=0.4)
    for c in range(0, cols, step):
        ax.plot(moved_x[:, c], moved_y[:, c], color="black", linewidth=0.4)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    ax.set_aspect(aspect)


def qc_files(
    fixed: str | Path,
    moving: str | Path,
    warped: str | Path,
    output: str | Path,
    flow: str | Path | None = None,
    title: str | None = None,
    dpi: int = 90,
    flow_format: str = "auto",
) -> Path:
    """``vitreg qc``: :func:`qc_figure` of image files; ``flow`` is read on the fixed grid
    (:func:`vitreg.field.load_flow` with ``flow_format``)."""
    if not 20 <= dpi <= 600:
        raise OptionError("dpi", dpi, "expected 20 to 600")
    check_png_writable(output)
    fixed_volume = load_image(fixed)
    field = None
    if flow is not None:
        field = load_flow(flow, flow_format, reference=fixed_volume)
    return qc_figure(
        output, fixed_volume, load_image(moving), load_image(warped), field, title, dpi
    )
