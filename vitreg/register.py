"""The Python API: register a moving image to a fixed one with ViT-V-Net and/or optimisation."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitreg.affine import estimate_affine, in_fixed_world, mirror_advantage
from vitreg.device import choose_device
from vitreg.errors import OptionError, VitregError
from vitreg.field import DisplacementField, affine_displacement, warp_image, with_affine
from vitreg.frame import (
    ModelFrame,
    flow_to_native_mm,
    foreground_mask,
    frame_labels,
    frame_mask,
    frame_pair,
)
from vitreg.image import Volume
from vitreg.losses import local_ncc_map, regularizer_function, similarity_function
from vitreg.nets.vitvnet import VitVNet
from vitreg.optimize import (
    CostMasks,
    GreedySchedule,
    check_levels,
    greedy_optimize,
    optimize_flow,
    split_by_factor,
    split_evenly,
)
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


OPTIMIZERS = ("greedy", "adam")
OTHER = {"greedy": "adam", "adam": "greedy"}
GREEDY = GreedySchedule()
"""The greedy optimiser's defaults, its schedule from a zero field among them."""
AFTER_NETWORK = ((2, 1), (20, 5))
"""The greedy optimiser's default (levels, iterations) after a network's prediction."""
ADAM_LEVELS = (4, 2)
ADAM_STEPS = 100
ADAM_OPTIONS = ("smoothness", "similarity", "regularizer", "learning_rate", "dice_weight")
GREEDY_OPTIONS = (
    "window", "sigma_update", "sigma_field", "sigma_field_full", "coarse_field", "compositive"
)  # fmt: skip
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
    framed pair (after the affine), without and with ``u``; ``head_ncc_before`` and
    ``head_ncc_after``: the same over the fixed head's voxels only (inside the fixed
    cost-function mask when one was given). ``mirror_advantage``: how much better the
    left-right mirrored moving image fits after its own affine
    (:func:`vitreg.affine.mirror_advantage`), None without a successful affine.
    ``warnings``: for the user. ``network``: whether a network predicted ``u`` first;
    ``optimisation``: what refined it (``optimizer``, ``levels``, ``iterations``; empty when
    nothing did).
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
    network: bool = False
    optimisation: dict = dataclasses.field(default_factory=dict)
    head_ncc_before: float | None = None
    head_ncc_after: float | None = None
    mirror_advantage: float | None = None


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
    fixed: Volume,
    moving: Volume,
    allow_failure: bool = False,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    check_flip: bool = False,
) -> tuple[np.ndarray, tuple[str, ...], tuple[str, ...], float | None]:
    """Affine pre-alignment (RAS 4x4 fixed world -> moving world), its stages and warnings,
    and, with ``check_flip`` (one more affine estimate), how much better the left-right
    mirrored moving image fits (:func:`vitreg.affine.mirror_advantage`; None without
    ``check_flip`` or where the affine failed).

    A failure raises VitregError naming both files, unless ``allow_failure``: then the
    centring (or, when even that failed, the identity) is used with a warning. The
    cost-function masks, when given, go to :func:`vitreg.affine.estimate_affine`.
    """
    names = f"{fixed.path}, {moving.path}"
    hint = "use {affine=False}, or {allow_affine_failure=True} to go on with the centring only"
    try:
        result = estimate_affine(fixed, moving, fixed_mask, moving_mask)
    except VitregError as error:
        if not allow_failure:
            raise VitregError(f"{error.message}; {hint}") from None
        return np.eye(4), (), (f"affine pre-alignment skipped: {error}",), None
    if result.failure is None:
        mirror = None
        if check_flip:
            mirror = mirror_advantage(fixed, moving, result.metric_final, fixed_mask, moving_mask)
        return result.affine_ras, tuple(result.stages), (), mirror
    if not allow_failure:
        raise VitregError(f"{names}: affine pre-alignment failed: {result.failure}; {hint}")
    warning = f"affine pre-alignment failed ({result.failure}); going on with the centring only"
    return result.affine_ras, tuple(result.stages), (warning,), None


