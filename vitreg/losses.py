"""Differentiable training losses: image similarity, flow smoothness and soft Dice (torch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vitreg.errors import OptionError, VitregError

NCC_STABILISER = 1e-5


def _require_rank5(tensor: torch.Tensor, name: str, layout: str) -> None:
    """Raise VitregError unless ``tensor`` is 5-D; ``layout`` names the expected axes."""
    if tensor.dim() != 5:
        raise VitregError(f"{name} must be a 5-D tensor {layout}, got shape {tuple(tensor.shape)}")


def _require_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Raise VitregError unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise VitregError(
            f"{name_a} and {name_b} must have the same shape, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _require_images(fixed: torch.Tensor, warped: torch.Tensor) -> None:
    """Raise VitregError unless both are (B, 1, D, H, W) tensors of the same shape."""
    _require_rank5(fixed, "fixed", "(B, 1, D, H, W)")
    _require_rank5(warped, "warped", "(B, 1, D, H, W)")
    if fixed.shape[1] != 1:
        raise VitregError(
            f"fixed must have 1 channel (B, 1, D, H, W), got shape {tuple(fixed.shape)}"
        )
    _require_same_shape(fixed, warped, "fixed", "warped")


def _require_flow(flow_vox: torch.Tensor) -> None:
    """Raise VitregError unless ``flow_vox`` is (B, 3, D, H, W) with every spatial size >= 2."""
    _require_rank5(flow_vox, "flow_vox", "(B, 3, D, H, W)")
    if flow_vox.shape[1] != 3:
        raise VitregError(
            f"flow_vox must have 3 channels (B, 3, D, H, W), got shape {tuple(flow_vox.shape)}"
        )
    if min(flow_vox.shape[2:]) < 2:
        raise VitregError(
            f"flow_vox needs at least 2 voxels along each spatial axis, "
            f"got shape {tuple(flow_vox.shape)}"
        )


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over all elements of (B, 1, D, H, W) images; scalar."""
    _require_images(fixed, warped)
    return torch.mean((fixed - warped) ** 2)


