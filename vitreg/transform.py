"""Dense displacement fields: pull-warping, integration, composition, resizing, voxel <-> mm.

Conventions (the official ViT-V-Net / VoxelMorph ones):
- ``flow_vox`` is (B, 3, D, H, W): displacement in voxels, channel i along array axis i
  (tensor axis i + 2).
- Warping pulls: ``warped(p) = moving(p + u(p))`` with ``u`` defined on the fixed grid.
- Voxel centres are sample points and the corner voxels map to -1 and +1 of grid_sample
  (``align_corners=True``); points outside the volume read zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vitreg.errors import VitregError


def _check_volume(name: str, tensor: torch.Tensor, channels: int | None = None) -> None:
    """Raise VitregError unless ``tensor`` is (B, C, D, H, W) with ``channels`` channels."""
    if tensor.dim() != 5:
        raise VitregError(
            f"{name}: expected a 5-D tensor (B, C, D, H, W), got shape {tuple(tensor.shape)}"
        )
    if channels is not None and tensor.shape[1] != channels:
        raise VitregError(
            f"{name}: expected {channels} channel(s) in (B, C, D, H, W), "
            f"got shape {tuple(tensor.shape)}"
        )


def identity_grid(
    shape: Sequence[int], device: torch.device | str | None = None, dtype=torch.float32
) -> torch.Tensor:
    """Voxel coordinates of every voxel: (1, 3, D, H, W), channel i = index along axis i."""
    axes = [torch.arange(int(n), device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def _normalised_locations(coords_vox: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(B, 3, d, h, w) voxel coordinates -> (B, d, h, w, 3) grid_sample locations (x = W first)."""
    scale = torch.tensor(
        [2.0 / max(int(n) - 1, 1) for n in shape], device=coords_vox.device, dtype=coords_vox.dtype
    ).view(1, 3, 1, 1, 1)
    locations = coords_vox * scale - 1.0
    # grid_sample wants the last array axis first.
    return locations.permute(0, 2, 3, 4, 1).flip(-1)


