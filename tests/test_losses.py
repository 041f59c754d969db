"""Tests for vitreg.losses against brute-force references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from vitreg.errors import VitregError
from vitreg.losses import (
    bending_energy,
    box_sum,
    diffusion,
    local_ncc,
    mse,
    mutual_information,
    paper_objective,
    soft_dice,
)


def smooth_image(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> torch.Tensor:
    """A random Gaussian-smoothed (1, 1, *shape) float64 image."""
    rng = np.random.default_rng(seed)
    volume = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return torch.from_numpy(volume)[None, None]


def brute_force_ncc(fixed: np.ndarray, warped: np.ndarray, window: int) -> float:
    """-mean over voxels of the squared correlation in each window, by an explicit loop.

    (D, H, W) float64 arrays. At every voxel, the ``window``^3 box around it (zeros beyond
    the border, as VoxelMorph pads) gives two vectors a and b; with their deviations from
    their own means, cc = (sum a'b')^2 / (sum a'^2 * sum b'^2 + 1e-5). No box sums, no
    expansion of the products: the definition, one window at a time.
    """
    half = window // 2
    padded_f = np.pad(fixed, half)
    padded_w = np.pad(warped, half)
    values = []
    for i, j, k in np.ndindex(fixed.shape):
        a = padded_f[i : i + window, j : j + window, k : k + window].ravel()
        b = padded_w[i : i + window, j : j + window, k : k + window].ravel()
        a, b = a - a.mean(), b - b.mean()
        values.append(np.dot(a, b) ** 2 / (np.dot(a, a) * np.dot(b, b) + 1e-5))
    return -float(np.mean(values))


@pytest.mark.parametrize("shape", [(12, 10, 14), (4, 6, 8)])  # also thinner than the window
def test_box_sum_matches_scipy_uniform_filter(shape) -> None:
    volume = smooth_image(shape, seed=0)
    expected = ndimage.uniform_filter(volume[0, 0].numpy(), size=9, mode="constant") * 9**3
    np.testing.assert_allclose(box_sum(volume, 9)[0, 0].numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("window", [3, 9])
def test_local_ncc_matches_a_loop_over_windows(window) -> None:
    shape = (7, 8, 10)  # thinner than the 9^3 window along every axis: padding matters
    fixed = torch.cat([smooth_image(shape, seed=1, sigma=1.0), smooth_image(shape, seed=2)])
    noise = torch.cat([smooth_image(shape, seed=3, sigma=1.0), smooth_image(shape, seed=4)])
    warped = fixed + 0.5 * noise
    expected = np.mean(
        [brute_force_ncc(fixed[b, 0].numpy(), warped[b, 0].numpy(), window) for b in range(2)]
    )
    assert -0.95 < expected < -0.2  # neither trivially aligned nor unrelated
    got = local_ncc(fixed, warped, window=window)
    assert float(got) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_local_ncc_float32_matches_the_loop() -> None:
    fixed = smooth_image((9, 9, 9), seed=5).float() * 10 + 50
    warped = smooth_image((9, 9, 9), seed=6).float() * 10 + 50
    expected = brute_force_ncc(fixed[0, 0].double().numpy(), warped[0, 0].double().numpy(), 9)
    assert float(local_ncc(fixed, warped)) == pytest.approx(expected, rel=2e-3, abs=1e-4)


def test_local_ncc_of_image_with_itself_is_minus_one() -> None:
    image = smooth_image((20, 20, 20), seed=7, sigma=1.0) * 100
    assert local_ncc(image, image).item() == pytest.approx(-1.0, abs=1e-3)


def test_local_ncc_is_between_minus_one_and_zero() -> None:
    value = local_ncc(smooth_image((16, 16, 16), seed=8), smooth_image((16, 16, 16), seed=9))
    assert -1.0 <= value.item() <= 0.0


def test_local_ncc_rejects_even_window_and_bad_shapes() -> None:
    image = smooth_image((8, 8, 8), seed=10)
    with pytest.raises(VitregError, match="odd"):
        local_ncc(image, image, window=4)
    with pytest.raises(VitregError, match="same shape"):
        local_ncc(image, image[:, :, :4])
    with pytest.raises(VitregError, match=r"5-D tensor \(B, 1, D, H, W\)"):
        local_ncc(image[0], image[0])
    with pytest.raises(VitregError, match="1 channel"):
        local_ncc(image.repeat(1, 2, 1, 1, 1), image.repeat(1, 2, 1, 1, 1))


def test_mse_matches_torch() -> None:
    fixed, warped = smooth_image((6, 7, 8), seed=11), smooth_image((6, 7, 8), seed=12)
    torch.testing.assert_close(mse(fixed, warped), F.mse_loss(warped, fixed))


def test_diffusion_of_constant_field_is_zero() -> None:
    flow = torch.full((2, 3, 5, 6, 7), 1.7)
    assert diffusion(flow).item() == 0.0


def test_diffusion_of_linear_ramp_is_analytic() -> None:
    d, h, w = 5, 6, 7
    grid = torch.meshgrid(
        torch.arange(d, dtype=torch.float64),
        torch.arange(h, dtype=torch.float64),
        torch.arange(w, dtype=torch.float64),
        indexing="ij",
    )
    slopes = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    flow = torch.stack([sum(slopes[c, a] * grid[a] for a in range(3)) for c in range(3)])[None]
    # Forward differences along axis a equal slopes[:, a]; each mean is over channels.
    expected = sum(torch.mean(slopes[:, a] ** 2) for a in range(3)) / 3
    torch.testing.assert_close(diffusion(flow), expected)


def test_diffusion_rejects_wrong_channel_count() -> None:
    with pytest.raises(VitregError, match=r"3 channels \(B, 3, D, H, W\)"):
        diffusion(torch.zeros(1, 2, 4, 4, 4))


def test_soft_dice_of_identical_onehots_is_zero() -> None:
    labels = torch.randint(0, 4, (2, 8, 8, 8))
    onehot = F.one_hot(labels, 4).permute(0, 4, 1, 2, 3).double()
    assert soft_dice(onehot, onehot).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_dice_of_disjoint_onehots_is_one() -> None:
    a = torch.zeros(1, 2, 4, 4, 4)
    a[:, 0, :2] = 1
    a[:, 1, 2:] = 1
    b = a.flip(1)
    assert soft_dice(a, b).item() == pytest.approx(1.0)


def test_soft_dice_rejects_shape_mismatch() -> None:
    with pytest.raises(VitregError, match="same shape"):
        soft_dice(torch.zeros(1, 2, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4))


def test_gradients_flow_through_objective_and_ncc() -> None:
    fixed = smooth_image((10, 10, 10), seed=13).float()
    moving = smooth_image((10, 10, 10), seed=14).float().requires_grad_(True)
    flow = (0.1 * torch.randn(1, 3, 10, 10, 10)).requires_grad_(True)
    loss = paper_objective(fixed, moving, flow) + local_ncc(fixed, moving)
    loss.backward()
    assert moving.grad is not None and torch.isfinite(moving.grad).all()
    assert moving.grad.abs().sum() > 0
    assert flow.grad is not None and flow.grad.abs().sum() > 0


def test_paper_objective_is_mse_plus_weighted_diffusion() -> None:
    fixed, warped = smooth_image((6, 6, 6), seed=15), smooth_image((6, 6, 6), seed=16)
    flow = torch.randn(1, 3, 6, 6, 6, dtype=torch.float64)
    expected = mse(fixed, warped) + 0.5 * diffusion(flow)
    torch.testing.assert_close(paper_objective(fixed, warped, flow, weight=0.5), expected)
    with pytest.raises(VitregError, match="matching fixed"):
        paper_objective(fixed, warped, flow[:, :, :5])


def unit_image(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A smooth (1, 1, *shape) float32 image scaled to [0, 1]."""
    image = smooth_image(shape, seed).float()
    return (image - image.min()) / (image.max() - image.min())


