"""Images synthesised from label maps, for training that generalises across contrasts.

The approach of SynthMorph (Hoffmann et al. 2022): a label map (anatomical parcels, tissue
classes or random shapes) is deformed twice at random, and each copy is turned into an image
by drawing a random intensity per label, with random noise, blur, bias field, gamma and
resolution. A network trained on such pairs never sees the same contrast twice, so it learns
to align anatomy rather than one scanner's intensities.

Everything is a torch function of (B, C, D, H, W) tensors that runs on the device the label
maps are on (a GPU when training), seeded by a ``torch.Generator`` on that device's side
(CPU generator; random numbers are drawn on the CPU and moved, so results do not depend on
the device).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitreg.data import TrainBatch
from vitreg.errors import VitregError
from vitreg.simulate import (
    random_deformation,
    random_intensity,
    random_normal,
    random_uniform,
    smooth_noise,
)
from vitreg.transform import resize_flow, warp, warp_labels


def random_shapes(
    shape: Sequence[int],
    num_labels: int,
    generator: torch.Generator,
    batch: int = 1,
    scale_vox: float = 24.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A label map of random blobs: (B, 1, D, H, W) int64 in [0, num_labels).

    Each voxel takes the label whose smooth noise field is largest there (SynthMorph's
    "shapes"), so blobs have smooth random outlines about ``scale_vox`` voxels across.
    """
    if num_labels < 2:
        raise VitregError(f"random shapes need at least 2 labels, got {num_labels}")
    fields = smooth_noise(shape, scale_vox, num_labels, batch, generator, device)
    return fields.argmax(dim=1, keepdim=True)


def gaussian_blur(image: torch.Tensor, sigma_vox: torch.Tensor) -> torch.Tensor:
    """Blur each item of ``image`` (B, 1, D, H, W) with its own isotropic sigma (B,) in voxels."""
    out = torch.empty_like(image)
    for item, sigma in enumerate(sigma_vox.tolist()):
        volume = image[item : item + 1]
        if sigma < 0.1:
            out[item : item + 1] = volume
            continue
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
        kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
        kernel = kernel / kernel.sum()
        for axis in range(3):
            view = [1, 1, 1, 1, 1]
            view[2 + axis] = kernel.numel()
            volume = F.conv3d(
                F.pad(volume, _pad_for_axis(axis, radius), mode="replicate"),
                kernel.view(view),
            )
        out[item : item + 1] = volume
    return out


def _pad_for_axis(axis: int, radius: int) -> tuple[int, ...]:
    """F.pad widths (last axis first) that pad ``radius`` voxels on both sides of one axis."""
    widths = [0, 0, 0, 0, 0, 0]
    position = 2 * (2 - axis)
    widths[position] = widths[position + 1] = radius
    return tuple(widths)


def labels_to_image(
    labels: torch.Tensor,
    num_labels: int,
    generator: torch.Generator,
    max_blur_vox: float = 1.0,
    max_label_std: float = 0.1,
) -> torch.Tensor:
    """A random-contrast image of a label map (B, 1, D, H, W) int64: (B, 1, D, H, W) in [0, 1].

    Each label gets a mean intensity drawn uniformly in [0, 1] and a noise spread up to
    ``max_label_std``; the image is then blurred by up to ``max_blur_vox`` voxels (partial
    volume) and rescaled to [0, 1]. Bias, gamma, noise and resolution come after (see
    :func:`corrupt`).
    """
    if labels.dim() != 5 or labels.shape[1] != 1:
        raise VitregError(f"labels: expected (B, 1, D, H, W), got {tuple(labels.shape)}")
    batch = labels.shape[0]
    device = labels.device
    means = random_uniform((batch, num_labels), generator, device, 0.0, 1.0)
    stds = random_uniform((batch, num_labels), generator, device, 0.0, max_label_std)
    flat = labels.view(batch, -1).clamp(0, num_labels - 1)
    image = torch.gather(means, 1, flat) + torch.gather(stds, 1, flat) * random_normal(
        flat.shape, generator, device
    )
    image = image.view(labels.shape).float()
    sigma = random_uniform((batch,), generator, "cpu", 0.0, max_blur_vox)
    return rescale(gaussian_blur(image, sigma))


def rescale(image: torch.Tensor) -> torch.Tensor:
    """Map each item of ``image`` (B, C, D, H, W) linearly onto [0, 1] (min to 0, max to 1)."""
    flat = image.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1, 1)
    return (image - low) / (high - low).clamp_min(1e-6)


