"""The one pairs-file schema: read by batch, evaluation and training alike, bad rows named."""

from __future__ import annotations

import numpy as np
import pytest

from tests.volumes import write, write_head_set
from vitreg.data import read_csv
from vitreg.errors import VitregError
from vitreg.pairs import check_pairs, load_pair, read_pairs


def test_one_pairs_file_serves_batch_evaluation_and_training(tmp_path):
    (tmp_path / "subjects").mkdir()
    heads = write_head_set(tmp_path / "subjects", 3)
    rows = [
        "Name,Fixed,Moving,Fixed_Labels,Moving_Labels,Set,Split",
        "sub 0,subjects/sub0.nii.gz,subjects/sub1.nii.gz,subjects/sub0_seg.nii.gz,"
        "subjects/sub1_seg.nii.gz,young,train",
        ",subjects/sub1.nii.gz,subjects/sub2.nii.gz,,,,val",
        "",
        ",subjects/sub2.nii.gz,subjects/sub0.nii.gz,,,old,",
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = read_pairs(tmp_path / "pairs.csv")
    check_pairs(pairs)  # every file exists: no error
    assert [(pair.row, pair.name, pair.set, pair.split) for pair in pairs] == [
        (2, "sub_0", "young", "train"),
        (3, "sub2", "all", "val"),
        (5, "sub0", "old", "train"),
    ]
    assert pairs[0].fixed == tmp_path / "subjects/sub0.nii.gz" == heads[0][0]
    assert pairs[0].moving_labels == heads[1][1] and pairs[1].fixed_labels is None
    loaded = load_pair(pairs[0])
    assert loaded.labels is not None and loaded.mask.any() and loaded.mask.shape == (36, 40, 34)
    assert loaded.names[2] == "Left-Cerebral-White-Matter"  # FreeSurfer's, without a lut
    # Training reads the same file: the same images, split by the split column.
    dataset = read_csv(tmp_path / "pairs.csv")
    assert dataset.mode == "pairs"
    assert [(f.image, m.image) for f, m in dataset.train] == [
        (pairs[0].fixed, pairs[0].moving),
        (pairs[2].fixed, pairs[2].moving),
    ]
    assert [(f.image, m.labels) for f, m in dataset.val] == [(pairs[1].fixed, None)]


def test_every_bad_row_is_named_in_one_error_and_each_pair_fails_alone(tmp_path):
    heads = write_head_set(tmp_path, 2)
    image, labels = (path.name for path in heads[0])
    rows = [
        "name,fixed,moving,fixed_labels,moving_labels",
        f"a,{image},missing.nii.gz,,",
        f"b,,{image},,",
        f"c,{image},{heads[1][0].name},{labels},",
        f"d,{image},{heads[1][0].name},,",
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    pairs = read_pairs(tmp_path / "pairs.csv")
    with pytest.raises(VitregError) as caught:
        check_pairs(pairs)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'pairs.csv'}: 3 bad row(s): ")
    for line, problem in ((2, "moving"), (3, "no fixed image"), (4, "go together")):
        assert f"pairs.csv:{line}: " in message and problem in message
    assert "missing.nii.gz: no such file" in message
    with pytest.raises(VitregError, match="go together"):
        load_pair(pairs[2])
    good = load_pair(pairs[3])  # the others do not stop a good pair
    assert good.labels is None and np.array_equal(good.fixed.affine, good.moving.affine)
    with pytest.raises(VitregError, match="3 bad row"):
        read_csv(tmp_path / "pairs.csv")  # training stops before any work, naming them all


def test_a_file_that_is_wrong_as_a_whole_is_refused(tmp_path):
    csv = tmp_path / "pairs.csv"
    for text, expected in (
        ("", "empty file"),
        ("fixed,image\na,b\n", "no moving column"),
        ("fixed,moving\n\n", "no pairs listed"),
        ("name,fixed,moving\na b,f,m\na/b,f,m2\n", "output name 'a_b' is also that of line 2"),
    ):
        csv.write_text(text)
        with pytest.raises(VitregError, match=expected):
            read_pairs(csv)
    with pytest.raises(VitregError, match="no such CSV file"):
        read_pairs(tmp_path / "none.csv")


def test_names_without_a_name_column_come_from_the_files_that_differ(tmp_path):
    def names(*rows: str) -> list[str]:
        (tmp_path / "pairs.csv").write_text("fixed,moving\n" + "\n".join(rows) + "\n")
        return [pair.name for pair in read_pairs(tmp_path / "pairs.csv")]

    # moving files that differ name the pairs alone, with as many folders as tell them apart
    assert names("atlas.nii.gz,s1/mri/brain.mgz", "atlas.nii.gz,s2/mri/brain.mgz") == [
        "s1_mri_brain",
        "s2_mri_brain",
    ]
    # one atlas to many subjects, one subject to many templates: MOVING_to_FIXED
    assert names("s1/T1.nii.gz,atlas.nii.gz", "s2/T1.nii.gz,atlas.nii.gz") == [
        "atlas_to_s1_T1",
        "atlas_to_s2_T1",
    ]
    assert names("tpl/A.nii.gz,s1 é.nii.gz", "tpl/B.nii.gz,s1 é.nii.gz") == [
        "s1_é_to_A",
        "s1_é_to_B",
    ]
    # a mix: two subjects, each to two templates
    assert names("A.nii,s1.nii", "B.nii,s1.nii", "A.nii,s2.nii", "B.nii,s2.nii") == [
        "s1_to_A",
        "s1_to_B",
        "s2_to_A",
        "s2_to_B",
    ]
    with pytest.raises(VitregError, match="pairs.csv:3: output name 'm_to_f' is also that"):
        names("f.nii,m.nii", "f.nii,m.nii")


def test_cost_mask_columns_are_read_on_each_images_grid(tmp_path):
    heads = write_head_set(tmp_path, 2)
    (fixed, fixed_seg), (moving, moving_seg) = ((a.name, b.name) for a, b in heads)
    small = write(tmp_path / "small.nii.gz", np.ones((8, 8, 8), np.uint8), np.eye(4))
    rows = [
        "fixed,moving,fixed_mask,moving_mask",
        f"{fixed},{moving},{fixed_seg},{moving_seg}",
        f"{fixed},{moving},,{small.name}",
    ]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    first, second = read_pairs(tmp_path / "pairs.csv", unique_names=False)
    loaded = load_pair(first)
    assert loaded.fixed_mask.path == heads[0][1] and loaded.moving_mask.path == heads[1][1]
    assert loaded.moving_mask.data.shape == loaded.moving.shape
    assert second.fixed_mask is None
    with pytest.raises(VitregError, match="small.nii.gz: grid"):
        load_pair(second)
