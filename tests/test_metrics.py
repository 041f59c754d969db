"""Tests for vitreg.metrics: Dice, Jacobian determinant and folding."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitreg.errors import VitregError
from vitreg.metrics import DiceResult, dice_per_label, folding, jacobian_determinant


def linear_flow(matrix: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel flow u(x) = matrix @ x as (3, D, H, W); channel i along array axis i."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", matrix, grid)


def smooth_flow(shape: tuple[int, int, int], seed: int, amplitude: float) -> np.ndarray:
    """A random smooth (3, D, H, W) voxel flow."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *shape))
    return amplitude * np.stack([ndimage.gaussian_filter(c, 2.0) for c in noise])


def finite_difference(volume: np.ndarray, axis: int) -> np.ndarray:
    """Central differences inside, first-order one-sided at the two borders (unit spacing)."""
    moved = np.moveaxis(volume, axis, 0)
    result = np.empty_like(moved)
    result[1:-1] = (moved[2:] - moved[:-2]) / 2
    result[0] = moved[1] - moved[0]
    result[-1] = moved[-1] - moved[-2]
    return np.moveaxis(result, 0, axis)


def reference_jacdet(flow: np.ndarray) -> np.ndarray:
    """det(I + du/dx) per voxel, built as explicit 3x3 matrices and np.linalg.det."""
    jac = np.empty((*flow.shape[1:], 3, 3))
    for component in range(3):
        for axis in range(3):
            jac[..., component, axis] = finite_difference(flow[component], axis)
    return np.linalg.det(jac + np.eye(3))


def voxelmorph_layout_jacdet(flow: np.ndarray) -> np.ndarray:
    """The VoxelMorph recipe: np.gradient of (grid + disp) in (D, H, W, 3) layout."""
    shape = flow.shape[1:]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    dx, dy, dz = np.gradient(np.moveaxis(flow, 0, -1) + grid)[:3]
    det0 = dx[..., 0] * (dy[..., 1] * dz[..., 2] - dy[..., 2] * dz[..., 1])
    det1 = dx[..., 1] * (dy[..., 0] * dz[..., 2] - dy[..., 2] * dz[..., 0])
    det2 = dx[..., 2] * (dy[..., 0] * dz[..., 1] - dy[..., 1] * dz[..., 0])
    return det0 - det1 + det2


def test_zero_flow_has_unit_determinant() -> None:
    det = jacobian_determinant(np.zeros((3, 6, 7, 8)))
    assert det.shape == (6, 7, 8)
    np.testing.assert_array_equal(det, 1.0)


def test_linear_flow_has_analytic_determinant() -> None:
    matrix = np.array([[0.2, -0.1, 0.05], [0.3, -0.4, 0.0], [0.1, 0.2, 0.5]])
    det = jacobian_determinant(linear_flow(matrix, (6, 7, 8)))
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + matrix), rtol=1e-12)


