"""Dense-field transforms, cross-checked against scipy and SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from vitreg.errors import VitregError
from vitreg.transform import (
    compose,
    flow_mm_to_vox,
    flow_vox_to_mm,
    identity_grid,
    integrate_velocity,
    ras_to_lps,
    resize_flow,
    sample_labels_linear,
    warp,
    warp_labels,
)

SHAPE = (18, 20, 22)


def smooth_field(shape=SHAPE, amplitude=2.0, seed=0) -> np.ndarray:
    """Random smooth displacement (3, D, H, W) in voxels, float64."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((3, *shape))
    field = np.stack([ndimage.gaussian_filter(c, 3.0) for c in noise])
    return amplitude * field / np.abs(field).max()


def smooth_image(shape=SHAPE, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)


def inside_mask(flow: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Voxels whose sample location p + u(p) lies inside the volume (by ``margin`` voxels)."""
    coords = np.indices(flow.shape[1:]) + flow
    ok = np.ones(flow.shape[1:], dtype=bool)
    for axis, size in enumerate(flow.shape[1:]):
        ok &= (coords[axis] >= margin) & (coords[axis] <= size - 1 - margin)
    return ok


def as_batch(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor[None] if tensor.dim() == 4 else tensor[None, None]


def test_warp_matches_scipy_map_coordinates():
    image, flow = smooth_image(), smooth_field()
    expected = ndimage.map_coordinates(image, np.indices(SHAPE) + flow, order=1, cval=0.0)
    warped = warp(as_batch(image), as_batch(flow))[0, 0].numpy()
    inside = inside_mask(flow)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-10)


def test_warp_matches_simpleitk_displacement_transform():
    image, flow = smooth_image(), smooth_field()
    # SimpleITK indexes arrays as (z, y, x): array axis 0 is ITK's z, and vectors are (x, y, z).
    moving = sitk.GetImageFromArray(image)
    field = sitk.GetImageFromArray(np.moveaxis(flow[::-1], 0, -1).copy(), isVector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    expected = sitk.GetArrayFromImage(
        sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    )
    warped = warp(as_batch(image), as_batch(flow))[0, 0].numpy()
    inside = inside_mask(flow, margin=0.5)
    np.testing.assert_allclose(warped[inside], expected[inside], atol=1e-8)


def test_constant_shift_pulls_next_voxel_and_pads_with_zeros():
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    flow = np.zeros((3, *SHAPE), dtype=np.float32)
    flow[0] = 1.0
    warped = warp(as_batch(image), as_batch(flow))[0, 0].numpy()
    np.testing.assert_allclose(warped[:-1], image[1:], rtol=1e-6)
    assert np.all(warped[-1] == 0)


def test_warp_labels_matches_scipy_nearest_and_keeps_dtype():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 70000, size=SHAPE).astype(np.int64)  # values above 2**16 survive
    flow = smooth_field(amplitude=3.0) + 0.013  # keep sample points off exact half-voxel ties
    expected = ndimage.map_coordinates(labels, np.indices(SHAPE) + flow, order=0, cval=0)
    warped = warp_labels(as_batch(labels), as_batch(flow))
    assert warped.dtype == torch.int64
    inside = inside_mask(flow, margin=0.5)
    np.testing.assert_array_equal(warped[0, 0].numpy()[inside], expected[inside])
    assert np.all(warped[0, 0].numpy()[~inside_mask(flow, margin=-0.51)] == 0)


def scipy_one_hot_linear(labels: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The winning label at ``points`` (3, n) and its margin over the runner-up: each label's
    one-hot image interpolated by scipy (trilinear, zero outside), the share of a sample
    outside the map added to the background; ties to the background, then the smallest."""

    def interpolate(image: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(image, points, order=1, mode="grid-constant", cval=0.0)

    values = [0, *sorted(set(np.unique(labels).tolist()) - {0})]
    weights = [1.0 - interpolate(np.ones(labels.shape)) + interpolate((labels == 0) * 1.0)]
    weights += [interpolate((labels == value) * 1.0) for value in values[1:]]
    weights = np.stack(weights)
    order = np.sort(weights, axis=0)
    return np.asarray(values)[np.argmax(weights, axis=0)], order[-1] - order[-2]


def test_sample_labels_linear_matches_scipy_one_hot_trilinear_argmax():
    rng = np.random.default_rng(3)
    labels = ndimage.median_filter(rng.integers(0, 9, SHAPE), 3) * 7 - 14  # -14 ... 42, 0 too
    points = identity_grid(SHAPE, dtype=torch.float64)[0].numpy() + smooth_field(amplitude=3)
    points[0, :3] -= 4.0  # some samples partly or wholly outside the map
    ours = sample_labels_linear(
        torch.from_numpy(labels), torch.from_numpy(points.astype(np.float32))[None]
    )
    assert ours.dtype == torch.int64
    theirs, margin = scipy_one_hot_linear(labels, points.reshape(3, -1).astype(np.float32))
    theirs, margin = theirs.reshape(SHAPE), margin.reshape(SHAPE)
    clear = margin > 1e-5  # float32 coordinates: near-ties may go either way
    assert clear.mean() > 0.99 and len(np.unique(theirs)) >= 6
    np.testing.assert_array_equal(ours.numpy()[clear], theirs[clear])


def test_sample_labels_linear_breaks_ties_for_the_background_then_the_smallest_label():
    labels = torch.tensor([[[5, 3, 0, -2]]])  # (1, 1, 4): points halfway between neighbours
    points = torch.tensor([[[[0.5, 1.5, 2.5, 3.5]]]], dtype=torch.float32)
    coords = torch.cat([torch.zeros_like(points), torch.zeros_like(points), points])[None]
    assert sample_labels_linear(labels, coords)[0, 0].tolist() == [3, 0, 0, 0]


def test_integrating_zero_velocity_gives_zero_and_constant_velocity_is_exact_inside():
    zero = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    assert torch.count_nonzero(integrate_velocity(zero)) == 0
    constant = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    constant[:, 1] = 1.5
    flow = integrate_velocity(constant, steps=7)
    # A constant velocity integrates to the same translation away from the zero-padded edge.
    np.testing.assert_allclose(flow[0, 1, :, :14].numpy(), 1.5, atol=1e-10)


def test_integrated_velocity_and_its_negation_are_inverse():
    velocity = as_batch(smooth_field(amplitude=2.0))
    forward = integrate_velocity(velocity)
    backward = integrate_velocity(-velocity)
    round_trip = compose(forward, backward)
    interior = (slice(None), slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    assert round_trip[interior].abs().max() < 0.05
    assert forward[interior].abs().max() > 0.5


def test_compose_equals_two_successive_warps():
    image = as_batch(smooth_image())
    outer, inner = as_batch(smooth_field(seed=4)), as_batch(smooth_field(seed=5))
    one_step = warp(image, compose(outer, inner))
    two_steps = warp(warp(image, outer), inner)
    interior = (0, 0, slice(5, -5), slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(one_step[interior], two_steps[interior], atol=0.02)


def test_compose_with_zero_is_identity():
    flow = as_batch(smooth_field())
    zero = torch.zeros_like(flow)
    torch.testing.assert_close(compose(flow, zero), flow)
    torch.testing.assert_close(compose(zero, flow), flow)


def test_resize_flow_scales_displacements_and_keeps_a_linear_map():
    # u(x) = 0.1 * x along axis 0 is linear, so trilinear resizing reproduces it exactly.
    grid = identity_grid(SHAPE, dtype=torch.float64)
    flow = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    flow[:, 0] = 0.1 * grid[:, 0]
    new_shape = (35, 39, 43)
    resized = resize_flow(flow, new_shape)
    new_grid = identity_grid(new_shape, dtype=torch.float64)
    # In new voxels the same physical map is u'(y) = 0.1 * y.
    torch.testing.assert_close(resized[:, 0], 0.1 * new_grid[:, 0])
    assert torch.count_nonzero(resized[:, 1:]) == 0


def test_vox_mm_round_trip_and_affine_scaling():
    affine = np.array([[0, 0, -1.5, 90], [2.0, 0, 0, -100], [0, 1.2, 0, -60], [0, 0, 0, 1]])
    flow = as_batch(smooth_field())
    flow_mm = flow_vox_to_mm(flow, affine)
    torch.testing.assert_close(flow_mm[:, 0], -1.5 * flow[:, 2])
    torch.testing.assert_close(flow_mm[:, 1], 2.0 * flow[:, 0])
    torch.testing.assert_close(flow_mm_to_vox(flow_mm, affine), flow)


def test_ras_to_lps_flips_x_and_y():
    disp = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1, 1)
    assert ras_to_lps(disp).flatten().tolist() == [-1.0, -2.0, 3.0]


def test_wrong_ranks_and_channels_say_what_was_expected():
    with pytest.raises(VitregError, match=r"\(B, C, D, H, W\)"):
        warp(torch.zeros(4, 4, 4), torch.zeros(1, 3, 4, 4, 4))
    with pytest.raises(VitregError, match="3 channel"):
        warp(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))
