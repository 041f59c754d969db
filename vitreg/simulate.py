"""Random smooth deformations and intensity changes, for benchmark sets and training data.

Every function is device-agnostic and draws its random numbers from an optional
``torch.Generator`` (the global generator when None): the numbers are drawn on the
generator's device and then moved to ``device``, so a seeded CPU generator gives the same
deformation on the CPU and on a GPU. Fields are (B, 3, D, H, W) displacements in voxels
(channel i along array axis i, the ``vitreg.transform`` convention); images (B, 1, D, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vitreg.errors import VitregError
from vitreg.transform import integrate_velocity

DEFAULT_SCALES = (64.0, 32.0, 16.0)


def random_normal(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """Standard normal numbers drawn on the generator's device (the CPU for the global
    generator), returned on ``device``: a seeded CPU generator gives the same numbers for any
    device."""
    source = generator.device if generator is not None else "cpu"
    return torch.randn(tuple(shape), generator=generator, device=source).to(device)


def random_uniform(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Uniform numbers in [low, high), drawn as :func:`random_normal` draws."""
    source = generator.device if generator is not None else "cpu"
    values = torch.rand(tuple(shape), generator=generator, device=source)
    return (values * (high - low) + low).to(device)


def smooth_noise(
    shape: Sequence[int],
    spacing_vox: float,
    channels: int = 1,
    batch: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Smooth random field with unit standard deviation and features ``spacing_vox`` apart.

    White noise on a control grid of half the spacing is blurred (binomial 3-tap filter)
    and upsampled trilinearly to ``shape``. Returns (batch, channels, D, H, W), unitless.
    """
    if spacing_vox <= 0:
        raise VitregError(f"noise spacing must be > 0 voxels, got {spacing_vox}")
    coarse = [max(2, math.ceil(2 * int(n) / spacing_vox) + 1) for n in shape]
    noise = random_normal((batch * channels, 1, *coarse), generator, device)
    taps = torch.tensor([0.25, 0.5, 0.25], device=noise.device)
    for axis in range(3):
        kernel_shape = [1, 1, 1, 1, 1]
        kernel_shape[2 + axis] = 3
        padding = [0, 0, 0]
        padding[axis] = 1
        noise = F.conv3d(noise, taps.view(kernel_shape), padding=padding)
    noise = noise.view(batch, channels, *coarse)
    field = F.interpolate(noise, size=tuple(int(n) for n in shape), mode="trilinear")
    spread = field.flatten(2).std(dim=2).clamp(min=1e-8)
    return field / spread.view(batch, channels, 1, 1, 1)


def random_velocity(
    shape: Sequence[int],
    scales_vox: Sequence[float] = DEFAULT_SCALES,
    batch: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Sum of smooth random velocity fields at several scales: (batch, 3, D, H, W) voxels.

    The scale of ``scales_vox[k]`` voxels gets an amplitude proportional to it, so coarse
    scales carry most of the displacement and fine scales add local detail. The overall
    amplitude is arbitrary; :func:`random_deformation` scales it.
    """
    largest = max(scales_vox)
    velocity = torch.zeros(batch, 3, *shape, device=device)
    for scale in scales_vox:
        noise = smooth_noise(shape, scale, 3, batch, generator, device)
        velocity = velocity + (scale / largest) * noise
    return velocity


def max_displacement(flow_vox: torch.Tensor, spacing: Sequence[float] = (1, 1, 1)) -> torch.Tensor:
    """Largest displacement length per batch item of (B, 3, D, H, W) voxels, in mm: (B,)."""
    step = torch.as_tensor(spacing, dtype=flow_vox.dtype, device=flow_vox.device)
    return (flow_vox * step.view(1, 3, 1, 1, 1)).norm(dim=1).flatten(1).amax(dim=1)


def random_deformation(
    shape: Sequence[int],
    max_displacement_mm: float = 10.0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    scales_mm: Sequence[float] = DEFAULT_SCALES,
    batch: int = 1,
    steps: int = 7,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A random diffeomorphic pull displacement (batch, 3, D, H, W) in voxels.

    A multi-scale stationary velocity field (features ``scales_mm`` apart) is integrated by
    scaling and squaring; the velocity is rescaled twice so the longest displacement of each
    batch item comes within a few percent of ``max_displacement_mm`` (``spacing``: mm per
    voxel along the array axes). Warping with the result pulls: ``out(p) = image(p + u(p))``.
    """
    if max_displacement_mm < 0:
        raise VitregError(f"maximum displacement must be >= 0 mm, got {max_displacement_mm}")
    voxel = min(float(s) for s in spacing)
    velocity = random_velocity(
        shape, [s / voxel for s in scales_mm], batch, generator, device
    ) / torch.as_tensor(spacing, device=device, dtype=torch.float32).view(1, 3, 1, 1, 1)
    flow = integrate_velocity(velocity, steps)
    # Displacement grows almost linearly with the velocity for smooth fields: two corrections.
    for _ in range(2):
        reached = max_displacement(flow, spacing).clamp(min=1e-8)
        velocity = velocity * (max_displacement_mm / reached).view(batch, 1, 1, 1, 1)
        flow = integrate_velocity(velocity, steps)
    return flow


def bias_field(
    shape: Sequence[int],
    strength: float = 0.3,
    spacing_vox: float = 64.0,
    batch: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Smooth multiplicative bias ``exp(strength * s * n)``: (batch, 1, D, H, W), unitless.

    ``n`` is unit smooth noise with features ``spacing_vox`` apart and ``s`` uniform in
    [0, 1) per batch item, so intensity varies by up to about ``exp(+-2 strength)``.
    """
    noise = smooth_noise(shape, spacing_vox, 1, batch, generator, device)
    amount = strength * random_uniform((batch, 1, 1, 1, 1), generator, device)
    return torch.exp(amount * noise)


def random_gamma(
    image: torch.Tensor, log_std: float = 0.25, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``max * (image / max) ** exp(g)`` with g ~ N(0, log_std) per batch item.

    ``image`` is (B, 1, D, H, W) with non-negative intensities; same shape and units out.
    """
    peak = image.flatten(1).amax(dim=1).clamp(min=1e-8).view(-1, 1, 1, 1, 1)
    gamma = torch.exp(
        log_std * random_normal((image.shape[0], 1, 1, 1, 1), generator, image.device)
    )
    return peak * (image.clamp(min=0) / peak) ** gamma


def random_contrast(
    image: torch.Tensor,
    knots: int = 4,
    spread: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random monotonic piecewise-linear remapping of intensities (changes tissue contrast).

    Intensities of (B, 1, D, H, W) ``image`` are normalised to [0, 1] by each item's maximum;
    the curve has ``knots`` equal segments whose slopes are ``exp(spread * N(0, 1))``, is
    rescaled to end at 1 (0 stays 0), and the result is mapped back to the item's range.
    """
    batch = image.shape[0]
    peak = image.flatten(1).amax(dim=1).clamp(min=1e-8).view(-1, 1, 1, 1, 1)
    slopes = torch.exp(spread * random_normal((batch, knots), generator, image.device))
    ends = torch.cumsum(slopes, dim=1)
    ends = torch.cat([torch.zeros(batch, 1, device=image.device), ends / ends[:, -1:]], dim=1)
    position = (image.clamp(min=0) / peak).clamp(max=1) * knots
    segment = position.floor().clamp(max=knots - 1).long()
    fraction = position - segment
    flat = segment.flatten(1)
    start = torch.gather(ends, 1, flat).view_as(image)
    stop = torch.gather(ends, 1, flat + 1).view_as(image)
    return peak * (start + fraction * (stop - start))


def add_noise(
    image: torch.Tensor, std: float = 0.02, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add Gaussian noise of ``std`` x each item's maximum to (B, 1, D, H, W); same units."""
    peak = image.flatten(1).amax(dim=1).view(-1, 1, 1, 1, 1)
    return image + std * peak * random_normal(image.shape, generator, image.device)


def random_intensity(
    image: torch.Tensor,
    bias: float = 0.3,
    gamma_log_std: float = 0.25,
    contrast_spread: float = 0.4,
    noise_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Contrast remapping, gamma, bias field then noise on (B, 1, D, H, W) intensities.

    Models a different scanner or sequence; zero any of the strengths to leave it out.
    """
    result = image
    if contrast_spread > 0:
        result = random_contrast(result, spread=contrast_spread, generator=generator)
    if gamma_log_std > 0:
        result = random_gamma(result, gamma_log_std, generator)
    if bias > 0:
        result = result * bias_field(
            image.shape[2:], bias, batch=image.shape[0], generator=generator, device=image.device
        )
    if noise_std > 0:
        result = add_noise(result, noise_std, generator)
    return result