def box_sum(volume: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a ``window``^3 box at every voxel of (N, C, D, H, W), zero padding, same shape.

    Three separable 1-D box averages (zeros counted) rescaled by ``window``^3; equal to conv3d
    with a ones ``window``^3 kernel and padding ``window // 2`` (``window`` must be odd).
    """
    half = window // 2
    # Zero padding by F.pad, not avg_pool3d's own: that one refuses inputs thinner than the
    # window (a 1/4-resolution level of a small frame) although the padded input is not.
    averaged = F.pad(volume, (half,) * 6)
    for kernel in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        averaged = F.avg_pool3d(averaged, kernel, stride=1)
    return averaged * float(window**3)


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Negative mean squared local NCC (VoxelMorph NCC) of (B, 1, D, H, W) images, in [-1, 0].

    The mean over voxels of :func:`local_ncc_map`.
    """
    return -torch.mean(local_ncc_map(fixed, warped, window))


def local_ncc_map(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9) -> torch.Tensor:
    """Squared local NCC at every voxel of (B, 1, D, H, W) images: (B, 1, D, H, W) in [0, 1].

    Window sums over a ``window``^3 box with zero padding ``window // 2``; per voxel
    cc = cross^2 / (var_fixed * var_warped + 1e-5) with sums (not means) as in VoxelMorph.
    """
    _require_images(fixed, warped)
    if window < 1 or window % 2 == 0:
        raise VitregError(f"local_ncc window must be a positive odd integer, got {window}")
    n_voxels = float(window**3)
    stacked = torch.cat([fixed, warped, fixed * fixed, warped * warped, fixed * warped], dim=1)
    sum_i, sum_j, sum_i2, sum_j2, sum_ij = box_sum(stacked, window).unbind(dim=1)
    mean_i = sum_i / n_voxels
    mean_j = sum_j / n_voxels
    cross = sum_ij - mean_j * sum_i - mean_i * sum_j + mean_i * mean_j * n_voxels
    var_i = sum_i2 - 2 * mean_i * sum_i + mean_i * mean_i * n_voxels
    var_j = sum_j2 - 2 * mean_j * sum_j + mean_j * mean_j * n_voxels
    return (cross * cross / (var_i * var_j + NCC_STABILISER)).unsqueeze(1)


def diffusion(flow_vox: torch.Tensor) -> torch.Tensor:
    """ViT-V-Net Grad3d 'l2' smoothness of a (B, 3, D, H, W) voxel flow; scalar, voxels^2.

    (mean(dD^2) + mean(dH^2) + mean(dW^2)) / 3 with forward differences along D, H, W.
    """
    _require_flow(flow_vox)
    diff_d = flow_vox[:, :, 1:, :, :] - flow_vox[:, :, :-1, :, :]
    diff_h = flow_vox[:, :, :, 1:, :] - flow_vox[:, :, :, :-1, :]
    diff_w = flow_vox[:, :, :, :, 1:] - flow_vox[:, :, :, :, :-1]
    return (torch.mean(diff_d**2) + torch.mean(diff_h**2) + torch.mean(diff_w**2)) / 3.0


def bending_energy(flow_vox: torch.Tensor) -> torch.Tensor:
    """Bending energy of a (B, 3, D, H, W) voxel flow; scalar, voxels^2 / voxel^4.

    mean over voxels and channels of the squared second derivatives, pure ones once and mixed
    ones twice (u_dd^2 + u_hh^2 + u_ww^2 + 2 (u_dh^2 + u_dw^2 + u_hw^2)), by finite
    differences (second differences for pure, forward-of-forward for mixed). Affine maps cost 0.
    """
    _require_flow(flow_vox)
    if min(flow_vox.shape[2:]) < 3:
        raise VitregError(
            f"bending energy needs 3 voxels along each axis, got {tuple(flow_vox.shape)}"
        )
    energy = flow_vox.new_zeros(())
    firsts = [torch.diff(flow_vox, dim=axis) for axis in (2, 3, 4)]
    for axis in (2, 3, 4):
        energy = energy + torch.mean(torch.diff(firsts[axis - 2], dim=axis) ** 2)
    for first_axis, second_axis in ((2, 3), (2, 4), (3, 4)):
        mixed = torch.diff(firsts[first_axis - 2], dim=second_axis)
        energy = energy + 2.0 * torch.mean(mixed**2)
    return energy


def mutual_information(
    fixed: torch.Tensor, warped: torch.Tensor, bins: int = 32, max_voxels: int = 1 << 18
) -> torch.Tensor:
    """Negative mutual information (nats) of (B, 1, D, H, W) images with values in [0, 1].

    Parzen-window joint histogram: every voxel spreads over ``bins`` bin centres in [0, 1] with
    Gaussian weights (sigma = half a bin width), normalised per voxel, so the loss is
    differentiable in ``warped``. At most ``max_voxels`` voxels per image (a regular stride)
    enter the histogram. Values outside [0, 1] are clipped. Scalar; lower is better.
    """
    _require_images(fixed, warped)
    if bins < 2:
        raise VitregError(f"mutual information needs at least 2 bins, got {bins}")
    batch = fixed.shape[0]
    fixed_flat, warped_flat = fixed.reshape(batch, -1), warped.reshape(batch, -1)
    stride = max(1, -(-fixed_flat.shape[1] // max_voxels))
    fixed_flat, warped_flat = fixed_flat[:, ::stride], warped_flat[:, ::stride]
    centres = torch.linspace(0.0, 1.0, bins, device=fixed.device, dtype=fixed.dtype)
    sigma = 0.5 / (bins - 1)

    def parzen(values: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B, N, bins)
        weights = torch.exp(-0.5 * ((values.clamp(0, 1)[..., None] - centres) / sigma) ** 2)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-12)

    joint = parzen(fixed_flat).transpose(1, 2) @ parzen(warped_flat) / fixed_flat.shape[1]
    marginal_fixed = joint.sum(dim=2, keepdim=True)
    marginal_warped = joint.sum(dim=1, keepdim=True)
    ratio = joint / (marginal_fixed * marginal_warped + 1e-12)
    information = torch.sum(joint * torch.log(ratio + 1e-12), dim=(1, 2))
    return -torch.mean(information)


def soft_dice(
    fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """Soft Dice loss of (B, K, D, H, W) class probabilities; scalar in [0, 1].

    loss = 1 - mean_{b,k} [2 * sum_v(a*b) / (sum_v(a) + sum_v(b) + eps)], sums over voxels v;
    a class empty in both inputs scores 0 for its (b, k) pair.
    """
    _require_rank5(fixed_onehot, "fixed_onehot", "(B, K, D, H, W)")
    _require_rank5(warped_onehot, "warped_onehot", "(B, K, D, H, W)")
    _require_same_shape(fixed_onehot, warped_onehot, "fixed_onehot", "warped_onehot")
    spatial = (2, 3, 4)
    overlap = torch.sum(fixed_onehot * warped_onehot, dim=spatial)
    total = torch.sum(fixed_onehot, dim=spatial) + torch.sum(warped_onehot, dim=spatial)
    return 1.0 - torch.mean(2.0 * overlap / (total + eps))


def paper_objective(
    fixed: torch.Tensor, warped: torch.Tensor, flow_vox: torch.Tensor, weight: float = 0.02
) -> torch.Tensor:
    """ViT-V-Net objective mse(fixed, warped) + weight * diffusion(flow_vox); scalar.

    Images (B, 1, D, H, W), flow (B, 3, D, H, W) in voxels on the same grid.
    """
    _require_images(fixed, warped)
    _require_flow(flow_vox)
    if flow_vox.shape[0] != fixed.shape[0] or flow_vox.shape[2:] != fixed.shape[2:]:
        raise VitregError(
            f"flow_vox must be (B, 3, D, H, W) matching fixed {tuple(fixed.shape)}, "
            f"got {tuple(flow_vox.shape)}"
        )
    if weight < 0:
        raise VitregError(f"regularisation weight must be >= 0, got {weight}")
    return mse(fixed, warped) + weight * diffusion(flow_vox)


Similarity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SIMILARITIES: dict[str, Similarity] = {"ncc": local_ncc, "mse": mse, "mi": mutual_information}
REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "diffusion": diffusion,
    "bending": bending_energy,
}


def similarity_function(name: str) -> Similarity:
    """The image similarity loss called ``name``: 'ncc' (local 9^3), 'mse' or 'mi'."""
    if name not in SIMILARITIES:
        raise OptionError("similarity", name, f"expected one of {', '.join(SIMILARITIES)}")
    return SIMILARITIES[name]


def regularizer_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The flow penalty called ``name``: 'diffusion' or 'bending' (energy)."""
    if name not in REGULARIZERS:
        raise OptionError("regularizer", name, f"expected one of {', '.join(REGULARIZERS)}")
    return REGULARIZERS[name]
