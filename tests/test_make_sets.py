"""benchmarks/make_sets.py on a tiny brain: reproducible, and its true flow gives the labels."""

from __future__ import annotations

import importlib.util
import sys
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
