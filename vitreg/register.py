"""The Python API: register a moving image to a fixed one with ViT-V-Net and/or optimisation."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vitreg.affine import estimate_affine, in_fixed_world
from vitreg.device import choose_device
from vitreg.errors import OptionError, VitregError
from vitreg.field import DisplacementField, affine_displacement, warp_image, with_affine
from vitreg.frame import ModelFrame, flow_to_native_mm, frame_labels, frame_pair
from vitreg.image import Volume
from vitreg.losses import local_ncc, regularizer_function, similarity_function, soft_dice
from vitreg.nets.vitvnet import VitVNet
from vitreg.transform import (
    compose,
    displacement_from_output,
    flow_vox_to_mm,
    integrate_velocity,
    resize_flow,
    warp,
)

Progress = Callable[[str, int, int], None]
"""Called as progress(stage, done, total) while long stages run."""


INVERSE_ITERATIONS = 30
INVERSE_SHRINK = 2
INVERSE_TOLERANCE_VOX = 0.01  # stop the fixed-point iteration once no voxel moves more


@dataclass(frozen=True)
class Registration:
    """The result of :func:`register` (of its last stage, :func:`finish_registration`).

    ``warped``: the moving image on the fixed grid (X, Y, Z) float32, one resampling of MOVING.
    ``field``: the whole pull map on the fixed grid, fixed point x -> moving point
    ``x + d(x) = A(x + u(x))`` in RAS mm, with ``A`` = ``affine_ras`` (4x4, fixed world ->
    moving world; the identity without pre-alignment) and ``u`` the dense part. ``flow_vox``:
    ``u`` in the model frame, (1, 3, D, H, W) voxels of the grid ``frame_affine``;
    ``velocity_vox``: the stationary velocity whose exponential is ``flow_vox`` (diffeomorphic
    mode), else None. ``ncc_before`` and ``ncc_after``: mean local (9^3) squared NCC of the
    framed pair (after the affine), without and with ``u``. ``warnings``: for the user.
    """

    warped: np.ndarray
    field: DisplacementField
    flow_vox: torch.Tensor
    frame_affine: np.ndarray
    ncc_before: float
    ncc_after: float
    seconds: float
    device: str
    affine_ras: np.ndarray = dataclasses.field(default_factory=lambda: np.eye(4))
    velocity_vox: torch.Tensor | None = None
    integration_steps: int = 7
    affine_stages: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class InverseField:
    """The moving-to-fixed pull map on the moving grid, from :func:`invert`.

    ``field``: moving point y -> fixed point ``y + e(y)`` (RAS mm). ``residual_mean_mm`` and
    ``residual_max_mm``: |u(x) + w(x + u(x))| over the frame grid (forward then inverse dense
    part; the affine inverts exactly). ``exact``: the inverse came from the negated velocity.
    """

    field: DisplacementField
    residual_mean_mm: float
    residual_max_mm: float
    exact: bool


def _shrink(image: torch.Tensor, factor: int) -> torch.Tensor:
    """Average ``factor``^3 blocks of (1, C, D, H, W): voxel edges kept (align_corners=False)."""
    if factor == 1:
        return image
    return F.interpolate(image, size=[n // factor for n in image.shape[2:]], mode="area")


def _check_levels(levels: Sequence[int], shape: Sequence[int] | None) -> tuple[int, ...]:
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
    steps: int,
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
    Coarse to fine over ``levels`` (downsampling factors; 1 is full resolution), the steps
    split evenly; each level starts from the last one's field. Returns (1, 3, D, H, W) voxels
    (the velocity when ``velocity``).
    """
    shape = fixed.shape[2:]
    levels = _check_levels(levels, shape)
    similarity_fn = similarity_function(similarity)
    regularizer_fn = regularizer_function(regularizer)
    values: list[int] = []
    if labels is not None and dice_weight > 0:
        values = sorted(
            set(torch.unique(labels[0]).tolist()) & set(torch.unique(labels[1]).tolist()) - {0}
        )
    flow = initial_flow_vox.detach()
    per_level = [steps // len(levels) + (i < steps % len(levels)) for i in range(len(levels))]
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
                progress("optimise", done, steps)
        flow = resize_flow(level_flow.detach(), shape, align_corners=False)
    return flow


def predict_flow(
    model: VitVNet, fixed: torch.Tensor, moving: torch.Tensor, integrate: bool = True
) -> torch.Tensor:
    """Network flow (B, 3, D, H, W) voxels for framed (B, 1, D, H, W) images.

    Runs :meth:`VitVNet.infer` (streamed, channels-last: within 1e-5 voxel of the plain
    forward, at about half its time and a third of its memory on CPU). ``integrate=False``
    gives a diffeomorphic model's velocity instead of its displacement.
    """
    return model.infer(torch.cat([moving, fixed], dim=1), integrate=integrate)


def pre_align(
    fixed: Volume, moving: Volume, allow_failure: bool = False
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...]]:
    """Affine pre-alignment (RAS 4x4 fixed world -> moving world), its stages and warnings.

    A failure raises VitregError naming both files, unless ``allow_failure``: then the
    centring (or, when even that failed, the identity) is used with a warning.
    """
    names = f"{fixed.path}, {moving.path}"
    hint = "use {affine=False}, or {allow_affine_failure=True} to go on with the centring only"
    try:
        result = estimate_affine(fixed, moving)
    except VitregError as error:
        if not allow_failure:
            raise VitregError(f"{error.message}; {hint}") from None
        return np.eye(4), (), (f"affine pre-alignment skipped: {error}",)
    if result.failure is None:
        return result.affine_ras, tuple(result.stages), ()
    if not allow_failure:
        raise VitregError(f"{names}: affine pre-alignment failed: {result.failure}; {hint}")
    warning = f"affine pre-alignment failed ({result.failure}); going on with the centring only"
    return result.affine_ras, tuple(result.stages), (warning,)


