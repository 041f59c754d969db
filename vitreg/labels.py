"""Label names: FreeSurfer aseg names built in, or any FreeSurfer-style colour table file."""

from __future__ import annotations

from pathlib import Path

from vitreg.errors import VitregError

# Names from FreeSurferColorLUT.txt (FreeSurfer 7) for the labels that aseg.mgz uses.
FREESURFER_ASEG = {
    2: "Left-Cerebral-White-Matter",
    3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    14: "3rd-Ventricle",
    15: "4th-Ventricle",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    18: "Left-Amygdala",
    24: "CSF",
    26: "Left-Accumbens-area",
    28: "Left-VentralDC",
    30: "Left-vessel",
    31: "Left-choroid-plexus",
    41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle",
    44: "Right-Inf-Lat-Vent",
    46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus",
    50: "Right-Caudate",
    51: "Right-Putamen",
    52: "Right-Pallidum",
    53: "Right-Hippocampus",
    54: "Right-Amygdala",
    58: "Right-Accumbens-area",
    60: "Right-VentralDC",
    62: "Right-vessel",
    63: "Right-choroid-plexus",
    72: "5th-Ventricle",
    77: "WM-hypointensities",
    80: "non-WM-hypointensities",
    85: "Optic-Chiasm",
    251: "CC_Posterior",
    252: "CC_Mid_Posterior",
    253: "CC_Central",
    254: "CC_Mid_Anterior",
    255: "CC_Anterior",
}


def read_lut(path: str | Path) -> dict[int, str]:
    """Read a colour table: lines ``index name [r g b a]``; '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise VitregError(f"{path}: no such label table")
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
            raise VitregError(f"{path}:{number}: expected 'index name ...', got {line.strip()!r}")
        names[int(fields[0])] = fields[1]
    return names


def structure_group(name: str) -> str:
    """The structure a left or right label belongs to, hemisphere dropped.

    FreeSurfer names lose a 'Left-'/'Right-' prefix ('Left-Hippocampus' -> 'Hippocampus'),
    AAL names an '_L'/'_R' suffix ('Precentral_L' -> 'Precentral'); others stay as they are.
    """
    for prefix in ("Left-", "Right-"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    for suffix in ("_L", "_R"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