def lower_resolution(
    image: torch.Tensor, generator: torch.Generator, max_factor: float = 3.0
) -> torch.Tensor:
    """Mimic a thicker acquisition: each item (B, 1, D, H, W) is averaged along one random axis
    over a random 1..``max_factor`` voxels and interpolated back, as thick-slice scans look."""
    out = image.clone()
    shape = image.shape[2:]
    axes = torch.randint(0, 3, (image.shape[0],), generator=generator).tolist()
    factors = random_uniform((image.shape[0],), generator, "cpu", 1.0, max_factor).tolist()
    for item, (axis, factor) in enumerate(zip(axes, factors, strict=True)):
        if factor < 1.2:
            continue
        coarse = list(shape)
        coarse[axis] = max(2, round(shape[axis] / factor))
        low = F.interpolate(image[item : item + 1], size=tuple(coarse), mode="area")
        out[item : item + 1] = F.interpolate(low, size=tuple(shape), mode="trilinear")
    return out


def corrupt(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Scanner effects on (B, 1, D, H, W) images in [0, 1]: lower resolution along a random
    axis, then contrast, gamma, bias field and noise (:func:`vitreg.simulate.random_intensity`),
    rescaled to [0, 1]."""
    degraded = lower_resolution(image, generator)
    degraded = random_intensity(degraded, generator=generator)
    return rescale(degraded.clamp_min(0))


@dataclass(frozen=True)
class LabelSource:
    """One anatomy to synthesise from, already in the model frame.

    ``labels``: (1, 1, D, H, W) int64 label map (0 = background); ``classes``: (L,) int64 that
    maps each label value to the class the Dice loss sees (0..``num_classes``-1), so a map with
    a hundred parcels can train with a handful of merged classes; ``image``: (1, 1, D, H, W)
    float in [0, 1] when a real scan of this anatomy exists, else None.
    """

    name: str
    labels: torch.Tensor
    classes: torch.Tensor
    image: torch.Tensor | None = None


@dataclass
class SynthPairs:
    """A pair source (see :mod:`vitreg.data`) of synthetic pairs, drawn fresh for every batch.

    Each pair starts from one anatomy: random shapes (``shapes_fraction`` of pairs, with
    ``shape_labels`` blobs), or one of ``sources``; it is deformed twice at random (each up to
    ``max_displacement_mm``), so the two images differ by a known, smooth, invertible map.
    Images are synthesised from the deformed labels with independent random contrasts, or,
    for ``real_fraction`` of the pairs whose source has a real scan, that scan is deformed and
    given random intensity changes. Labels come out as Dice-loss classes.
    """

    sources: Sequence[LabelSource]
    shape: tuple[int, int, int]
    num_classes: int
    pairs_per_epoch: int = 100
    shapes_fraction: float = 0.3
    real_fraction: float = 0.3
    shape_labels: int = 24
    max_displacement_mm: float = 8.0
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def batch(
        self, draw: int, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> TrainBatch:
        """``batch_size`` new pairs on ``device``; ``generator`` is the only randomness used."""
        items = [self._pair(generator, device) for _ in range(batch_size)]
        fixed, moving, fixed_labels, moving_labels = (
            torch.cat(part) for part in zip(*items, strict=True)
        )
        return TrainBatch(fixed, moving, fixed_labels, moving_labels, self.num_classes)

    def _anatomy(
        self, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(labels (1, 1, D, H, W), label -> class table, real image or None) of one pair."""
        if not self.sources or float(torch.rand((), generator=generator)) < self.shapes_fraction:
            labels = random_shapes(self.shape, self.shape_labels, generator, device=device)
            classes = torch.arange(self.shape_labels, device=device) % self.num_classes
            return labels, classes, None
        index = int(torch.randint(len(self.sources), (), generator=generator))
        source = self.sources[index]
        use_image = source.image is not None and (
            float(torch.rand((), generator=generator)) < self.real_fraction
        )
        image = source.image.to(device) if use_image else None
        return source.labels.to(device), source.classes.to(device), image

    def _pair(self, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(fixed, moving, fixed classes, moving classes), each (1, 1, D, H, W)."""
        labels, classes, image = self._anatomy(generator, device)
        label_count = int(classes.numel())
        images, class_maps = [], []
        # Deformations are smooth: draw them on a grid of half the resolution (8x cheaper).
        coarse_shape = [max(2, n // 2) for n in self.shape]
        coarse_spacing = [
            s * n / c for s, n, c in zip(self.spacing, self.shape, coarse_shape, strict=True)
        ]
        for _ in range(2):
            coarse = random_deformation(
                coarse_shape,
                self.max_displacement_mm,
                coarse_spacing,
                batch=1,
                generator=generator,
                device=device,
            )
            flow = resize_flow(coarse, self.shape, align_corners=False)
            deformed = warp_labels(labels, flow)
            if image is None:
                images.append(corrupt(labels_to_image(deformed, label_count, generator), generator))
            else:
                images.append(corrupt(warp(image, flow), generator))
            class_maps.append(classes[deformed.clamp(0, label_count - 1)])
        return images[0], images[1], class_maps[0], class_maps[1]