@dataclass(frozen=True)
class RegisterSettings:
    """How :func:`register` treats a pair: everything but the images, model, frame and device.

    The fields are :func:`register`'s options of the same names; ``levels`` are downsampling
    factors, ``smoothness``, ``learning_rate`` and ``dice_weight`` unitless weights. Making
    the settings checks each value and their combinations (an OptionError names the
    parameter); :meth:`check_labels` checks them against the label maps given, and
    :meth:`checked` against a model and its frame.
    """

    optimize: int = 0
    smoothness: float = 5.0
    affine: bool = True
    allow_affine_failure: bool = False
    diffeo: bool = False
    integration_steps: int = 7
    levels: Sequence[int] = (4, 2)
    similarity: str = "ncc"
    regularizer: str = "diffusion"
    learning_rate: float = 0.2
    dice_weight: float = 0.0

    def __post_init__(self) -> None:
        for option in ("optimize", "smoothness", "dice_weight"):
            if getattr(self, option) < 0:
                raise OptionError(option, getattr(self, option), "must be >= 0")
        for option in ("learning_rate", "integration_steps"):
            if getattr(self, option) <= 0:
                raise OptionError(option, getattr(self, option), "must be > 0")
        similarity_function(self.similarity)
        regularizer_function(self.regularizer)
        object.__setattr__(self, "levels", _check_levels(self.levels, None))
        if self.dice_weight > 0 and self.optimize == 0:
            raise OptionError(
                "dice_weight",
                self.dice_weight,
                "Dice guidance acts in the optimisation: give {optimize} > 0",
            )

    def to_dict(self) -> dict:
        """The settings as a plain JSON-able dict (``levels`` a list)."""
        return {**dataclasses.asdict(self), "levels": list(self.levels)}

    def check_labels(self, labels: object | None) -> None:
        """OptionError when Dice guidance (``dice_weight`` > 0) has no label maps to use."""
        if self.dice_weight > 0 and labels is None:
            raise OptionError("dice_weight", self.dice_weight, "needs {labels} (fixed, moving)")

    @property
    def guided(self) -> bool:
        """Whether the optimisation uses label maps (Dice guidance)."""
        return self.optimize > 0 and self.dice_weight > 0

    def checked(self, model: VitVNet | None, frame: ModelFrame) -> RegisterSettings:
        """These settings checked against ``model`` and ``frame``; a model trained
        diffeomorphically (``config.int_steps`` > 0) sets ``diffeo`` and its step count."""
        _check_levels(self.levels, frame.shape)
        if model is None:
            return self
        if tuple(model.config.img_size) != tuple(frame.shape):
            raise VitregError(
                f"model size {model.config.img_size} differs from its frame grid {frame.shape}"
            )
        if model.config.int_steps:
            return dataclasses.replace(self, diffeo=True, integration_steps=model.config.int_steps)
        return self


