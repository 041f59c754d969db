"""vitreg.optimize: the greedy engine's pieces against scipy/numpy, and what it recovers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from vitreg.errors import VitregError
from vitreg.metrics import jacobian_determinant
from vitreg.optimize import (
    CostMasks,
    FieldComposer,
    GreedySchedule,
    Region,
    _Level,
    box_sum,
    gaussian_smooth,
    greedy_optimize,
    ncc_gradient,
    spatial_gradient,
)
from vitreg.transform import warp


def _random(shape, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *shape, generator=generator, dtype=dtype)


def test_box_sum_equals_scipy_convolution_with_a_box_of_ones():
    volume = _random((9, 11, 13))
    expected = ndimage.convolve(volume[0, 0].numpy(), np.ones((5, 5, 5)), mode="constant")
    np.testing.assert_allclose(box_sum(volume, 5)[0, 0].numpy(), expected, atol=1e-10)


def test_gaussian_smooth_equals_scipy_gaussian_filter_with_nearest_edges():
    field = _random((12, 14, 10)).repeat(1, 3, 1, 1, 1)
    for sigma in (0.7071, 1.732):
        expected = ndimage.gaussian_filter(
            field.numpy(), sigma=(0, 0, sigma, sigma, sigma), mode="nearest", truncate=3.0
        )
        np.testing.assert_allclose(gaussian_smooth(field, sigma).numpy(), expected, atol=1e-10)


def test_spatial_gradient_equals_numpy_gradient():
    image = _random((6, 7, 8))
    expected = np.stack(np.gradient(image[0, 0].numpy()))
    np.testing.assert_allclose(spatial_gradient(image)[0].numpy(), expected, atol=1e-12)


def _summed_ncc_brute_force(
    fixed: np.ndarray, warped: np.ndarray, window: int, weight: np.ndarray | None = None
) -> float:
    """Sum over voxels of cross^2 / (var_f var_w + 1e-5) with zero-padded window sums, by
    loops, each voxel's term times ``weight`` there when given."""
    half = window // 2
    padded_f = np.pad(fixed, half)
    padded_w = np.pad(warped, half)
    total = 0.0
    count = window**3
    for index in np.ndindex(fixed.shape):
        box = tuple(slice(i, i + window) for i in index)
        f, w = padded_f[box], padded_w[box]
        cross = (f * w).sum() - f.sum() * w.sum() / count
        var_f = (f * f).sum() - f.sum() ** 2 / count
        var_w = (w * w).sum() - w.sum() ** 2 / count
        term = cross * cross / (var_f * var_w + 1e-5)
        total += term * (1.0 if weight is None else weight[index])
    return total


def test_exact_ncc_gradient_matches_finite_differences_of_a_brute_force_ncc():
    fixed, warped = _random((5, 6, 5), seed=1), _random((5, 6, 5), seed=2)
    gradient, score = ncc_gradient(fixed, warped, window=3)
    f, w = fixed[0, 0].numpy(), warped[0, 0].numpy()
    assert score == pytest.approx(_summed_ncc_brute_force(f, w, 3) / f.size, rel=1e-6)
    for voxel in [(0, 0, 0), (2, 3, 2), (4, 5, 4), (1, 4, 3)]:
        step = np.zeros_like(w)
        step[voxel] = 1e-5
        numeric = (
            _summed_ncc_brute_force(f, w + step, 3) - _summed_ncc_brute_force(f, w - step, 3)
        ) / 2e-5
        assert gradient[0, 0][voxel].item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def test_weighted_ncc_gradient_matches_finite_differences_of_the_weighted_sum():
    fixed, warped = _random((5, 6, 5), seed=3), _random((5, 6, 5), seed=4)
    weight = (_random((5, 6, 5), seed=5) > 0.4).double() * 0.75  # a mask, with a fraction
    gradient, score = ncc_gradient(fixed, warped, window=3, weight=weight)
    f, w, m = fixed[0, 0].numpy(), warped[0, 0].numpy(), weight[0, 0].numpy()
    assert score == pytest.approx(_summed_ncc_brute_force(f, w, 3, m) / m.sum(), rel=1e-6)
    for voxel in [(0, 0, 0), (2, 3, 2), (4, 5, 4), (1, 4, 3), (3, 1, 1)]:
        step = np.zeros_like(w)
        step[voxel] = 1e-5
        numeric = (
            _summed_ncc_brute_force(f, w + step, 3, m) - _summed_ncc_brute_force(f, w - step, 3, m)
        ) / 2e-5
        assert gradient[0, 0][voxel].item() == pytest.approx(numeric, rel=1e-3, abs=1e-6)