def test_mutual_information_is_lower_for_aligned_images() -> None:
    fixed = unit_image((24, 24, 24), seed=1)
    contrast = 1.0 - fixed**2  # another contrast of the same anatomy: MI sees through it
    shifted = torch.roll(contrast, shifts=4, dims=2)
    aligned, misaligned = mutual_information(fixed, contrast), mutual_information(fixed, shifted)
    assert float(aligned) < float(misaligned) < 0
    entropy_bound = float(np.log(32))
    assert -float(aligned) <= entropy_bound


def test_mutual_information_has_gradients() -> None:
    fixed = unit_image((12, 12, 12), seed=4)
    warped = unit_image((12, 12, 12), seed=5).requires_grad_(True)
    mutual_information(fixed, warped).backward()
    assert warped.grad is not None and torch.isfinite(warped.grad).all()
    assert float(warped.grad.abs().sum()) > 0


def test_bending_energy_is_zero_for_affine_and_analytic_for_quadratic() -> None:
    grid = torch.stack(torch.meshgrid(*[torch.arange(8.0)] * 3, indexing="ij"))[None]
    linear = torch.einsum("ij,bj...->bi...", torch.tensor([[0.1, 0.2, 0.0]] * 3), grid) + 1.5
    assert float(bending_energy(linear)) == pytest.approx(0.0, abs=1e-9)
    quadratic = torch.zeros(1, 3, 8, 8, 8)
    quadratic[:, 0] = 0.5 * grid[:, 0] ** 2  # u_0 = d^2 / 2: second derivative 1 along D
    # Only channel 0 has u_dd = 1, so the mean over the 3 channels is 1/3.
    assert float(bending_energy(quadratic)) == pytest.approx(1 / 3)
    assert float(diffusion(linear)) > 0