def settings_from(settings: RegisterSettings | None, options: dict) -> RegisterSettings:
    """``settings``, or settings made of ``options`` (RegisterSettings fields): not both.

    Options that equal their defaults count as not given.
    """
    defaults = RegisterSettings()
    given = {k: v for k, v in options.items() if getattr(defaults, k) != _as_field(k, v)}
    if settings is None:
        return RegisterSettings(**options)
    if given:
        raise TypeError(f"give settings or the options {sorted(given)}, not both")
    return settings


def _as_field(name: str, value: object) -> object:
    """``value`` as RegisterSettings stores field ``name`` (levels as a tuple)."""
    return tuple(value) if name == "levels" else value


@dataclass(frozen=True)
class PreparedPair:
    """A pair after the affine pre-alignment and the framing (:func:`prepare_pair`).

    ``fixed_volume``/``moving_volume``: the images as given (native grids). ``fixed`` and
    ``moving``: (1, 1, D, H, W) float32 in [0, 1] on the frame grid ``frame_affine`` (4x4,
    voxel -> RAS mm), on ``device``; the moving one read through ``affine_ras`` (4x4 RAS mm,
    fixed world -> moving world; the identity without pre-alignment). ``stages`` and
    ``warnings``: the affine's. ``labels``: the framed (fixed, moving) label maps, each
    (1, 1, D, H, W) int64, for Dice guidance, else None. ``output``: the network's raw output
    (1, 3, D, H, W) voxels (a velocity in diffeomorphic mode) once :func:`predict_batch` ran,
    else None. ``seconds``: the time spent on the pair so far.
    """

    fixed_volume: Volume
    moving_volume: Volume
    fixed: torch.Tensor
    moving: torch.Tensor
    frame_affine: np.ndarray
    affine_ras: np.ndarray
    stages: tuple[str, ...]
    warnings: tuple[str, ...]
    device: torch.device
    labels: tuple[torch.Tensor, torch.Tensor] | None = None
    output: torch.Tensor | None = None
    seconds: float = 0.0


def prepare_pair(
    fixed: Volume,
    moving: Volume,
    frame: ModelFrame,
    settings: RegisterSettings,
    device: torch.device,
    labels: tuple[Volume, Volume] | None = None,
    progress: Progress | None = None,
) -> PreparedPair:
    """The first stage of :func:`register`: affine pre-alignment (with ``settings.affine``)
    and framing of the pair, and of its (fixed, moving) ``labels`` when the settings use them.
    """
    start = time.perf_counter()
    affine_ras, stages, warnings = np.eye(4), (), ()
    if settings.affine:
        if progress is not None:
            progress("affine", 0, 1)
        affine_ras, stages, warnings = pre_align(fixed, moving, settings.allow_affine_failure)
        if progress is not None:
            progress("affine", 1, 1)
    pair = frame_pair(frame, fixed, in_fixed_world(moving, affine_ras), device)
    framed_labels = None
    if labels is not None and settings.guided:
        framed_labels = (
            frame_labels(frame, labels[0], pair.affine, device),
            frame_labels(frame, in_fixed_world(labels[1], affine_ras), pair.affine, device),
        )
    return PreparedPair(
        fixed_volume=fixed,
        moving_volume=moving,
        fixed=pair.fixed,
        moving=pair.moving,
        frame_affine=pair.affine,
        affine_ras=affine_ras,
        stages=stages,
        warnings=warnings,
        device=device,
        labels=framed_labels,
        seconds=time.perf_counter() - start,
    )


