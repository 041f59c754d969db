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


def reference_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int) -> torch.Tensor:
    """VoxelMorph NCC written with one conv3d and a full ones window^3 kernel."""
    kernel = torch.ones(1, 1, window, window, window, dtype=fixed.dtype)
    pad = window // 2

    def window_sum(volume: torch.Tensor) -> torch.Tensor:
        return F.conv3d(volume, kernel, padding=pad)

    n = window**3
    sum_i, sum_j = window_sum(fixed), window_sum(warped)
    sum_i2, sum_j2 = window_sum(fixed * fixed), window_sum(warped * warped)
    sum_ij = window_sum(fixed * warped)
    mean_i, mean_j = sum_i / n, sum_j / n
    cross = sum_ij - mean_j * sum_i - mean_i * sum_j + mean_i * mean_j * n
    var_i = sum_i2 - 2 * mean_i * sum_i + mean_i * mean_i * n
    var_j = sum_j2 - 2 * mean_j * sum_j + mean_j * mean_j * n
    return -torch.mean(cross * cross / (var_i * var_j + 1e-5))


@pytest.mark.parametrize("shape", [(12, 10, 14), (4, 6, 8)])  # also thinner than the window
def test_box_sum_matches_scipy_uniform_filter(shape) -> None:
    volume = smooth_image(shape, seed=0)
    expected = ndimage.uniform_filter(volume[0, 0].numpy(), size=9, mode="constant") * 9**3
    np.testing.assert_allclose(box_sum(volume, 9)[0, 0].numpy(), expected, atol=1e-10)


def test_local_ncc_matches_full_kernel_reference() -> None:
    fixed = torch.cat([smooth_image((14, 12, 16), seed=1), smooth_image((14, 12, 16), seed=2)])
    warped = fixed + 0.3 * torch.cat(
        [smooth_image((14, 12, 16), seed=3), smooth_image((14, 12, 16), seed=4)]
    )
    for window in (3, 9):
        got = local_ncc(fixed, warped, window=window)
        expected = reference_ncc(fixed, warped, window)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_local_ncc_float32_matches_reference() -> None:
    fixed = smooth_image((16, 16, 16), seed=5).float() * 10 + 50
    warped = smooth_image((16, 16, 16), seed=6).float() * 10 + 50
    torch.testing.assert_close(
        local_ncc(fixed, warped), reference_ncc(fixed, warped, 9), rtol=1e-3, atol=1e-4
    )


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
