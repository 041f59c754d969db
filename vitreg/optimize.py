"""Test-time optimisation of a dense field, by two engines.

:func:`greedy_optimize`, the default: greedy updates of local NCC with Gaussian smoothing
(below). :func:`optimize_flow`: gradient descent (Adam, autograd) on any similarity of
:mod:`vitreg.losses` plus a penalty weight, with optional Dice guidance by label maps; slower
(autograd through the warp), kept for MI, MSE, bending energy and Dice guidance.

The greedy engine is of the family of greedy, demons and FireANTs. At each level of a
coarse-to-fine pyramid, each iteration:

1. warps the moving image with the current field, ``warped(x) = moving(x + u(x))``;
2. takes the gradient of the summed local NCC with respect to ``warped`` in closed form (window
   sums by box filters; no autograd through the warp) times the moving image's spatial
   gradient read through the field, ``(grad moving)(x + u(x))`` (read in the same
   ``grid_sample`` as the image): the derivative of the similarity with respect to the
   displacement at each voxel, the direction in which a small displacement raises it most;
3. smooths that direction with a Gaussian (``sigma_update``), scales it so that its longest
   vector is ``step`` voxels, composes it with the field (``u <- v + u o (id + v)``: the
   update moves the points first, as greedy and ANTs do; ``compositive=False`` adds it) and
   smooths the field with a Gaussian (``sigma_field``, ``sigma_field_full`` at full
   resolution): the regularisation, instead of a penalty weight. Composing keeps det(J)
   positive where adding folds. greedy takes the direction the same way;
   ``moving_gradient=False`` takes the warped image's own central differences instead (the
   gradient for a composed update), which registered pairs of different brains less well
   (``benchmarks/README.md``).

With ``diffeo`` the optimised state is a stationary velocity (updated and smoothed the same
way) whose exponential (scaling and squaring) is the displacement, so det(J) stays positive.

Only the box around the fixed image's foreground is optimised (:class:`Region`). Every large
tensor of an iteration lives in buffers allocated once per level: on the CPU a freshly
allocated tensor costs page faults that take 5 to 8 times as long as the arithmetic on it.

Tensors are (1, C, D, H, W) on the frame grid; fields are in voxels of their level's grid,
channel i along array axis i (:mod:`vitreg.transform`'s convention).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitreg.errors import OptionError, VitregError
from vitreg.losses import regularizer_function, similarity_function, soft_dice
from vitreg.transform import (
    displacement_from_output,
    identity_grid,
    integrate_velocity,
    resize_flow,
    warp,
)

Progress = Callable[[str, int, int], None]

NCC_EPSILON = 1e-5  # added to variances: flat windows (background) give 0, not NaN
FULL_RESOLUTION_SIGMA = 0.5
"""The field's Gaussian sigma (voxels) at full resolution by default, composed updates only."""