def predict_batch(
    model: VitVNet, pairs: Sequence[PreparedPair], progress: Progress | None = None
) -> list[PreparedPair]:
    """The second stage of :func:`register`: one network call on the B ``pairs`` stacked.

    The pairs must share a frame shape and a device. Returns them with their ``output`` set
    (raw: a diffeomorphic model's velocity) and each one's ``seconds`` raised by 1/B of the
    call's time.
    """
    if not pairs:
        return []
    if len({(pair.fixed.shape, pair.device) for pair in pairs}) > 1:
        raise ValueError("predict_batch: the pairs differ in frame shape or device")
    start = time.perf_counter()
    if progress is not None:
        progress("network", 0, 1)
    network = model.to(pairs[0].device).eval()
    fixed = torch.cat([pair.fixed for pair in pairs])
    moving = torch.cat([pair.moving for pair in pairs])
    flows = predict_flow(network, fixed, moving, integrate=False)
    outputs = [flow.clone() for flow in flows.split(1)]  # one pair holds no other's memory
    if progress is not None:
        progress("network", 1, 1)
    share = (time.perf_counter() - start) / len(pairs)
    return [
        dataclasses.replace(pair, output=output, seconds=pair.seconds + share)
        for pair, output in zip(pairs, outputs, strict=True)
    ]


def finish_registration(
    pair: PreparedPair, settings: RegisterSettings, progress: Progress | None = None
) -> Registration:
    """The last stage of :func:`register`: test-time optimisation from the network output
    (from zero without one), the field back on the fixed image's native grid with the affine,
    the warped image, NCC before/after; ``seconds`` adds this stage's time to the pair's.
    """
    start = time.perf_counter()
    output = pair.output
    if output is None:
        output = torch.zeros(1, 3, *pair.fixed.shape[2:], device=pair.device)
    if settings.optimize > 0:
        output = optimize_flow(
            pair.fixed,
            pair.moving,
            output,
            settings.optimize,
            levels=settings.levels,
            smoothness=settings.smoothness,
            learning_rate=settings.learning_rate,
            progress=progress,
            similarity=settings.similarity,
            regularizer=settings.regularizer,
            velocity=settings.diffeo,
            integration_steps=settings.integration_steps,
            labels=pair.labels,
            dice_weight=settings.dice_weight,
        )
    fixed = pair.fixed_volume
    with torch.no_grad():
        flow = displacement_from_output(output, settings.diffeo, settings.integration_steps)
        ncc_before = -float(local_ncc(pair.fixed, pair.moving))
        ncc_after = -float(local_ncc(pair.fixed, warp(pair.moving, flow)))
        native = flow_to_native_mm(flow, pair.frame_affine, fixed)
        whole = with_affine(DisplacementField(disp_mm=native, grid=fixed), pair.affine_ras)
        warped = warp_image(pair.moving_volume, whole, pair.device)
    return Registration(
        warped=warped,
        field=DisplacementField(disp_mm=whole.disp_mm.cpu(), grid=fixed),
        flow_vox=flow.cpu(),
        frame_affine=pair.frame_affine,
        ncc_before=ncc_before,
        ncc_after=ncc_after,
        seconds=pair.seconds + time.perf_counter() - start,
        device=str(pair.device),
        affine_ras=pair.affine_ras,
        velocity_vox=output.cpu() if settings.diffeo else None,
        integration_steps=settings.integration_steps,
        affine_stages=pair.stages,
        warnings=pair.warnings,
    )