def sample(
    image: torch.Tensor, coords_vox: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """Read ``image`` (B, C, D, H, W) at ``coords_vox`` (B, 3, d, h, w) voxel coordinates.

    ``mode`` is 'bilinear' (trilinear) or 'nearest'; ``padding`` is a grid_sample padding mode.
    Returns (B, C, d, h, w).
    """
    _check_volume("image", image)
    _check_volume("coordinates", coords_vox, channels=3)
    locations = _normalised_locations(coords_vox.to(image.dtype), image.shape[2:])
    if locations.shape[0] != image.shape[0]:
        locations = locations.expand(image.shape[0], *locations.shape[1:])
    return F.grid_sample(image, locations, mode=mode, padding_mode=padding, align_corners=True)


def warp(
    image: torch.Tensor, flow_vox: torch.Tensor, mode: str = "bilinear", padding: str = "zeros"
) -> torch.Tensor:
    """Pull-warp ``image`` (B, C, D, H, W) with ``flow_vox`` (B, 3, D, H, W) voxels.

    Returns ``image(p + u(p))`` on the flow's grid, (B, C, D, H, W).
    """
    _check_volume("flow", flow_vox, channels=3)
    grid = identity_grid(flow_vox.shape[2:], flow_vox.device, flow_vox.dtype)
    return sample(image, grid + flow_vox, mode=mode, padding=padding)


def sample_labels(labels: torch.Tensor, coords_vox: torch.Tensor) -> torch.Tensor:
    """Exact nearest-neighbour read of a label map (B, C, D, H, W) at (B, 3, d, h, w) voxels.

    Coordinates are rounded (half to even, as grid_sample's nearest) and values gathered, so
    labels of any size and dtype survive; points outside the volume read 0.
    """
    _check_volume("labels", labels)
    _check_volume("coordinates", coords_vox, channels=3)
    shape = labels.shape[2:]
    index = torch.round(coords_vox).long()  # (B, 3, d, h, w)
    inside = torch.ones_like(index[:, 0], dtype=torch.bool)
    for axis, size in enumerate(shape):
        inside &= (index[:, axis] >= 0) & (index[:, axis] < size)
        index[:, axis].clamp_(0, size - 1)
    flat = (index[:, 0] * shape[1] + index[:, 1]) * shape[2] + index[:, 2]  # (B, d, h, w)
    batch, channels = labels.shape[:2]
    source = labels.reshape(batch, channels, -1)
    flat = flat.reshape(flat.shape[0], 1, -1).expand(batch, channels, -1)
    values = torch.gather(source, 2, flat).reshape(batch, channels, *coords_vox.shape[2:])
    return torch.where(inside.unsqueeze(1), values, torch.zeros_like(values))


CORNERS = tuple((i, j, k) for i in (0, 1) for j in (0, 1) for k in (0, 1))
"""The 8 voxels around a sample point, as offsets from the lower one."""
LABEL_CHUNK = 1 << 17
"""Sample points voted on at once by :func:`sample_labels_linear` (about 300 bytes of work
each: 40 MiB)."""


def sample_labels_linear(labels: torch.Tensor, coords_vox: torch.Tensor) -> torch.Tensor:
    """Read a label map (D, H, W) at (1, 3, d, h, w) voxel coordinates by one-hot trilinear
    interpolation and argmax: (d, h, w), the dtype and label values kept.

    Label L's weight at a point is the trilinear interpolation of L's one-hot image there,
    i.e. the summed trilinear weights of those of the 8 surrounding voxels that hold L; a
    voxel outside the map holds the background 0. Only the (at most 8) labels around a point
    can win, so time and memory do not grow with the number of labels: the points are voted
    on in chunks of :data:`LABEL_CHUNK`. The largest weight wins; a tie goes to the
    background, else to the smallest label.
    """
    if labels.dim() != 3:
        raise VitregError(f"labels: expected (D, H, W), got shape {tuple(labels.shape)}")
    _check_volume("coordinates", coords_vox, channels=3)
    points = coords_vox[0].reshape(3, -1)
    result = torch.empty(points.shape[1], dtype=labels.dtype, device=labels.device)
    for start in range(0, points.shape[1], LABEL_CHUNK):
        chunk = points[:, start : start + LABEL_CHUNK].to(labels.device, torch.float64)
        result[start : start + LABEL_CHUNK] = _vote(labels, chunk)
    return result.reshape(coords_vox.shape[2:])


def _vote(labels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The winning label at each of ``points`` (3, n) voxel coordinates of ``labels``."""
    shape = labels.shape
    lower = torch.floor(points)
    upper_share = (points - lower).float()  # (3, n): trilinear weight of the upper voxel
    lower = lower.long()
    flat_labels = labels.reshape(-1)
    corner_labels, corner_weights = [], []
    for corner in CORNERS:
        index = lower + torch.tensor(corner, device=labels.device).view(3, 1)
        inside = torch.ones(points.shape[1], dtype=torch.bool, device=labels.device)
        weight = torch.ones(points.shape[1], device=labels.device)
        for axis, size in enumerate(shape):
            inside &= (index[axis] >= 0) & (index[axis] < size)
            index[axis].clamp_(0, size - 1)
            share = upper_share[axis] if corner[axis] else 1 - upper_share[axis]
            weight = weight * share
        flat = (index[0] * shape[1] + index[1]) * shape[2] + index[2]
        value = flat_labels[flat]
        corner_labels.append(torch.where(inside, value, torch.zeros_like(value)))
        corner_weights.append(weight)
    held = torch.stack(corner_labels)  # (8, n)
    weights = torch.stack(corner_weights)  # (8, n)
    # The weight of the label each corner holds: the same sum, bit for bit, for equal labels.
    score = torch.zeros_like(weights)
    for other in range(len(CORNERS)):
        score += weights[other] * (held == held[other])
    best = score.max(dim=0).values
    # Among the corners whose label reaches the best weight: background first, then the
    # smallest label.
    rank = torch.where(held == 0, torch.iinfo(torch.int64).min, held.long())
    rank = torch.where(score == best, rank, torch.iinfo(torch.int64).max)
    return held.gather(0, rank.argmin(dim=0, keepdim=True))[0]


def warp_labels(labels: torch.Tensor, flow_vox: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour pull-warp of a label map (B, C, D, H, W) with ``flow_vox`` voxels.

    Keeps the dtype and the label values exactly (see :func:`sample_labels`).
    """
    _check_volume("flow", flow_vox, channels=3)
    grid = identity_grid(flow_vox.shape[2:], flow_vox.device, flow_vox.dtype)
    return sample_labels(labels, grid + flow_vox)


def compose(outer_vox: torch.Tensor, inner_vox: torch.Tensor) -> torch.Tensor:
    """Displacement of ``x -> phi_outer(phi_inner(x))`` (B, 3, D, H, W) voxels.

    ``u(x) = u_inner(x) + u_outer(x + u_inner(x))``: warping an image with the result equals
    warping it with ``outer_vox`` and then warping that with ``inner_vox``.
    """
    return inner_vox + warp(outer_vox, inner_vox, mode="bilinear", padding="border")


def integrate_velocity(velocity_vox: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring of a stationary velocity field (B, 3, D, H, W) voxels.

    ``v / 2**steps`` is composed with itself ``steps`` times (zero padding, as VoxelMorph's
    VecInt). Returns the displacement (B, 3, D, H, W) in voxels.
    """
    _check_volume("velocity", velocity_vox, channels=3)
    if steps < 0:
        raise VitregError(f"integration steps must be >= 0, got {steps}")
    flow = velocity_vox / (2**steps)
    for _ in range(steps):
        flow = flow + warp(flow, flow)
    return flow


def displacement_from_output(output_vox: torch.Tensor, velocity: bool, steps: int = 7):
    """A network's output (B, 3, D, H, W) voxels as a displacement (B, 3, D, H, W) voxels.

    With ``velocity`` the output is a stationary velocity field and is integrated by scaling
    and squaring (``steps``); otherwise it already is the displacement. Training and
    registration both call this, so a checkpoint's output is read the same way everywhere.
    """
    return integrate_velocity(output_vox, steps) if velocity else output_vox


def resize_flow(
    flow_vox: torch.Tensor, shape: Sequence[int], align_corners: bool = True
) -> torch.Tensor:
    """Resample ``flow_vox`` (B, 3, D, H, W) onto a grid of ``shape`` spanning the same extent.

    Trilinear. With ``align_corners`` the corner voxel centres coincide and displacements are
    scaled per axis by (new - 1) / (old - 1); without, the voxel edges coincide (the geometry
    of average pooling) and the scale is new / old. Displacements stay in voxels of the grid.
    """
    _check_volume("flow", flow_vox, channels=3)
    shape = tuple(int(n) for n in shape)
    old = flow_vox.shape[2:]
    resized = F.interpolate(flow_vox, size=shape, mode="trilinear", align_corners=align_corners)
    if align_corners:
        factors = [(new - 1) / max(before - 1, 1) for new, before in zip(shape, old, strict=True)]
    else:
        factors = [new / before for new, before in zip(shape, old, strict=True)]
    scale = torch.tensor(factors, device=flow_vox.device, dtype=flow_vox.dtype)
    return resized * scale.view(1, 3, 1, 1, 1)


def flow_vox_to_mm(flow_vox: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """Voxel displacements (B, 3, D, H, W) -> world displacements (B, 3, D, H, W) in mm.

    ``affine`` is the grid's 4x4 voxel-to-world matrix (nibabel: RAS+ mm), so the result is in
    the affine's world axes (RAS for NIfTI); only its 3x3 linear part matters.
    """
    _check_volume("flow", flow_vox, channels=3)
    linear = torch.as_tensor(np.asarray(affine)[:3, :3], dtype=flow_vox.dtype)
    return torch.einsum("ij,bj...->bi...", linear.to(flow_vox.device), flow_vox)


def flow_mm_to_vox(flow_mm: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """World displacements (B, 3, D, H, W) in mm -> voxel displacements for ``affine``'s grid."""
    _check_volume("flow", flow_mm, channels=3)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    linear = torch.as_tensor(inverse, dtype=flow_mm.dtype)
    return torch.einsum("ij,bj...->bi...", linear.to(flow_mm.device), flow_mm)


def ras_to_lps(disp_ras: torch.Tensor) -> torch.Tensor:
    """Flip the first two components of (B, 3, ...) vectors: RAS mm <-> LPS mm (ITK, ANTs)."""
    sign = torch.tensor([-1.0, -1.0, 1.0], dtype=disp_ras.dtype, device=disp_ras.device)
    return disp_ras * sign.view(1, 3, *([1] * (disp_ras.dim() - 2)))