@dataclass(frozen=True)
class GreedySchedule:
    """How the optimisation runs: ``levels`` (downsampling factors, coarse to fine; 1 is the
    frame's resolution) with ``iterations`` at each; the NCC ``window`` (odd, in voxels of each
    level); ``sigma_update`` and ``sigma_field`` (Gaussian standard deviations, voxels of each
    level); ``sigma_field_full``: the field's sigma at full resolution (level 1; None:
    :data:`FULL_RESOLUTION_SIGMA` for composed displacement updates, ``sigma_field`` for a
    velocity or added updates, which fold more easily when smoothed less, and with a
    cost-function mask, where the field inside the mask's hole follows from the smoothing);
    ``step``, the longest update (voxels of each level); ``diffeo`` (a stationary
    velocity, integrated in ``integration_steps``); ``coarse_field``: at level 1 the field
    lives on a grid of half the resolution while the images are compared at full resolution;
    ``compositive``: compose each update with the field (else add it; a velocity is always
    added to); ``moving_gradient``: the update's direction uses the moving image's gradient
    read through the field (greedy's choice), else (and always with a moving cost-function
    mask) the warped image's own gradient.

    The defaults were chosen on the tuning pairs (``benchmarks/README.md``, ``tune_greedy.py``):
    the two deformed sets (Colin27 and MNI152 under known smooth deformations) and four pairs
    of different brains that the benchmark does not report (Colin27 and ROBEX both ways, ICBM
    2009c and FSL MNI152 both ways). Among sigma_update 1.732 / 2 / 2.5,
    sigma_field 0.5 / 0.7071 / 1, a field sigma at full resolution of 0.4 / 0.5 / 0.6 /
    0.7071, 10, 20 or 40 iterations at full resolution, step 1 / 1.5, added or composed
    updates, window 5 / 7 / 9 (and per level), the warped or the moving image's gradient,
    these lost least to greedy on the pairs of different brains (they lead it on both of
    their sets) while beating it on both deformed sets, folding under 0.001 % of the brain
    (33-42 s per 1 mm brain on 2 CPU cores in the benchmark's runs, affine step included).
    """

    levels: tuple[int, ...] = (4, 2, 1)
    iterations: tuple[int, ...] = (100, 50, 20)
    window: int = 5
    sigma_update: float = 2.0
    sigma_field: float = 0.7071
    sigma_field_full: float | None = None
    step: float = 1.0
    diffeo: bool = False
    integration_steps: int = 6
    coarse_field: bool = False
    compositive: bool = True
    moving_gradient: bool = True

    def __post_init__(self) -> None:
        if len(self.levels) != len(self.iterations) or not self.levels:
            raise VitregError(
                f"levels {self.levels} and iterations {self.iterations}: expected two lists "
                "of the same, non-zero length"
            )
        if any(factor < 1 for factor in self.levels) or any(n < 0 for n in self.iterations):
            raise VitregError(
                f"levels {self.levels} must be >= 1 and iterations {self.iterations} >= 0"
            )
        if self.window < 3 or self.window % 2 == 0:
            raise VitregError(f"window: expected an odd number of voxels >= 3, got {self.window}")
        sigmas = (self.sigma_update, self.sigma_field, self.sigma_field_full or 0.0)
        if min(sigmas) < 0 or self.step <= 0:
            raise VitregError(
                f"sigma_update {self.sigma_update}, sigma_field {self.sigma_field} and "
                f"sigma_field_full {self.sigma_field_full} must be >= 0 and step {self.step} > 0"
            )

    def field_sigma(self, factor: int, masked: bool = False) -> float:
        """The field's Gaussian sigma (voxels of the level) at the level ``factor``, with or
        without cost-function masks (``masked``)."""
        if factor != 1:
            return self.sigma_field
        if self.sigma_field_full is not None:
            return self.sigma_field_full
        return FULL_RESOLUTION_SIGMA if self.composes and not masked else self.sigma_field

    @property
    def composes(self) -> bool:
        """Whether each update is composed with a displacement (``compositive`` without
        ``diffeo``: a velocity is always added to)."""
        return self.compositive and not self.diffeo

    @property
    def total_iterations(self) -> int:
        """All iterations over all levels."""
        return sum(self.iterations)

    def displacement(self, state_vox: torch.Tensor) -> torch.Tensor:
        """The displacement (1, 3, D, H, W) voxels of an optimised state: the state itself, or
        its exponential (scaling and squaring) when ``diffeo``."""
        if self.diffeo:
            return integrate_velocity(state_vox, self.integration_steps)
        return state_vox


# --------------------------------------------------------------------- filters, in place


def box_sum_(volume: torch.Tensor, scratch: torch.Tensor, window: int) -> torch.Tensor:
    """Sum over a ``window``^3 box at every voxel of (N, C, D, H, W), zero outside.

    Works in ``volume`` and ``scratch`` (same shape; both overwritten) and returns the one
    that holds the result. Along each axis: the volume plus its shifted copies.
    """
    half = window // 2
    source, target = volume, scratch
    for axis in (2, 3, 4):
        size = source.shape[axis]
        target.copy_(source)
        for shift in range(1, min(half, size - 1) + 1):
            target.narrow(axis, shift, size - shift).add_(source.narrow(axis, 0, size - shift))
            target.narrow(axis, 0, size - shift).add_(source.narrow(axis, shift, size - shift))
        source, target = target, source
    return source