def register(
    fixed: Volume,
    moving: Volume,
    model: VitVNet | None = None,
    frame: ModelFrame | None = None,
    optimize: int = 0,
    smoothness: float = 5.0,
    device: str = "auto",
    progress: Progress | None = None,
    affine: bool = True,
    allow_affine_failure: bool = False,
    diffeo: bool = False,
    integration_steps: int = 7,
    levels: Sequence[int] = (4, 2),
    similarity: str = "ncc",
    regularizer: str = "diffusion",
    learning_rate: float = 0.2,
    labels: tuple[Volume, Volume] | None = None,
    dice_weight: float = 0.0,
    settings: RegisterSettings | None = None,
) -> Registration:
    """Register ``moving`` to ``fixed``.

    With ``affine`` (default) an affine pre-alignment (moments, rigid, affine by mutual
    information; :mod:`vitreg.affine`) maps the moving image into the model frame, which is
    centred on the fixed head; otherwise both must already be roughly aligned in world space.
    ``model`` predicts the dense part in its ``frame`` (the checkpoint's); ``optimize`` steps of
    test-time optimisation refine it (see :func:`optimize_flow` for ``levels``, ``similarity``,
    ``regularizer``, ``smoothness``, ``learning_rate``; ``labels`` (fixed, moving) with
    ``dice_weight`` > 0 add Dice guidance), or start from zero when ``model`` is None.
    ``diffeo``: the network output and the optimised field are stationary velocities,
    integrated by scaling and squaring (``integration_steps``); a model trained
    diffeomorphically (``config.int_steps`` > 0) turns it on with its own step count. The
    result lives on the fixed image's native grid and its field includes the affine.

    ``settings`` gives all those options in one :class:`RegisterSettings` instead (then the
    option keywords must keep their defaults).

    The stages, for many pairs: :func:`prepare_pair`, :func:`predict_batch` (several pairs
    in one network call) and :func:`finish_registration`.
    """
    options = dict(
        optimize=optimize,
        smoothness=smoothness,
        affine=affine,
        allow_affine_failure=allow_affine_failure,
        diffeo=diffeo,
        integration_steps=integration_steps,
        levels=levels,
        similarity=similarity,
        regularizer=regularizer,
        learning_rate=learning_rate,
        dice_weight=dice_weight,
    )
    settings = settings_from(settings, options)
    settings.check_labels(labels)
    torch_device = choose_device(device)
    frame = frame or ModelFrame()
    settings = settings.checked(model, frame)
    prepared = prepare_pair(fixed, moving, frame, settings, torch_device, labels, progress)
    if model is not None:
        (prepared,) = predict_batch(model, [prepared], progress)
    return finish_registration(prepared, settings, progress)


def invert(
    result: Registration, moving: Volume, iterations: int = INVERSE_ITERATIONS
) -> InverseField:
    """The moving-to-fixed map of ``result`` on ``moving``'s grid (the inverse of its field).

    The dense part is inverted in the model frame: exactly as the exponential of the negated
    velocity in diffeomorphic mode, else by the fixed-point iteration w <- -u(x + w) on a grid
    of half the frame's resolution (at most ``iterations`` times, until no update exceeds 0.01
    voxel); the affine is inverted exactly. Moving point y maps to ``z + w(z)`` with
    ``z = A^-1(y)``; outside the frame w is zero, as u is.
    """
    flow = result.flow_vox
    if result.velocity_vox is not None:
        inverse = integrate_velocity(-result.velocity_vox, result.integration_steps)
    else:
        # Half resolution: the optimised fields are that smooth, and it is 8x cheaper.
        half = [max(2, n // INVERSE_SHRINK) for n in flow.shape[2:]]
        coarse = resize_flow(flow, half, align_corners=False)
        inverse = -coarse
        for _ in range(iterations):
            previous, inverse = inverse, -warp(coarse, inverse, padding="border")
            if float((inverse - previous).abs().max()) < INVERSE_TOLERANCE_VOX:
                break
        inverse = resize_flow(inverse, flow.shape[2:], align_corners=False)
    with torch.no_grad():
        residual_vox = compose(inverse, flow)  # u(x) + w(x + u(x))
        residual_mm = flow_vox_to_mm(residual_vox, result.frame_affine)
        residual = torch.linalg.vector_norm(residual_mm, dim=1)
        moving_in_fixed_world = in_fixed_world(moving, result.affine_ras)
        dense = flow_to_native_mm(inverse, result.frame_affine, moving_in_fixed_world)
        back = np.linalg.inv(result.affine_ras)
        disp = affine_displacement(moving, back) + dense
    return InverseField(
        field=DisplacementField(disp_mm=disp, grid=moving),
        residual_mean_mm=float(residual.mean()),
        residual_max_mm=float(residual.max()),
        exact=result.velocity_vox is not None,
    )