def _blob_pair(shape=(32, 32, 32)):
    """A smooth random image and the same image pulled by a known smooth field (voxels)."""
    generator = torch.Generator().manual_seed(5)
    noise = torch.rand(1, 1, *shape, generator=generator)
    image = torch.from_numpy(ndimage.gaussian_filter(noise[0, 0].numpy(), 1.5))[None, None]
    image = (image - image.min()) / (image.max() - image.min())
    coarse = torch.randn(1, 3, 4, 4, 4, generator=generator) * 1.5
    field = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")
    fixed = warp(image, field)
    return fixed, image, field


def test_field_composer_is_the_update_then_the_field_as_scipy_composes_them():
    shape = (9, 11, 10)
    generator = torch.Generator().manual_seed(3)
    state = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float64) * 2
    update = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float64)
    points = np.indices(shape) + update[0].numpy()  # some fall outside: edge values extend
    expected = np.stack(
        [
            update[0, c].numpy()
            + ndimage.map_coordinates(state[0, c].numpy(), points, order=1, mode="nearest")
            for c in range(3)
        ]
    )
    composer = FieldComposer(shape, torch.device("cpu"), torch.float64)
    composed = composer.compose_(state.clone(), update)
    np.testing.assert_allclose(composed[0].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("moving_gradient", [True, False])
def test_update_direction_is_the_ncc_gradient_times_the_image_gradient_as_scipy_reads_it(
    moving_gradient,
):
    """One added, unsmoothed step: the update is the NCC gradient times the moving image's
    gradient read through the field (or the warped image's own gradient), scaled so that its
    longest vector is one voxel; every read cross-checked with scipy (grid-constant: zero
    outside, as grid_sample pads)."""
    shape = (12, 13, 11)
    fixed = _random(shape, seed=6)
    moving = torch.from_numpy(ndimage.gaussian_filter(_random(shape, seed=7)[0, 0].numpy(), 1))
    moving = moving[None, None]
    generator = torch.Generator().manual_seed(8)
    coarse = torch.randn(1, 3, 3, 3, 3, generator=generator, dtype=torch.float64)
    state = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear")
    schedule = GreedySchedule(
        levels=(1,), iterations=(1,), window=3, sigma_update=0, sigma_field=0,
        sigma_field_full=0, compositive=False, moving_gradient=moving_gradient,
    )  # fmt: skip
    level = _Level(fixed, moving, Region((0, 0, 0), shape), 1, schedule, shape)
    update = level.step(state.clone(), schedule) - state

    points = np.indices(shape) + state[0].numpy()

    def read(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, points, order=1, mode="grid-constant")

    warped = read(moving[0, 0].numpy())
    ncc, _ = ncc_gradient(fixed, torch.from_numpy(warped)[None, None], window=3)
    if moving_gradient:
        image_gradient = np.stack([read(g) for g in np.gradient(moving[0, 0].numpy())])
    else:
        image_gradient = np.stack(np.gradient(warped))
    direction = ncc[0].numpy() * image_gradient
    expected = direction / np.linalg.norm(direction, axis=0).max()
    np.testing.assert_allclose(update[0].numpy(), expected, atol=1e-9)


def test_the_field_is_smoothed_with_sigma_field_full_at_full_resolution_only():
    """One added, unsmoothed-update step at level 1: the field ends as scipy's Gaussian
    (sigma_field_full voxels, edges replicated) of the unsmoothed step's field; at level 2 the
    same schedule smooths with sigma_field; None means sigma_field at level 1 too."""
    shape = (12, 13, 11)
    fixed = _random(shape, seed=9)
    moving = torch.from_numpy(ndimage.gaussian_filter(_random(shape, seed=10)[0, 0].numpy(), 1))
    moving = moving[None, None]
    generator = torch.Generator().manual_seed(11)
    state = torch.randn(1, 3, *shape, generator=generator, dtype=torch.float64)
    region = Region((0, 0, 0), shape)

    def one_step(factor: int, sigma_field: float, sigma_field_full: float | None):
        schedule = GreedySchedule(
            levels=(factor,), iterations=(1,), window=3, sigma_update=0,
            sigma_field=sigma_field, sigma_field_full=sigma_field_full, compositive=False,
        )  # fmt: skip
        field_shape = [n // factor for n in shape]
        start = torch.nn.functional.interpolate(state, size=field_shape, mode="trilinear")
        level = _Level(fixed, moving, region, factor, schedule, field_shape)
        return level.step(start, schedule)[0].numpy()

    raw = one_step(1, 0.0, 0.0)
    expected = np.stack(
        [ndimage.gaussian_filter(channel, 0.5, mode="nearest", truncate=3.0) for channel in raw]
    )
    np.testing.assert_allclose(one_step(1, 0.0, 0.5), expected, atol=1e-9)
    np.testing.assert_allclose(one_step(1, 0.5, None), expected, atol=1e-9)
    np.testing.assert_allclose(one_step(1, 1.5, 0.5), expected, atol=1e-9)
    np.testing.assert_allclose(one_step(2, 0.0, 0.5), one_step(2, 0.0, 3.0), atol=1e-12)
    assert not np.allclose(one_step(2, 0.5, 0.0), one_step(2, 0.0, 0.0))
    assert GreedySchedule().field_sigma(1) == 0.5 and GreedySchedule().field_sigma(2) == 0.7071
    # A velocity and added updates fold more easily: they keep sigma_field unless told.
    assert GreedySchedule(diffeo=True).field_sigma(1) == 0.7071
    assert GreedySchedule(compositive=False).field_sigma(1) == 0.7071
    assert GreedySchedule(compositive=False, sigma_field_full=0.3).field_sigma(1) == 0.3
    # With a cost-function mask the field in the mask's hole comes from the smoothing.
    assert GreedySchedule().field_sigma(1, masked=True) == 0.7071
    with pytest.raises(VitregError, match="sigma_field_full -1"):
        GreedySchedule(sigma_field_full=-1.0)


@pytest.mark.parametrize("diffeo, compositive", [(False, False), (True, False), (False, True)])
def test_greedy_optimize_recovers_a_known_smooth_field(diffeo, compositive):
    fixed, moving, true_field = _blob_pair()
    schedule = GreedySchedule(
        levels=(2, 1), iterations=(40, 20), window=5, diffeo=diffeo, compositive=compositive
    )
    state = greedy_optimize(fixed, moving, torch.zeros(1, 3, 32, 32, 32), schedule)
    field = schedule.displacement(state)
    inner = (slice(None), slice(None), *[slice(6, -6)] * 3)
    error_before = true_field[inner].norm(dim=1).mean()
    error_after = (field - true_field)[inner].norm(dim=1).mean()
    assert error_after < 0.35 * error_before
    jacdet = jacobian_determinant(field[0].numpy())
    assert (jacdet <= 0).sum() == 0


def test_masked_out_region_moves_only_with_its_surroundings():
    """Where the moving image holds something the fixed one lacks (a bright 'lesion'), the
    field is pulled by it without masks; with a mask excluding it, on the moving side or on
    the fixed side, the field there stays close to the one found without the lesion."""
    fixed, moving, _ = _blob_pair()
    index = torch.stack(torch.meshgrid(*[torch.arange(32.0)] * 3, indexing="ij"))
    distance = (index - torch.tensor([18.0, 14.0, 16.0]).view(3, 1, 1, 1)).norm(dim=0)
    with_lesion = torch.where(distance < 4, torch.full_like(moving, 3.0), moving)
    outside = (distance >= 5.5)[None, None].float()
    schedule = GreedySchedule(levels=(2, 1), iterations=(30, 10), window=5)
    zero = torch.zeros(1, 3, 32, 32, 32)
    clean = greedy_optimize(fixed, moving, zero, schedule)
    near = (distance < 7)[None].expand(1, 3, -1, -1, -1)

    def departure(masks: CostMasks) -> float:
        """The largest |u - u_clean| (voxels) near the lesion."""
        state = greedy_optimize(fixed, with_lesion, zero, schedule, masks=masks)
        return float((state - clean)[near].abs().max())

    pulled = departure(CostMasks())
    assert pulled > 1.0  # the lesion drags the field by more than a voxel (1.40 when written)
    assert departure(CostMasks(moving=outside)) < 0.4 * pulled  # 0.42 when written
    # The fixed mask excludes where the lesion should land, not the lesion itself: weaker.
    assert departure(CostMasks(fixed=outside)) < 0.6 * pulled  # 0.65 when written


def test_schedule_refuses_levels_and_iterations_of_different_lengths():
    with pytest.raises(VitregError, match="same"):
        GreedySchedule(levels=(4, 2), iterations=(10,))
    with pytest.raises(VitregError, match="window"):
        GreedySchedule(window=4)


def test_box_sum_handles_axes_shorter_than_the_window():
    volume = _random((2, 3, 9))
    expected = ndimage.convolve(volume[0, 0].numpy(), np.ones((5, 5, 5)), mode="constant")
    np.testing.assert_allclose(box_sum(volume, 5)[0, 0].numpy(), expected, atol=1e-10)


def test_gaussian_smooth_handles_axes_shorter_than_the_kernel():
    """Against the definition: sum of sampled Gaussian weights times clamped neighbours (scipy
    itself departs from it when an axis is shorter than the kernel's radius)."""
    field = _random((2, 3, 12))
    sigma = 1.732
    radius = int(3 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    expected = field.numpy()
    for axis in (2, 3, 4):
        size = expected.shape[axis]
        expected = sum(
            weight * np.take(expected, np.clip(np.arange(size) + offset, 0, size - 1), axis=axis)
            for weight, offset in zip(weights, offsets, strict=True)
        )
    np.testing.assert_allclose(gaussian_smooth(field, sigma).numpy(), expected, atol=1e-12)
