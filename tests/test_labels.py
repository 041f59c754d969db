"""Label names: the built-in aseg table against an outside copy of FreeSurfer's, LUT files,
label lists and the left/right grouping of the IXI protocol."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from vitreg.errors import VitregError
from vitreg.labels import FREESURFER_ASEG, read_lut, structure_group

FREESURFER6_NAMES = Path(__file__).parent / "data" / "freesurfer6-aseg-names.csv"
# FreeSurfer 7 renamed these; everything else kept its FreeSurfer 6 name.
RENAMED_IN_FREESURFER7 = {
    "Left-Thalamus-Proper": "Left-Thalamus",
    "Right-Thalamus-Proper": "Right-Thalamus",
}
# The 30 structures of the IXI evaluation (TransMorph IXI/analysis.py, dice_val_VOI) and the
# 17 groups it reports once left and right are merged.
IXI_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31,
              41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 60, 63)  # fmt: skip
IXI_GROUPS = {
    "Brain-Stem", "Thalamus", "Cerebellum-Cortex", "Cerebral-White-Matter",
    "Cerebellum-White-Matter", "Putamen", "VentralDC", "Pallidum", "Caudate",
    "Lateral-Ventricle", "Hippocampus", "3rd-Ventricle", "4th-Ventricle", "Amygdala",
    "Cerebral-Cortex", "CSF", "choroid-plexus",
}  # fmt: skip


def freesurfer6_names() -> dict[int, str]:
    text = FREESURFER6_NAMES.read_text().splitlines()
    rows = csv.DictReader(line for line in text if not line.startswith("#"))
    return {int(row["index"]): row["name"] for row in rows}


def test_builtin_aseg_names_are_freesurfers():
    outside = freesurfer6_names()
    assert len(outside) > 40
    for index, name in outside.items():
        if index == 0:
            continue
        assert FREESURFER_ASEG.get(index) == RENAMED_IN_FREESURFER7.get(name, name), index
    # Labels of aseg.mgz that the Desikan table leaves to its cortical parcels.
    assert FREESURFER_ASEG[3] == "Left-Cerebral-Cortex"
    assert FREESURFER_ASEG[42] == "Right-Cerebral-Cortex"


def test_ixi_structures_merge_into_the_17_published_groups():
    groups = {structure_group(FREESURFER_ASEG[label]) for label in IXI_LABELS}
    assert groups == IXI_GROUPS


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("Left-Hippocampus", "Hippocampus"),
        ("Right-Hippocampus", "Hippocampus"),
        ("Precentral_L", "Precentral"),
        ("Frontal_Sup_Orb_R", "Frontal_Sup_Orb"),
        ("Vermis_1_2", "Vermis_1_2"),
        ("3rd-Ventricle", "3rd-Ventricle"),
        ("ctx-lh-cuneus", "ctx-lh-cuneus"),
    ],
)
def test_structure_group_drops_the_hemisphere_only(name, group):
    assert structure_group(name) == group


def test_a_freesurfer_style_lut_file_reads_back_the_table_it_was_written_from(tmp_path):
    lines = ["#$Id: FreeSurferColorLUT.txt", "", "#No. Label Name:   R   G   B   A"]
    for index, name in FREESURFER_ASEG.items():
        lines.append(f"{index:<5d}{name:<44s}{index % 256:>3d} {(7 * index) % 256:>3d}  20  0")
    lines += ["1035    ctx-lh-insula\t255 192 32 0  # a cortical parcel", "   ", "# end"]
    path = tmp_path / "FreeSurferColorLUT.txt"
    path.write_text("\n".join(lines) + "\n")
    assert read_lut(path) == {**FREESURFER_ASEG, 1035: "ctx-lh-insula"}


def test_bad_lut_files_name_the_file_and_line(tmp_path):
    with pytest.raises(VitregError, match=r"none\.txt: no such label table"):
        read_lut(tmp_path / "none.txt")
    path = tmp_path / "lut.txt"
    path.write_text("0 Unknown 0 0 0 0\n2 Left-Cerebral-White-Matter\nLeft-Cortex 3\n")
    with pytest.raises(VitregError, match=r"lut\.txt:3: expected 'index name \.\.\.'"):
        read_lut(path)
    path.write_text("17\n")
    with pytest.raises(VitregError, match=r"lut\.txt:1:"):
        read_lut(path)