def test_jacobian_matches_independent_finite_differences() -> None:
    flow = smooth_flow((12, 14, 10), seed=0, amplitude=8.0)
    det = jacobian_determinant(flow)
    np.testing.assert_allclose(det, reference_jacdet(flow), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(det, voxelmorph_layout_jacdet(flow), rtol=1e-10, atol=1e-10)


def test_jacobian_accepts_batch_of_one_and_torch() -> None:
    flow = smooth_flow((6, 6, 6), seed=1, amplitude=3.0)
    expected = jacobian_determinant(flow)
    np.testing.assert_allclose(jacobian_determinant(flow[None]), expected)
    np.testing.assert_allclose(jacobian_determinant(torch.from_numpy(flow)[None]), expected)


@pytest.mark.parametrize("shape", [(3, 6, 6), (2, 3, 4, 4, 4), (2, 4, 4, 4), (3, 1, 4, 4)])
def test_jacobian_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(VitregError, match="flow_vox"):
        jacobian_determinant(np.zeros(shape))


def test_folding_counts_a_folded_field() -> None:
    folded = np.diag([-2.0, 0.0, 0.0])  # phi_0 = -x_0: reflection, det = -1
    det = jacobian_determinant(linear_flow(folded, (4, 5, 6)))
    result = folding(det)
    assert result.count_nonpositive == 4 * 5 * 6
    assert result.percent_nonpositive == 100.0
    assert result.sdlogj == pytest.approx(0.0, abs=1e-12)


def test_folding_counts_a_local_fold() -> None:
    flow = np.zeros((3, 16, 16, 16))
    flow[0, 6:10] = -np.arange(6, 10)[:, None, None] * 1.5  # phi_0 runs backwards inside
    det = jacobian_determinant(flow)
    result = folding(det)
    assert result.count_nonpositive == int(np.sum(det <= 0))
    assert 0 < result.count_nonpositive < det.size
    assert result.percent_nonpositive == pytest.approx(100 * result.count_nonpositive / det.size)


def test_folding_statistics_by_hand() -> None:
    det = np.array([[[1.0, 2.0], [-1.0, 0.0]]])
    result = folding(det)
    assert result.count_nonpositive == 2
    assert result.percent_nonpositive == 50.0
    logs = np.log([1.0, 2.0, 1e-9, 1e-9])
    assert result.sdlogj == pytest.approx(float(np.std(logs)))


def test_folding_with_mask() -> None:
    det = np.array([[[1.0, math.e], [-1.0, 0.5]]])
    mask = np.array([[[True, True], [False, False]]])
    result = folding(det, mask)
    assert result.count_nonpositive == 0
    assert result.percent_nonpositive == 0.0
    assert result.sdlogj == pytest.approx(0.5)
    with pytest.raises(VitregError, match="mask"):
        folding(det, mask[..., :1])
    with pytest.raises(VitregError, match="empty"):
        folding(det, np.zeros_like(mask))


def test_dice_of_identical_maps_is_one() -> None:
    labels = np.random.default_rng(2).integers(0, 5, size=(8, 8, 8))
    result = dice_per_label(labels, labels)
    assert result.scores == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    assert result.mean == 1.0
    assert result.missing_in_a == [] and result.missing_in_b == []


def test_dice_of_disjoint_maps_is_zero() -> None:
    a = np.zeros((4, 4, 4), dtype=np.int32)
    b = np.zeros((4, 4, 4), dtype=np.int32)
    a[:2] = 1
    b[2:] = 1
    assert dice_per_label(a, b).scores == {1: 0.0}


def test_dice_hand_computed() -> None:
    a = np.array([1, 1, 2, 0, 0])
    b = np.array([1, 2, 2, 2, 0])
    result = dice_per_label(a, b)
    assert result.scores == pytest.approx({1: 2 * 1 / 3, 2: 2 * 1 / 4})
    assert result.mean == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_dice_reports_missing_labels_without_nan() -> None:
    a = np.array([0, 1, 1, 3, 3])
    b = np.array([0, 1, 1, 0, 4])
    result = dice_per_label(a, b, labels=[0, 1, 3, 4, 7])
    assert result.scores == {1: 1.0, 3: 0.0, 4: 0.0}
    assert result.missing_in_a == [4, 7]
    assert result.missing_in_b == [3, 7]
    assert result.mean == pytest.approx(1 / 3)
    assert not any(math.isnan(score) for score in result.scores.values())


def test_dice_with_no_labels_is_zero_not_nan() -> None:
    background = np.zeros((3, 3, 3), dtype=np.uint8)
    result = dice_per_label(background, background)
    assert result == DiceResult(scores={}, missing_in_a=[], missing_in_b=[], mean=0.0)


def test_dice_large_and_negative_labels_match_small_labels() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, size=(6, 6, 6))
    b = rng.integers(0, 4, size=(6, 6, 6))
    mapping = np.array([0, -5, 10**9, 2**40])
    small = dice_per_label(a, b)
    large = dice_per_label(mapping[a], mapping[b])
    assert large.scores == pytest.approx({int(mapping[k]): v for k, v in small.scores.items()})
    assert large.mean == pytest.approx(small.mean)


def test_dice_accepts_torch_and_whole_float_maps() -> None:
    a = np.array([[[0, 1], [2, 2]]])
    expected = dice_per_label(a, a)
    assert dice_per_label(torch.from_numpy(a), a.astype(np.float64)) == expected
    with pytest.raises(VitregError, match="whole numbers"):
        dice_per_label(a + 0.5, a)


def test_dice_shape_mismatch_raises() -> None:
    with pytest.raises(VitregError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        dice_per_label(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int))