@dataclass(frozen=True)
class RegisterSettings:
    """How :func:`register` treats a pair: everything but the images, model, frame and device.

    The fields are :func:`register`'s options of the same names. The test-time optimisation:

    - ``optimizer``: 'greedy' (the default: :func:`vitreg.optimize.greedy_optimize`, local
      NCC over ``window``^3 voxels, Gaussian smoothing of the update and of the field with
      ``sigma_update`` and ``sigma_field`` voxels (``sigma_field_full`` at full resolution;
      None: 0.5 for composed updates without masks, else ``sigma_field``), ``coarse_field``
      at full resolution,
      updates composed with the field or, without ``compositive``, added to it) or
      'adam' (:func:`vitreg.optimize.optimize_flow`: ``similarity`` + ``smoothness`` x
      ``regularizer``, ``learning_rate``, Dice guidance with ``dice_weight``).
    - ``levels``: downsampling factors, coarse to fine (None: the optimiser's default);
      ``iterations``: the iterations at each level; else ``optimize``: their total (split
      over the levels in proportion to the factors for 'greedy', evenly for 'adam'; 0 turns
      the optimisation off); both None: the optimiser's default schedule (a shorter one
      after a network, :data:`AFTER_NETWORK`).

    Making the settings checks each value and their combinations (an OptionError names the
    parameter); :meth:`check_labels` checks them against the label maps given, and
    :meth:`checked` against a model and its frame.
    """

    optimize: int | None = None
    smoothness: float = 5.0
    affine: bool = True
    allow_affine_failure: bool = False
    diffeo: bool = False
    integration_steps: int = 7
    levels: Sequence[int] | None = None
    similarity: str = "ncc"
    regularizer: str = "diffusion"
    learning_rate: float = 0.2
    dice_weight: float = 0.0
    optimizer: str = "greedy"
    iterations: Sequence[int] | None = None
    window: int = GREEDY.window
    sigma_update: float = GREEDY.sigma_update
    sigma_field: float = GREEDY.sigma_field
    sigma_field_full: float | None = GREEDY.sigma_field_full
    coarse_field: bool = GREEDY.coarse_field
    compositive: bool = GREEDY.compositive
    check_flip: bool = False

    def __post_init__(self) -> None:
        for option in (
            "optimize", "smoothness", "dice_weight", "sigma_update", "sigma_field",
            "sigma_field_full",
        ):  # fmt: skip
            if (getattr(self, option) or 0) < 0:
                raise OptionError(option, getattr(self, option), "must be >= 0")
        for option in ("learning_rate", "integration_steps"):
            if getattr(self, option) <= 0:
                raise OptionError(option, getattr(self, option), "must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError("optimizer", self.optimizer, f"expected {' or '.join(OPTIMIZERS)}")
        similarity_function(self.similarity)
        regularizer_function(self.regularizer)
        if self.levels is not None:
            object.__setattr__(self, "levels", check_levels(self.levels, None))
        if self.iterations is not None:
            object.__setattr__(self, "iterations", tuple(int(n) for n in self.iterations))
            if any(n < 0 for n in self.iterations):
                raise OptionError("iterations", self.iterations, "must be >= 0")
            if len(self.iterations) != len(self.levels or self._default(False)[0]):
                raise OptionError(
                    "iterations", self.iterations, "expected one number per level of {levels}"
                )
        self._check_optimizer_options()
        if self.dice_weight > 0 and self.optimize == 0:
            raise OptionError(
                "dice_weight",
                self.dice_weight,
                "Dice guidance acts in the optimisation: give {optimize} > 0",
            )

    def _check_optimizer_options(self) -> None:
        """OptionError for an option of the other optimiser than ``optimizer``."""
        defaults = RegisterSettings.__dataclass_fields__
        foreign = ADAM_OPTIONS if self.optimizer == "greedy" else GREEDY_OPTIONS
        for option in foreign:
            if getattr(self, option) != defaults[option].default:
                raise OptionError(
                    option,
                    getattr(self, option),
                    f"applies to the other optimiser; give {{optimizer}}='{OTHER[self.optimizer]}'",
                )

    def _default(self, network: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The optimiser's default (levels, iterations), after a network or from zero."""
        if self.optimizer == "adam":
            return ADAM_LEVELS, tuple(split_evenly(ADAM_STEPS, len(ADAM_LEVELS)))
        return AFTER_NETWORK if network else (GREEDY.levels, GREEDY.iterations)

    def plan(self, network: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The optimisation's (levels, iterations at each level); ``network``: it starts from
        a network's output. No iterations at all when ``optimize`` is 0."""
        default_levels, default_iterations = self._default(network)
        levels = tuple(self.levels) if self.levels is not None else default_levels
        if self.iterations is not None:
            return levels, tuple(self.iterations)
        if self.optimize is None and levels == default_levels:
            return levels, default_iterations
        total = sum(default_iterations) if self.optimize is None else self.optimize
        if self.optimizer == "adam":
            return levels, tuple(split_evenly(total, len(levels)))
        return levels, tuple(split_by_factor(total, levels))

    def greedy_schedule(self, network: bool) -> GreedySchedule:
        """The greedy engine's schedule for these settings."""
        levels, iterations = self.plan(network)
        return GreedySchedule(
            levels=levels,
            iterations=iterations,
            window=self.window,
            sigma_update=self.sigma_update,
            sigma_field=self.sigma_field,
            sigma_field_full=self.sigma_field_full,
            diffeo=self.diffeo,
            integration_steps=self.integration_steps,
            coarse_field=self.coarse_field,
            compositive=self.compositive,
        )

    def to_dict(self) -> dict:
        """The settings as a plain JSON-able dict (sequences as lists)."""
        values = dataclasses.asdict(self)
        for key in ("levels", "iterations"):
            values[key] = None if values[key] is None else list(values[key])
        return values

    def check_masks(self, fixed_mask: object | None, moving_mask: object | None) -> None:
        """OptionError when cost-function masks go to an optimiser that cannot use them (the
        'adam' engine: only 'greedy' weights its similarity by masks)."""
        if self.optimizer != "adam" or self.optimize == 0:
            return
        for option, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
            if mask is not None:
                given = getattr(mask, "path", mask)
                raise OptionError(option, given, "cost-function masks need {optimizer}='greedy'")

    def check_labels(self, labels: object | None) -> None:
        """OptionError when Dice guidance (``dice_weight`` > 0) has no label maps to use."""
        if self.dice_weight > 0 and labels is None:
            raise OptionError("dice_weight", self.dice_weight, "needs {labels} (fixed, moving)")

    @property
    def guided(self) -> bool:
        """Whether the optimisation uses label maps (Dice guidance)."""
        return self.optimize != 0 and self.dice_weight > 0

    def checked(self, model: VitVNet | None, frame: ModelFrame) -> RegisterSettings:
        """These settings checked against ``model`` and ``frame``; a model trained
        diffeomorphically (``config.int_steps`` > 0) sets ``diffeo`` and its step count."""
        levels, _ = self.plan(model is not None)
        check_levels(levels, frame.shape)
        if self.optimizer == "greedy" and any(min(frame.shape) // f < self.window for f in levels):
            raise OptionError(
                "levels", levels, f"too coarse for a {self.window}^3 window in {frame.shape}"
            )
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
    """``value`` as RegisterSettings stores field ``name`` (sequences as tuples)."""
    return tuple(value) if name in ("levels", "iterations") and value is not None else value


@dataclass(frozen=True)
class PreparedPair:
    """A pair after the affine pre-alignment and the framing (:func:`prepare_pair`).

    ``fixed_volume``/``moving_volume``: the images as given (native grids). ``fixed`` and
    ``moving``: (1, 1, D, H, W) float32 in [0, 1] on the frame grid ``frame_affine`` (4x4,
    voxel -> RAS mm), on ``device``; the moving one read through ``affine_ras`` (4x4 RAS mm,
    fixed world -> moving world; the identity without pre-alignment). ``stages`` and
    ``warnings``: the affine's. ``labels``: the framed (fixed, moving) label maps, each
    (1, 1, D, H, W) int64, for Dice guidance, else None. ``masks``: the framed cost-function
    masks (the moving one read through ``affine_ras`` like the moving image).
    ``mirror_advantage``: see :class:`Registration`. ``output``: the
    network's raw output (1, 3, D, H, W) voxels (a velocity in diffeomorphic mode) once
    :func:`predict_batch` ran, else None. ``seconds``: the time spent on the pair so far.
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
    masks: CostMasks = CostMasks()
    mirror_advantage: float | None = None


def prepare_pair(
    fixed: Volume,
    moving: Volume,
    frame: ModelFrame,
    settings: RegisterSettings,
    device: torch.device,
    labels: tuple[Volume, Volume] | None = None,
    progress: Progress | None = None,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
) -> PreparedPair:
    """The first stage of :func:`register`: affine pre-alignment (with ``settings.affine``)
    and framing of the pair, of its (fixed, moving) ``labels`` when the settings use them,
    and of its cost-function masks (``fixed_mask`` on the fixed grid, ``moving_mask`` on the
    moving one; nonzero inside), which the affine step honours too.
    """
    start = time.perf_counter()
    affine_ras, stages, warnings, mirror = np.eye(4), (), (), None
    if settings.affine:
        if progress is not None:
            progress("affine", 0, 1)
        affine_ras, stages, warnings, mirror = pre_align(
            fixed, moving, settings.allow_affine_failure, fixed_mask, moving_mask,
            settings.check_flip,
        )  # fmt: skip
        if progress is not None:
            progress("affine", 1, 1)
    pair = frame_pair(frame, fixed, in_fixed_world(moving, affine_ras), device)
    framed_labels = None
    if labels is not None and settings.guided:
        framed_labels = (
            frame_labels(frame, labels[0], pair.affine, device),
            frame_labels(frame, in_fixed_world(labels[1], affine_ras), pair.affine, device),
        )
    masks = CostMasks(
        fixed=None if fixed_mask is None else frame_mask(frame, fixed_mask, pair.affine, device),
        moving=None
        if moving_mask is None
        else frame_mask(frame, in_fixed_world(moving_mask, affine_ras), pair.affine, device),
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
        masks=masks,
        mirror_advantage=mirror,
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
    network = pair.output is not None
    levels, iterations = settings.plan(network)
    if sum(iterations) > 0 and settings.optimizer == "greedy":
        schedule = settings.greedy_schedule(network)
        output = greedy_optimize(
            pair.fixed, pair.moving, output, schedule, progress, masks=pair.masks
        )
    elif sum(iterations) > 0:
        output = optimize_flow(
            pair.fixed,
            pair.moving,
            output,
            iterations,
            levels=levels,
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
        head = head_region(pair)
        cc_before = local_ncc_map(pair.fixed, pair.moving)
        ncc_before, head_ncc_before = float(cc_before.mean()), float(cc_before[head].mean())
        del cc_before
        cc_after = local_ncc_map(pair.fixed, warp(pair.moving, flow))
        ncc_after, head_ncc_after = float(cc_after.mean()), float(cc_after[head].mean())
        del cc_after
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
        head_ncc_before=head_ncc_before,
        head_ncc_after=head_ncc_after,
        mirror_advantage=pair.mirror_advantage,
        network=network,
        optimisation=_optimisation_record(settings.optimizer, levels, iterations),
    )


def _optimisation_record(optimizer: str, levels: Sequence[int], iterations: Sequence[int]) -> dict:
    """What refined the field, for the record (empty when no iteration ran)."""
    if sum(iterations) == 0:
        return {}
    return {"optimizer": optimizer, "levels": list(levels), "iterations": list(iterations)}


def head_region(pair: PreparedPair) -> torch.Tensor:
    """The fixed head's voxels in the frame, (1, 1, D, H, W) bool: the foreground of the
    framed fixed image (:func:`vitreg.frame.foreground_mask`), within the fixed cost-function
    mask when there is one; every voxel if that leaves none."""
    head = torch.from_numpy(foreground_mask(pair.fixed.cpu().numpy())).to(pair.device)
    if pair.masks.fixed is not None:
        head &= pair.masks.fixed > 0.5
    return head if bool(head.any()) else torch.ones_like(head)


def register(
    fixed: Volume,
    moving: Volume,
    model: VitVNet | None = None,
    frame: ModelFrame | None = None,
    optimize: int | None = None,
    smoothness: float = 5.0,
    device: str = "auto",
    progress: Progress | None = None,
    affine: bool = True,
    allow_affine_failure: bool = False,
    diffeo: bool = False,
    integration_steps: int = 7,
    levels: Sequence[int] | None = None,
    similarity: str = "ncc",
    regularizer: str = "diffusion",
    learning_rate: float = 0.2,
    labels: tuple[Volume, Volume] | None = None,
    dice_weight: float = 0.0,
    settings: RegisterSettings | None = None,
    optimizer: str = "greedy",
    iterations: Sequence[int] | None = None,
    window: int = GREEDY.window,
    sigma_update: float = GREEDY.sigma_update,
    sigma_field: float = GREEDY.sigma_field,
    sigma_field_full: float | None = GREEDY.sigma_field_full,
    coarse_field: bool = GREEDY.coarse_field,
    fixed_mask: Volume | None = None,
    moving_mask: Volume | None = None,
    check_flip: bool = False,
) -> Registration:
    """Register ``moving`` to ``fixed``.

    With ``affine`` (default) an affine pre-alignment (moments, rigid, affine by mutual
    information; :mod:`vitreg.affine`) maps the moving image into the model frame, which is
    centred on the fixed head; otherwise both must already be roughly aligned in world space.
    ``model`` predicts the dense part in its ``frame`` (the checkpoint's); test-time
    optimisation refines it, or starts from zero when ``model`` is None: by default the greedy
    local-NCC optimiser with its default schedule (a short one after a network); ``optimize=0``
    turns it off. :class:`RegisterSettings` explains ``optimizer``, ``levels``,
    ``iterations``, ``optimize`` and each optimiser's options (``window``, ``sigma_update``,
    ``sigma_field``, ``sigma_field_full``, ``coarse_field``; ``similarity``, ``regularizer``,
    ``smoothness``, ``learning_rate``, and ``labels`` (fixed, moving) with ``dice_weight`` > 0
    for Dice guidance). ``fixed_mask`` and ``moving_mask``: cost-function masks, binary images
    on the fixed and the moving image's grid (nonzero inside): voxels outside them do not drive the
    similarity, in the affine step or in the greedy optimisation, and the field there follows
    from the smoothing (lesions, resection cavities, electrodes). ``diffeo``: the network
    output and the optimised field are stationary velocities, integrated by scaling and
    squaring (``integration_steps``); a model trained diffeomorphically (``config.int_steps``
    > 0) turns it on with its own step count. The result lives on the fixed image's native
    grid and its field includes the affine. ``check_flip``: also fit the left-right mirrored
    moving image (one more affine; ``Registration.mirror_advantage``, a QC indicator).

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
        optimizer=optimizer,
        iterations=iterations,
        window=window,
        sigma_update=sigma_update,
        sigma_field=sigma_field,
        sigma_field_full=sigma_field_full,
        coarse_field=coarse_field,
        check_flip=check_flip,
    )
    settings = settings_from(settings, options)
    settings.check_labels(labels)
    settings.check_masks(fixed_mask, moving_mask)
    torch_device = choose_device(device)
    frame = frame or ModelFrame()
    settings = settings.checked(model, frame)
    prepared = prepare_pair(
        fixed, moving, frame, settings, torch_device, labels, progress, fixed_mask, moving_mask
    )
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