def box_sum(volume: torch.Tensor, window: int) -> torch.Tensor:
    """:func:`box_sum_` on a copy: (N, C, D, H, W) in, the window sums out, same shape."""
    return box_sum_(volume.clone(), torch.empty_like(volume), window).clone()


def gaussian_taps(sigma: float) -> list[float]:
    """1-D Gaussian of standard deviation ``sigma`` voxels summing to 1, cut at
    ``int(3 sigma + 0.5)`` voxels each side (scipy's rule)."""
    radius = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).tolist()


def gaussian_smooth_(field: torch.Tensor, scratch: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (``sigma`` voxels) of (N, C, D, H, W), edges replicated.

    Works in ``field`` and ``scratch`` (same shape; both overwritten) and returns the one that
    holds the result (``field`` itself when ``sigma`` is 0).
    """
    if sigma <= 0:
        return field
    taps = gaussian_taps(sigma)
    radius = len(taps) // 2
    source, target = field, scratch
    for axis in (2, 3, 4):
        size = source.shape[axis]
        torch.mul(source, taps[radius], out=target)
        for offset in range(1, radius + 1):
            weight = taps[radius + offset]
            inner = max(size - offset, 0)
            edge = min(offset, size)
            if inner:
                target.narrow(axis, offset, inner).add_(source.narrow(axis, 0, inner), alpha=weight)
                target.narrow(axis, 0, inner).add_(source.narrow(axis, offset, inner), alpha=weight)
            # Beyond the edges the first and last slices repeat (replicated edges).
            target.narrow(axis, 0, edge).add_(source.narrow(axis, 0, 1), alpha=weight)
            target.narrow(axis, size - edge, edge).add_(
                source.narrow(axis, size - 1, 1), alpha=weight
            )
        source, target = target, source
    return source


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`gaussian_smooth_` on a copy: (N, C, D, H, W) in, blurred out, same shape."""
    return gaussian_smooth_(field.clone(), torch.empty_like(field), sigma).clone()


def spatial_gradient_(image: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Central differences of ``image`` (1, 1, D, H, W) into ``out`` (1, 3, D, H, W): channel
    i is d image / d axis i per voxel, one-sided at the edges (numpy.gradient's rule)."""
    for axis in range(3):
        dim, size = axis + 2, image.shape[axis + 2]
        channel = out[:, axis : axis + 1]
        if size < 2:
            channel.zero_()
            continue
        torch.sub(
            image.narrow(dim, 2, size - 2),
            image.narrow(dim, 0, size - 2),
            out=channel.narrow(dim, 1, size - 2),
        )
        channel.narrow(dim, 1, size - 2).mul_(0.5)
        torch.sub(image.narrow(dim, 1, 1), image.narrow(dim, 0, 1), out=channel.narrow(dim, 0, 1))
        torch.sub(
            image.narrow(dim, size - 1, 1),
            image.narrow(dim, size - 2, 1),
            out=channel.narrow(dim, size - 1, 1),
        )
    return out


def spatial_gradient(image: torch.Tensor) -> torch.Tensor:
    """:func:`spatial_gradient_` into a new (1, 3, D, H, W) tensor."""
    return spatial_gradient_(image, image.new_empty(1, 3, *image.shape[2:]))


# ---------------------------------------------------------------------------- local NCC


@dataclass(frozen=True)
class FixedWindows:
    """The fixed image of one level and its window statistics, computed once: ``fixed``, the
    window ``mean`` and the centred sum of squares ``variance`` (each (1, 1, D, H, W)) over
    ``window``^3 boxes."""

    fixed: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    window: int

    @classmethod
    def of(cls, fixed: torch.Tensor, window: int) -> FixedWindows:
        """The statistics of ``fixed`` (1, 1, D, H, W)."""
        sums = box_sum(torch.cat([fixed, fixed * fixed], dim=1), window)
        total, squares = sums[:, :1], sums[:, 1:]
        return cls(fixed, total / window**3, squares - total * total / window**3, window)


class NccWorkspace:
    """Buffers for :func:`ncc_gradient_` at one level's shape (allocated once)."""

    def __init__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
        self.sums = torch.empty(1, 3, *shape, device=device, dtype=dtype)
        self.terms = torch.empty(1, 4, *shape, device=device, dtype=dtype)
        self.scratch = torch.empty(1, 4, *shape, device=device, dtype=dtype)
        self.gradient = torch.empty(1, 1, *shape, device=device, dtype=dtype)


def ncc_gradient_(
    windows: FixedWindows,
    warped: torch.Tensor,
    work: NccWorkspace,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The gradient of the summed local NCC with respect to ``warped`` (1, 1, D, H, W), and
    the mean NCC.

    Per window, cc = cross^2 / (var_f var_w), with window sums (cross and variances centred)
    over ``windows.window``^3 boxes, zero outside. A window's cc changes with the warped
    intensity at one of its voxels as ``a (f - mean_f) - b (w - mean_w)``, with
    ``a = 2 cross / (var_f var_w)`` and ``b = a cross / var_w``; summed over the windows that
    hold the voxel this is ``f box(a) - box(a mean_f) - w box(b) + box(b mean_w)``.
    ``weight`` (1, 1, D, H, W) in [0, 1], e.g. a cost-function mask: the summed NCC is then
    sum(weight x cc) over the window centres (``a`` and ``b`` are weighted) and the mean NCC
    is weighted the same way. Returns ``work.gradient`` (1, 1, D, H, W) and the mean cc.
    """
    count = float(windows.window**3)
    sums = work.sums
    sums[:, 0:1].copy_(warped)
    torch.mul(warped, warped, out=sums[:, 1:2])
    torch.mul(warped, windows.fixed, out=sums[:, 2:3])
    sums = box_sum_(sums, work.scratch[:, :3], windows.window)
    mean_w, var_w, cross = sums[:, 0:1], sums[:, 1:2], sums[:, 2:3]
    cross.addcmul_(windows.mean, mean_w, value=-1.0)  # sum_wf - mean_f sum_w
    var_w.addcmul_(mean_w, mean_w, value=-1.0 / count)  # sum_ww - sum_w^2 / n
    mean_w.mul_(1.0 / count)
    a, a_mean, b, b_mean = (work.terms[:, i : i + 1] for i in range(4))
    torch.mul(windows.variance, var_w, out=a).add_(NCC_EPSILON)  # the denominator, for now
    torch.mul(cross, cross, out=b).div_(a)
    if weight is None:
        score = float(b.mean())
    else:  # work.gradient is free until the end: scratch for the weighted cc
        score = float(torch.mul(b, weight, out=work.gradient).sum() / weight.sum().clamp(1e-6))
    torch.div(cross, a, out=a).mul_(2.0)
    torch.mul(a, cross, out=b).div_(var_w.add_(NCC_EPSILON))
    if weight is not None:
        a.mul_(weight)
        b.mul_(weight)
    torch.mul(a, windows.mean, out=a_mean)
    torch.mul(b, mean_w, out=b_mean)
    terms = box_sum_(work.terms, work.scratch, windows.window)
    gradient = torch.mul(windows.fixed, terms[:, 0:1], out=work.gradient)
    gradient.sub_(terms[:, 1:2]).addcmul_(warped, terms[:, 2:3], value=-1.0).add_(terms[:, 3:4])
    return gradient, score


def ncc_gradient(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 5,
    weight: torch.Tensor | None = None,
):
    """:func:`ncc_gradient_` with fresh buffers: (gradient (1, 1, D, H, W), mean NCC)."""
    work = NccWorkspace(fixed.shape[2:], fixed.device, fixed.dtype)
    gradient, score = ncc_gradient_(FixedWindows.of(fixed, window), warped, work, weight)
    return gradient.clone(), score


def ncc_score(fixed: torch.Tensor, warped: torch.Tensor, window: int = 5) -> float:
    """Mean local NCC (cc in [0, 1]) of two (1, 1, D, H, W) images over ``window``^3 boxes."""
    return ncc_gradient(fixed, warped, window)[1]


# ------------------------------------------------------------------------ the optimisation


@dataclass(frozen=True)
class Region:
    """The box of the frame that the optimisation works in: ``start`` and ``size`` in voxels of
    the frame (multiples of the coarsest grid's factor, or reaching the frame's edge)."""

    start: tuple[int, int, int]
    size: tuple[int, int, int]

    @classmethod
    def around(
        cls, fixed: torch.Tensor, multiple: int, margin: int = 8, threshold: float = 0.02
    ) -> Region:
        """The box around the voxels of ``fixed`` (1, 1, D, H, W) above ``threshold``, grown by
        ``margin`` voxels, its corners on multiples of ``multiple`` inside the frame."""
        shape = [int(n) for n in fixed.shape[2:]]
        inside = torch.nonzero(fixed[0, 0] > threshold)
        if inside.numel() == 0:
            return cls((0, 0, 0), tuple(shape))
        start, size = [], []
        for axis, n in enumerate(shape):
            low = max(0, int(inside[:, axis].min()) - margin) // multiple * multiple
            high = min(n, int(inside[:, axis].max()) + 1 + margin)
            length = min(-(-(high - low) // multiple) * multiple, n - n % multiple)
            low = min(low, (n - length) // multiple * multiple)
            start.append(low)
            size.append(length)
        return cls(tuple(start), tuple(size))

    def crop(self, volume: torch.Tensor, factor: int = 1) -> torch.Tensor:
        """The box of (1, C, D, H, W) on a grid ``factor`` times coarser than the frame."""
        for axis in range(3):
            volume = volume.narrow(axis + 2, self.start[axis] // factor, self.size[axis] // factor)
        return volume

    def embed(self, field: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """The box's (1, 3, d, h, w) field in a frame of ``shape``, its edge values extended."""
        padding = []
        for axis in (2, 1, 0):  # F.pad lists the last axis first
            padding += [self.start[axis], int(shape[axis]) - self.start[axis] - self.size[axis]]
        return F.pad(field, padding, mode="replicate") if any(padding) else field


def _shrink(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor``^3 blocks of (1, C, D, H, W) (voxel edges kept, align_corners=False)."""
    if factor == 1:
        return image
    return F.interpolate(image, size=[n // factor for n in image.shape[2:]], mode="area")


@dataclass(frozen=True)
class CostMasks:
    """Where the similarity is measured: ``fixed`` and ``moving``, each (1, 1, D, H, W) on the
    frame grid with 1 inside and 0 outside (fractions allowed), or None for everywhere. The
    moving one lies on the frame grid as the moving image does and is read through the field
    with it. Voxels outside either drive no update: the field there follows from the
    smoothing of its surroundings."""

    fixed: torch.Tensor | None = None
    moving: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return self.fixed is not None or self.moving is not None


def _sampling_grid(
    origin: torch.Tensor, sampled_shape: Sequence[int]
) -> tuple[torch.Tensor, list[float]]:
    """grid_sample's locations (1, d, h, w, 3) of the voxel positions ``origin`` (1, 3, d, h,
    w) in a volume of ``sampled_shape`` (last array axis first, corners at -1 and 1:
    location = origin * scale - 1 per axis), and each array axis's ``scale`` (voxels to
    grid_sample's units)."""
    scale = [2.0 / max(int(n) - 1, 1) for n in sampled_shape]
    base = origin.new_empty(1, *origin.shape[2:], 3)
    for axis in range(3):
        torch.mul(origin[:, axis], scale[axis], out=base[..., 2 - axis]).sub_(1.0)
    return base, scale


def _displaced_locations(
    base: torch.Tensor, displacement: torch.Tensor, scale: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """grid_sample's locations (1, d, h, w, 3) of ``base`` moved by ``displacement`` (1, 3, d,
    h, w) voxels, ``scale`` per array axis (voxels to grid_sample's units), into ``out``."""
    for axis in range(3):
        torch.add(
            base[..., 2 - axis], displacement[:, axis], alpha=scale[axis], out=out[..., 2 - axis]
        )
    return out


class FieldComposer:
    """Composes displacement fields of one grid (D, H, W) in place: what
    :func:`vitreg.transform.compose` computes, with its sampling grid made once instead of
    at every call (the optimisation's hot path)."""

    def __init__(self, shape: Sequence[int], device: torch.device, dtype: torch.dtype) -> None:
        self.base, self.scale = _sampling_grid(identity_grid(shape, device, dtype), shape)
        self.locations = torch.empty_like(self.base)

    def compose_(self, state: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``state`` (1, 3, D, H, W) voxels becomes the displacement of ``update`` followed by
        ``state``: ``update(x) + state(x + update(x))`` (trilinear, edge values extended), in
        place; returns ``state``."""
        _displaced_locations(self.base, update, self.scale, self.locations)
        moved = F.grid_sample(state, self.locations, padding_mode="border", align_corners=True)
        return torch.add(moved, update, out=state)


class _Level:
    """One level's images and buffers: the fixed box's ``windows``, the whole ``moving``
    frame at this level (with its spatial gradient and the moving mask as further channels,
    so that one grid_sample reads them all), and where the box's voxels lie in it (``base``,
    grid_sample's form)."""

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, region: Region, factor: int,
                 schedule: GreedySchedule, field_shape: Sequence[int],
                 masks: CostMasks = CostMasks()) -> None:  # fmt: skip
        box = region.crop(_shrink(fixed, factor), factor).contiguous()
        self.windows = FixedWindows.of(box, schedule.window)
        # The moving channels that one grid_sample reads through the field: the image, its
        # spatial gradient (3, when schedule.moving_gradient) and the moving mask (when given).
        moving = _shrink(moving, factor)
        self.moving_masked = masks.moving is not None
        moving_mask = _shrink(masks.moving.to(moving.dtype), factor) if self.moving_masked else None
        channels = [moving]
        # With a moving mask the warped image's own gradient: the moving one read through the
        # field let a masked-out lesion roughen the field beside it (tests/test_masks.py).
        self.gradient_read = schedule.moving_gradient and moving_mask is None
        if self.gradient_read:
            channels.append(spatial_gradient(moving))
        if moving_mask is not None:
            channels.append(moving_mask)
        self.moving = torch.cat(channels, dim=1) if len(channels) > 1 else moving
        device, dtype = fixed.device, fixed.dtype
        # A block's share of mask voxels (not a thresholded one): the weight of its NCC term.
        self.fixed_weight = None
        if masks.fixed is not None:
            shrunk = _shrink(masks.fixed.to(dtype), factor)
            self.fixed_weight = region.crop(shrunk, factor).contiguous()
        self.weight = torch.empty_like(box) if masks.any else None
        offset = torch.tensor([s // factor for s in region.start], device=device, dtype=dtype)
        origin = identity_grid(box.shape[2:], device, dtype) + offset.view(1, 3, 1, 1, 1)
        self.base, self.scale = _sampling_grid(origin, self.moving.shape[2:])
        self.locations = torch.empty_like(self.base)
        self.ncc = NccWorkspace(box.shape[2:], device, dtype)
        self.image_direction = torch.empty(1, 3, *box.shape[2:], device=device, dtype=dtype)
        self.direction = torch.empty(1, 3, *field_shape, device=device, dtype=dtype)
        self.scratch = torch.empty(1, 3, *field_shape, device=device, dtype=dtype)
        self.field_voxel = box.shape[2] / field_shape[0]  # image voxels per field voxel
        self.composer = FieldComposer(field_shape, device, dtype) if schedule.composes else None
        self.sigma_field = schedule.field_sigma(factor, masked=masks.any)

    def step(self, state: torch.Tensor, schedule: GreedySchedule) -> torch.Tensor:
        """One iteration on ``state`` (1, 3, d, h, w), updated in place and returned."""
        displacement = schedule.displacement(state)
        if self.field_voxel != 1:
            displacement = resize_flow(displacement, self.base.shape[1:4], align_corners=False)
        _displaced_locations(self.base, displacement, self.scale, self.locations)
        sampled = F.grid_sample(self.moving, self.locations, align_corners=True)
        warped = sampled[:, :1]
        weight = self._weight(sampled)
        gradient, _ = ncc_gradient_(self.windows, warped, self.ncc, weight)
        if weight is not None:
            gradient.mul_(weight)  # and no update at the masked voxels themselves
        if self.gradient_read:
            direction = torch.mul(sampled[:, 1:4], gradient, out=self.image_direction)
        else:
            direction = spatial_gradient_(warped, self.image_direction).mul_(gradient)
        if self.field_voxel != 1:
            direction = F.interpolate(direction, size=state.shape[2:], mode="area")
        self.direction.copy_(direction)
        smoothed = gaussian_smooth_(
            self.direction, self.scratch, schedule.sigma_update / self.field_voxel
        )
        longest = float(torch.mul(smoothed, smoothed, out=self._spare(smoothed)).sum(1).max())
        if longest > 0:
            scale = schedule.step / self.field_voxel / longest**0.5
            if self.composer is not None:
                self.composer.compose_(state, smoothed.mul_(scale))
            else:
                state.add_(smoothed, alpha=scale)
        smoothed_state = gaussian_smooth_(state, self._spare(state), self.sigma_field)
        if smoothed_state is not state:
            state.copy_(smoothed_state)
        return state

    def _weight(self, sampled: torch.Tensor) -> torch.Tensor | None:
        """The masks' weight of each box voxel (1, 1, d, h, w) in ``self.weight``, or None:
        the fixed mask's share times the moving mask read through the field (the last channel
        of ``sampled``)."""
        if self.weight is None:
            return None
        moving_weight = sampled[:, -1:]
        if self.moving_masked and self.fixed_weight is not None:
            return torch.mul(moving_weight, self.fixed_weight, out=self.weight)
        return self.weight.copy_(moving_weight if self.moving_masked else self.fixed_weight)

    def _spare(self, busy: torch.Tensor) -> torch.Tensor:
        """Whichever of the two field-sized buffers is not ``busy``."""
        return self.scratch if busy is self.direction else self.direction


def greedy_optimize(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial_vox: torch.Tensor,
    schedule: GreedySchedule = GreedySchedule(),
    progress: Progress | None = None,
    masks: CostMasks = CostMasks(),
) -> torch.Tensor:
    """Refine a field by greedy local-NCC optimisation (see the module docstring).

    ``fixed``/``moving``: (1, 1, D, H, W) frame images in [0, 1]; ``initial_vox``: (1, 3, D,
    H, W) voxels, the starting displacement (a velocity when ``schedule.diffeo``); ``masks``:
    where the similarity counts (:class:`CostMasks`; each NCC term is weighted by the fixed
    mask's share at its level times the moving mask read through the field, and so is the
    update at each voxel). Returns the optimised state, (1, 3, D, H, W) voxels of the frame
    grid, of the same kind as ``initial_vox``; outside the box around the fixed foreground it
    extends the box's edges.
    """
    shape = fixed.shape[2:]
    coarsest = max(schedule.levels) * (2 if schedule.coarse_field else 1)
    region = Region.around(fixed, coarsest)
    if any(n // factor < schedule.window for n in region.size for factor in schedule.levels):
        raise VitregError(
            f"levels {schedule.levels}: the coarsest grid is smaller than the NCC window "
            f"({schedule.window} voxels) for a frame of {tuple(shape)} voxels"
        )
    state = region.crop(initial_vox.detach())
    done = 0
    with torch.no_grad():
        for factor, iterations in zip(schedule.levels, schedule.iterations, strict=True):
            if iterations == 0:
                continue
            field_shape = [n // factor for n in region.size]
            if schedule.coarse_field and factor == 1:
                field_shape = [n // 2 for n in field_shape]
            state = resize_flow(state, field_shape, align_corners=False).contiguous()
            level = _Level(fixed, moving, region, factor, schedule, field_shape, masks)
            for _ in range(iterations):
                state = level.step(state, schedule)
                done += 1
                if progress is not None:
                    progress("optimise", done, schedule.total_iterations)
            del level
        state = resize_flow(state, region.size, align_corners=False)
    return region.embed(state, shape)


# ------------------------------------------------------------- gradient descent (Adam)


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` steps over ``parts`` levels, the first levels taking the remainder."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def check_levels(levels: Sequence[int], shape: Sequence[int] | None) -> tuple[int, ...]:
    """``levels`` as a tuple of downsampling factors, each >= 1 and, with a frame ``shape``,
    fine enough for it (at least 4 voxels along every axis); OptionError otherwise."""
    levels = tuple(int(factor) for factor in levels)
    if not levels or any(factor < 1 for factor in levels):
        raise OptionError("levels", levels, "expected downsampling factors >= 1, e.g. (4, 2, 1)")
    if shape is not None and any(min(shape) // factor < 4 for factor in levels):
        raise OptionError("levels", levels, f"too coarse for a frame of {tuple(shape)} voxels")
    return levels


def onehot_levels(labels: torch.Tensor, values: Sequence[int], factor: int) -> torch.Tensor:
    """(1, 1, D, H, W) integer labels -> (1, K, D/f, H/f, W/f) label shares, one label at a time."""
    return torch.cat([_shrink((labels == value).float(), factor) for value in values], dim=1)


def optimize_flow(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    initial_flow_vox: torch.Tensor,
    steps: int | Sequence[int],
    levels: Sequence[int] = (4, 2),
    smoothness: float = 5.0,
    learning_rate: float = 0.2,
    progress: Progress | None = None,
    similarity: str = "ncc",
    regularizer: str = "diffusion",
    velocity: bool = False,
    integration_steps: int = 7,
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
    dice_weight: float = 0.0,
) -> torch.Tensor:
    """Test-time optimisation of a flow: similarity + ``smoothness`` x regulariser, Adam.

    ``fixed``/``moving`` are (1, 1, D, H, W) in [0, 1]; ``initial_flow_vox`` (1, 3, D, H, W)
    voxels (a stationary velocity when ``velocity``: the warp then uses its scaling-and-squaring
    exponential, and the regulariser acts on the velocity). ``similarity`` is 'ncc' (local
    9^3), 'mse' or 'mi' (Parzen mutual information); ``regularizer`` 'diffusion' or 'bending'.
    ``labels`` (fixed, moving), each (1, 1, D, H, W) integer maps in the frame, add
    ``dice_weight`` x soft Dice of the warped label shares over the labels both hold.
    Coarse to fine over ``levels`` (downsampling factors; 1 is full resolution); ``steps``
    gives the steps of each level, or their total, split evenly; each level starts from the
    last one's field. Returns (1, 3, D, H, W) voxels (the velocity when ``velocity``).
    """
    shape = fixed.shape[2:]
    levels = check_levels(levels, shape)
    similarity_fn = similarity_function(similarity)
    regularizer_fn = regularizer_function(regularizer)
    values: list[int] = []
    if labels is not None and dice_weight > 0:
        values = sorted(
            set(torch.unique(labels[0]).tolist()) & set(torch.unique(labels[1]).tolist()) - {0}
        )
    flow = initial_flow_vox.detach()
    per_level = split_evenly(steps, len(levels)) if isinstance(steps, int) else list(steps)
    if len(per_level) != len(levels):
        raise OptionError("iterations", tuple(per_level), f"expected one per level {levels}")
    total = sum(per_level)
    done = 0
    for factor, level_steps in zip(levels, per_level, strict=True):
        if level_steps == 0:
            continue
        fixed_level, moving_level = _shrink(fixed, factor), _shrink(moving, factor)
        if values:
            fixed_onehot = onehot_levels(labels[0], values, factor)
            moving_onehot = onehot_levels(labels[1], values, factor)
        level_flow = resize_flow(flow, fixed_level.shape[2:], align_corners=False)
        level_flow.requires_grad_(True)
        optimizer = torch.optim.Adam([level_flow], lr=learning_rate)
        for _ in range(level_steps):
            optimizer.zero_grad(set_to_none=True)
            displacement = displacement_from_output(level_flow, velocity, integration_steps)
            warped = warp(moving_level, displacement)
            loss = similarity_fn(fixed_level, warped) + smoothness * regularizer_fn(level_flow)
            if values:
                loss = loss + dice_weight * soft_dice(
                    fixed_onehot, warp(moving_onehot, displacement)
                )
            loss.backward()
            optimizer.step()
            done += 1
            if progress is not None:
                progress("optimise", done, total)
        flow = resize_flow(level_flow.detach(), shape, align_corners=False)
    return flow


def split_by_factor(total: int, levels: Sequence[int]) -> list[int]:
    """``total`` iterations over ``levels`` in proportion to their downsampling factors (a
    coarse level's iteration is the cheapest), rounded, the remainder to the coarsest."""
    weights = [factor / sum(levels) for factor in levels]
    counts = [int(total * weight) for weight in weights]
    counts[0] += total - sum(counts)
    return counts
