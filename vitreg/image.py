"""NIfTI/MGZ in and out with nibabel: checked loading, header-preserving atomic saving.

Every file is checked before its data is read (exists, not empty, a header nibabel reads
that places the voxels in the world, real scalar data, a shape that fits in memory) and
while it is read (truncated or garbled data, gzip checksum); each problem is a VitregError
naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from vitreg.errors import VitregError
from vitreg.files import atomic_path, check_folder_writable

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")


@dataclass(frozen=True)
class Volume:
    """A 3D array on a world grid.

    ``data`` is (X, Y, Z) in the file's array order; ``affine`` maps voxel indices to world
    RAS+ mm (nibabel's convention); ``header`` is the file's header, kept so outputs can
    copy it; ``path`` names the file in error messages.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.spatialimages.SpatialHeader | None
    path: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape[:3])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array axes (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


MAX_VOXELS = 2**31
"""The most array elements an image may hold: past 2^31, 32-bit indexing in resampling
kernels overflows."""
MEMORY_SHARE = 4
"""An image is refused when its float32 array alone would take more than 1/MEMORY_SHARE of
the machine's memory: registering it needs many arrays of that size."""


CORRUPT_DATA = (EOFError, zlib.error, gzip.BadGzipFile)
"""What reading a truncated or garbled (compressed) file raises."""


def _physical_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gib(count: float) -> str:
    return f"{count / 2**30:,.1f} GiB"


def _check_size(path: Path, shape: tuple[int, ...]) -> None:
    """VitregError when the header's shape is too large to read (before any data is read)."""
    elements = math.prod(int(n) for n in shape)
    memory = _physical_memory()
    if elements > MAX_VOXELS:
        limit = f"more than the {MAX_VOXELS:,} values vitreg handles"
    elif memory is not None and 4 * elements > memory // MEMORY_SHARE:
        limit = f"more than 1/{MEMORY_SHARE} of this machine's {_gib(memory)} memory"
    else:
        return
    raise VitregError(
        f"{path}: shape {tuple(int(n) for n in shape)} is too large: as float32 it would take "
        f"{_gib(4 * elements)}, {limit}"
    )


def _raw_nifti_header(path: Path, image: nib.spatialimages.SpatialImage) -> nib.Nifti1Header | None:
    """A NIfTI file's header as written, before nibabel's repairs (which set a zero voxel
    size to 1 and a negative one to its absolute value); None for other formats."""
    if not isinstance(image, nib.Nifti1Image):  # NIfTI-2 is one too
        return None
    with nib.openers.ImageOpener(str(path)) as handle:
        return type(image.header).from_fileobj(handle, check=False)


def _check_header(
    path: Path, image: nib.spatialimages.SpatialImage, header: nib.Nifti1Header | None
) -> None:
    """VitregError for a header that cannot place the voxels in the world: a voxel size
    (NIfTI pixdim of the unrepaired ``header``) that is zero, negative or NaN, or an affine
    that holds NaN/Inf or is singular; and for data that is not real scalars (complex, RGB)."""
    if header is not None:
        spatial = min(3, len(image.shape))
        pixdim = [float(v) for v in header["pixdim"][1 : spatial + 1]]
        if not all(math.isfinite(v) and v > 0 for v in pixdim):
            sizes = ", ".join(f"{v:g}" for v in pixdim)
            raise VitregError(
                f"{path}: broken header: voxel size (pixdim) ({sizes}) must be positive"
            )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise VitregError(f"{path}: broken header: the voxel-to-world affine holds NaN or Inf")
    singular_values = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular_values.min() <= 1e-6 * singular_values.max():
        lengths = tuple(round(float(n), 6) for n in np.linalg.norm(affine[:3, :3], axis=0))
        raise VitregError(
            f"{path}: broken header: the voxel-to-world affine is singular "
            f"(voxel axes {lengths} mm long, or parallel)"
        )
    dtype = np.dtype(image.get_data_dtype())
    if dtype.kind not in "biuf":
        kind = "complex" if dtype.kind == "c" else "RGB" if dtype.names else str(dtype)
        raise VitregError(
            f"{path}: data type {kind} ({dtype.str}); vitreg reads real-valued scalar images"
        )


def _open(path: Path) -> nib.spatialimages.SpatialImage:
    """The image with its header checked and its size within limits; no data read yet.

    The checks run in this order: the file exists, is a file and is not empty; nibabel reads
    its header; the header places the voxels (pixdim, affine) and holds real scalars; the
    shape is not too large (:func:`_check_size`). A header that claims a huge shape is thus
    refused for its size before a missing or truncated data part could be noticed.
    """
    if not path.exists():
        raise VitregError(f"{path}: no such file")
    if path.is_dir():
        raise VitregError(f"{path}: is a directory, not an image")
    if path.stat().st_size == 0:
        raise VitregError(f"{path}: empty file (0 bytes)")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # no repair notes on stderr
            image = nib.load(str(path))
        header = _raw_nifti_header(path, image)
    except CORRUPT_DATA as error:  # MGZ: nibabel reads the footer after the data
        raise VitregError(f"{path}: truncated or corrupt file ({_one_line(error)})") from None
    except Exception as error:  # nibabel raises many types for unreadable files
        raise VitregError(f"{path}: not a readable NIfTI/MGZ image ({_one_line(error)})") from None
    _check_header(path, image, header)
    _check_size(path, tuple(image.shape))
    return image


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_data(path: Path, read: Callable[[], np.ndarray]) -> np.ndarray:
    """``read()`` (which reads the image's data), with a truncated or corrupt data part
    (gzip or zlib errors, a short file, a gzip checksum that does not match) turned into a
    VitregError naming the file."""
    try:
        data = read()
        _check_gzip_checksum(path)
    except (*CORRUPT_DATA, OSError, ValueError) as error:  # a short .nii: OSError or ValueError
        raise VitregError(f"{path}: truncated or corrupt image data ({_one_line(error)})") from None
    return data


GZIP_MAGIC = b"\x1f\x8b"
GZIP_CHUNK = 1 << 24


def _check_gzip_checksum(path: Path) -> None:
    """Decompress a gzip file (.nii.gz, .mgz) to its end, where Python checks the CRC-32 and
    length that gzip stores: nibabel stops after the data it needs, so a garbled stream could
    otherwise give wrong voxels silently. Raises gzip.BadGzipFile, zlib.error or EOFError."""
    with open(path, "rb") as raw:
        if raw.read(2) != GZIP_MAGIC:
            return
    with gzip.open(path, "rb") as stream:
        while stream.read(GZIP_CHUNK):
            pass


def _check_3d_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(X, Y, Z) of an array shape (X, Y, Z) or (X, Y, Z, 1...); anything else is a user error."""
    if len(shape) < 3:
        raise VitregError(f"{path}: a {len(shape)}D image; vitreg needs a 3D volume")
    if any(n != 1 for n in shape[3:]):
        raise VitregError(
            f"{path}: a {len(shape)}D image of shape {tuple(shape)}; vitreg needs a 3D volume "
            "(or 4D with a single volume)"
        )
    return tuple(int(n) for n in shape[:3])


def _squeeze_to_3d(path: Path, array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) or (X, Y, Z, 1...) -> (X, Y, Z); anything else is a user error."""
    return array.reshape(_check_3d_shape(path, array.shape))


def read_grid(path: str | Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape (X, Y, Z) and voxel-to-world affine of an image from its header alone (no data).

    Raises VitregError for a missing or unreadable file and for anything but one 3D volume.
    """
    path = Path(path)
    image = _open(path)
    shape = _check_3d_shape(path, tuple(image.shape))
    if min(shape) < 2:
        raise VitregError(f"{path}: shape {shape} is not a 3D volume (an axis of size 1)")
    return shape, image.affine.astype(np.float64)


def load_image(path: str | Path) -> Volume:
    """Read an intensity image as float32 (X, Y, Z) with scaling slopes applied.

    Rejects missing, empty, unreadable, truncated or corrupt files, broken headers (voxel
    size, affine), complex or RGB data, shapes too large for memory, 2D or multi-volume
    images, NaN/Inf voxels and constant images, each with a message naming the file.
    """
    path = Path(path)
    image = _open(path)
    data = _read_data(path, lambda: np.asarray(image.get_fdata(dtype=np.float32)))
    data = _squeeze_to_3d(path, data)
    if min(data.shape) < 2:
        raise VitregError(f"{path}: shape {data.shape} is not a 3D volume (an axis of size 1)")
    finite = np.isfinite(data)
    if not finite.all():
        raise VitregError(f"{path}: {int((~finite).sum())} of {data.size} voxels are NaN or Inf")
    if float(data.max()) == float(data.min()):
        raise VitregError(f"{path}: the image is constant (every voxel is {float(data.min())})")
    return Volume(data=data, affine=image.affine.astype(np.float64), header=image.header, path=path)


def load_labels(path: str | Path) -> Volume:
    """Read an integer label map (X, Y, Z) as int64; non-integer values are a user error."""
    path = Path(path)
    image = _open(path)
    raw = _squeeze_to_3d(path, _read_data(path, lambda: np.asarray(image.dataobj)))
    if np.issubdtype(raw.dtype, np.integer):
        data = raw.astype(np.int64)
    else:
        if not np.isfinite(raw).all():
            raise VitregError(f"{path}: label map has NaN or Inf voxels")
        data = np.rint(raw).astype(np.int64)
        if not np.allclose(raw, data, atol=1e-3):
            raise VitregError(f"{path}: label map holds non-integer values (is it an image?)")
    return Volume(data=data, affine=image.affine.astype(np.float64), header=image.header, path=path)


def label_dtype(labels: Volume) -> str:
    """The label file's own integer type on disk (native byte order), else int32."""
    dtype = np.dtype(labels.header.get_data_dtype()) if labels.header is not None else None
    if dtype is not None and np.issubdtype(dtype, np.integer):
        return dtype.newbyteorder("=").name
    return "int32"


def load_raw(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.spatialimages.SpatialHeader]:
    """Read any image's array (float32, scaling applied, no shape checks), affine and header."""
    path = Path(path)
    image = _open(path)
    return (
        _read_data(path, lambda: np.asarray(image.get_fdata(dtype=np.float32))),
        image.affine.astype(np.float64),
        image.header,
    )


def check_writable(path: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> Path:
    """Raise VitregError unless ``path`` ends in one of ``suffixes`` and can be created.

    Checked before long work starts, so a typo costs seconds, not a registration.
    """
    path = Path(path)
    if not path.name.endswith(suffixes):
        raise VitregError(f"{path}: output must end in one of {', '.join(suffixes)}")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise VitregError(f"{path}: output directory {directory} does not exist")
    if path.is_dir():
        raise VitregError(f"{path}: is a directory")
    check_folder_writable(directory, path)
    return path


def _nifti_header_from(reference: Volume | None) -> nib.Nifti1Header | None:
    if reference is not None and isinstance(reference.header, nib.Nifti1Header):
        header = reference.header.copy()
        header.set_slope_inter(None, None)
        return header
    return None


# The types an MGH file can hold (uint8, int16, int32, float32), and what others become.
MGH_DTYPES = ("uint8", "int16", "int32", "float32")


def _mgh_data(path: Path, data: np.ndarray) -> np.ndarray:
    """``data`` in a type MGH holds: integers that fit int32 as int32, the rest float32."""
    if data.ndim > 4:
        raise VitregError(
            f"{path}: MGZ holds at most 4D (X, Y, Z, frames); write this {data.ndim}D image "
            "(e.g. an ITK flow) as .nii.gz"
        )
    if data.dtype.name in MGH_DTYPES:
        return data
    if data.dtype == bool:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer) and (
        data.size == 0 or (data.min() >= -(2**31) and data.max() < 2**31)
    ):
        return data.astype(np.int32)
    return data.astype(np.float32)


def _mgh_header_from(reference: Volume) -> nib.freesurfer.mghformat.MGHHeader | None:
    """The reference's MGH header (scan parameters TR, flip angle, TE, TI, FoV), if it has one.

    nibabel rewrites its shape, type and vox2ras from the data and the affine on saving.
    """
    if isinstance(reference.header, nib.freesurfer.mghformat.MGHHeader):
        return reference.header.copy()
    return None


def save(
    path: str | Path,
    data: np.ndarray,
    reference: Volume,
    intent: str | None = None,
) -> Path:
    """Write ``data`` (X, Y, Z[, ...]) on ``reference``'s grid, atomically.

    The header is the reference's (affine, qform/sform and their codes, units) with the data
    type of ``data``; the file is written beside the target and renamed into place, so a
    failure never leaves a half-written output. ``.mgz``/``.mgh`` write FreeSurfer MGH.
    """
    path = check_writable(path)
    if data.shape[:3] != reference.shape:
        raise ValueError(f"data shape {data.shape} does not match grid {reference.shape}")
    if path.name.endswith((".mgz", ".mgh")):
        mgh_data = _mgh_data(path, data)
        image = nib.MGHImage(mgh_data, reference.affine, header=_mgh_header_from(reference))
        image.header.set_data_dtype(mgh_data.dtype)  # not the reference's type
    else:
        header = _nifti_header_from(reference)
        image = nib.Nifti1Image(data, reference.affine, header=header)
        if header is not None:
            # Keep the reference's qform/sform codes (and the matrices they carry).
            image.set_qform(reference.header.get_qform(), int(reference.header["qform_code"]))
            image.set_sform(reference.header.get_sform(), int(reference.header["sform_code"]))
        else:
            image.set_qform(reference.affine, 1)
            image.set_sform(reference.affine, 1)
        image.header.set_data_dtype(data.dtype)
        if header is not None:
            image.header.set_xyzt_units(*reference.header.get_xyzt_units())
        else:
            image.header.set_xyzt_units("mm", "sec")
        if intent is not None:
            image.header.set_intent(intent)
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return path
