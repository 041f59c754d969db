"""One pair from files to files: register it, assess it, write its outputs.

What ``vitreg register`` does in one call (:func:`register_pair`), and what each pair of
``vitreg register-batch`` goes through after its batched stages (:func:`finish_pair`), so
both write and measure a pair the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vitreg.assess import Assessment, assess
from vitreg.device import choose_device
from vitreg.errors import OptionError
from vitreg.exchange import (
    ants_files,
    check_affine_out,
    check_ants_prefix,
    save_affine_out,
    save_ants_transforms,
)
from vitreg.field import FLOW_FORMATS, check_flow_writable, save_flow, warp_labels_nearest
from vitreg.flags import Indicators, QcFlag, indicators, qc_flag
from vitreg.frame import ModelFrame
from vitreg.image import Volume, check_writable, label_dtype, save
from vitreg.nets.vitvnet import VitVNet
from vitreg.pairs import LoadedPair, Pair, load_pair
from vitreg.qc import check_png_writable, qc_figure
from vitreg.register import (
    InverseField,
    Progress,
    RegisterSettings,
    Registration,
    invert,
    register,
)
from vitreg.weights import load_model

OUTPUTS = ("warped", "flow", "inverse_flow", "affine_out", "warped_labels", "qc")
ANTS_OUTPUTS = ("ants_affine", "ants_warp", "ants_inverse_warp")


@dataclass(frozen=True)
class OutputPaths:
    """Where a pair's outputs go, all on the fixed grid but ``inverse_flow``; None: not written.

    ``warped``: the moving image warped. ``flow``: the pull field, in ``flow_format`` ('itk':
    ANTs/SimpleITK LPS mm; 'voxel': fixed-grid voxels; 'freesurfer': RAS mm as
    mri_synthmorph writes), as is ``inverse_flow`` (moving to fixed, on the moving grid).
    ``affine_out``: the affine pre-alignment as an ITK .mat/.tfm/.txt file or a FreeSurfer
    .lta. ``warped_labels``: the moving labels warped by nearest neighbour. ``qc``: the QC
    figure (PNG). ``ants_prefix``: the registration as antsRegistration writes it under that
    prefix (``PREFIX0GenericAffine.mat``, ``PREFIX1Warp.nii.gz``, and with ``inverse_flow``
    ``PREFIX1InverseWarp.nii.gz``; :func:`vitreg.exchange.save_ants_transforms`).
    """

    warped: Path
    flow: Path | None = None
    flow_format: str = "itk"
    inverse_flow: Path | None = None
    affine_out: Path | None = None
    warped_labels: Path | None = None
    qc: Path | None = None
    ants_prefix: str | Path | None = None

    @classmethod
    def in_folder(cls, out_dir: Path, name: str, labels: bool, qc: bool) -> OutputPaths:
        """register-batch's outputs of pair NAME in ``out_dir``: ``NAME_warped.nii.gz``,
        ``NAME_flow.nii.gz`` (ITK), with labels ``NAME_warped_labels.nii.gz``, with ``qc``
        ``NAME_qc.png``."""
        return cls(
            warped=out_dir / f"{name}_warped.nii.gz",
            flow=out_dir / f"{name}_flow.nii.gz",
            warped_labels=out_dir / f"{name}_warped_labels.nii.gz" if labels else None,
            qc=out_dir / f"{name}_qc.png" if qc else None,
        )

    def files(self) -> dict[str, Path]:
        """The outputs to write, by name (the ANTs files as ants_affine, ants_warp and
        ants_inverse_warp)."""
        files = {name: getattr(self, name) for name in OUTPUTS if getattr(self, name) is not None}
        if self.ants_prefix is not None:
            ants = ants_files(self.ants_prefix)
            files["ants_affine"], files["ants_warp"] = ants.affine, ants.warp
            if self.inverse_flow is not None:
                files["ants_inverse_warp"] = ants.inverse_warp
        return files

    def check(self, settings: RegisterSettings, labels: bool) -> None:
        """Raise before any work unless every output can be written and the settings make
        it (the affine needs the pre-alignment, warped labels need ``labels``)."""
        if self.flow_format not in FLOW_FORMATS:
            expected = " or ".join(FLOW_FORMATS)
            raise OptionError("flow_format", self.flow_format, f"expected {expected}")
        check_writable(self.warped)
        for path in (self.flow, self.inverse_flow):
            if path is not None:
                check_flow_writable(path, self.flow_format)
        if self.warped_labels is not None:
            check_writable(self.warped_labels)
            if not labels:
                raise OptionError("warped_labels", self.warped_labels, "needs {labels}")
        if self.qc is not None:
            check_png_writable(self.qc)
        if self.affine_out is not None:
            check_affine_out(self.affine_out)
            if not settings.affine:
                raise OptionError("affine_out", self.affine_out, "needs {affine=True}")
        if self.ants_prefix is not None:
            check_ants_prefix(self.ants_prefix)


@dataclass(frozen=True)
class RegisteredPair:
    """A pair registered, assessed and written.

    ``inverse``: the moving-to-fixed field when one was asked for. ``seconds``: the whole
    pair's time (registration, inversion, assessment and writing). ``indicators`` and
    ``flag``: the automatic QC (:mod:`vitreg.flags`).
    """

    loaded: LoadedPair
    registration: Registration
    assessment: Assessment
    inverse: InverseField | None
    seconds: float
    indicators: Indicators | None = None
    flag: QcFlag | None = None

    def summary(self) -> dict:
        """Rounded numbers for reports: NCC before/after, folding, SDlogJ, Dice before/after
        (with labels), the inverse's residual (with an inverse), seconds and the device, the
        QC flag, its reasons and indicators."""
        registration = self.registration
        row = {
            "ncc_before": round(registration.ncc_before, 4),
            "ncc_after": round(registration.ncc_after, 4),
            **self.assessment.summary(),
            "seconds": round(self.seconds, 2),
            "device": registration.device,
        }
        if self.inverse is not None:
            row["inverse_exact"] = self.inverse.exact
            row["inverse_residual_mean_mm"] = round(self.inverse.residual_mean_mm, 4)
            row["inverse_residual_max_mm"] = round(self.inverse.residual_max_mm, 4)
        if self.flag is not None:
            row.update(self.flag.to_dict())
        if self.indicators is not None:
            row.update(self.indicators.to_dict())
        return row


def finish_pair(
    loaded: LoadedPair, registration: Registration, paths: OutputPaths
) -> RegisteredPair:
    """Invert (when ``paths`` asks for the inverse), assess and write a registered pair."""
    start = time.perf_counter()
    inverse = invert(registration, loaded.moving) if paths.inverse_flow is not None else None
    assessment = assess(
        registration.field, loaded.fixed, loaded.labels, loaded.mask, loaded.true_field
    )
    values = indicators(registration, assessment, loaded.fixed, loaded.moving, loaded.mask)
    result = RegisteredPair(
        loaded, registration, assessment, inverse, registration.seconds, values, qc_flag(values)
    )
    write_outputs(result, paths)
    seconds = registration.seconds + time.perf_counter() - start
    return dataclasses.replace(result, seconds=seconds)


def write_outputs(result: RegisteredPair, paths: OutputPaths) -> dict[str, Path]:
    """Write every output ``paths`` names, each atomically; returns them by name.

    All or nothing: when one fails or the writing is interrupted (Ctrl-C), the outputs this
    call wrote are removed again, so no incomplete set of outputs is left.
    """
    written: list[Path] = []
    try:
        _write_each(result, paths, written.append)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return paths.files()


def _write_each(result: RegisteredPair, paths: OutputPaths, wrote: Callable[[Path], None]) -> None:
    """Write the outputs one by one, calling ``wrote(path)`` after each."""
    fixed, registration = result.loaded.fixed, result.registration
    wrote(save(paths.warped, registration.warped.astype("float32"), fixed))
    if paths.flow is not None:
        wrote(save_flow(paths.flow, registration.field, paths.flow_format))
    if paths.inverse_flow is not None:
        if result.inverse is None:
            raise ValueError("write_outputs: an inverse_flow path but no inverse field")
        wrote(save_flow(paths.inverse_flow, result.inverse.field, paths.flow_format))
    if paths.affine_out is not None:
        wrote(
            save_affine_out(paths.affine_out, registration.affine_ras, fixed, result.loaded.moving)
        )
    if paths.ants_prefix is not None:
        inverse = paths.inverse_flow is not None
        files = save_ants_transforms(paths.ants_prefix, registration, inverse=inverse)
        for path in (files.affine, files.warp, files.inverse_warp if inverse else None):
            if path is not None:
                wrote(path)
    if paths.warped_labels is not None and result.loaded.labels is not None:
        moving_labels = result.loaded.labels[1]
        warped_labels = warp_labels_nearest(moving_labels, registration.field)
        wrote(save(paths.warped_labels, warped_labels.astype(label_dtype(moving_labels)), fixed))
    if paths.qc is not None:
        warped = Volume(registration.warped, fixed.affine, fixed.header, paths.warped)
        pair = result.loaded.pair
        title = pair.name if pair.source is not None else None
        wrote(
            qc_figure(
                paths.qc, fixed, result.loaded.moving, warped, registration.field, title,
                assessment=result.assessment,
            )
        )  # fmt: skip


def register_pair(
    pair: Pair,
    paths: OutputPaths,
    model: VitVNet | str | Path | None = None,
    frame: ModelFrame | None = None,
    settings: RegisterSettings | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    offline: bool | None = None,
) -> RegisteredPair:
    """``vitreg register`` in one call: register ``pair`` and write ``paths``.

    Options and outputs are checked, then the files read, before the model is loaded and
    any long work starts. ``model`` is a network or a checkpoint name or path (which brings
    its own frame; 'none' or None: optimisation alone); ``offline`` forbids downloading it.
    The pair's labels, when given, are used for Dice (and for Dice guidance when
    ``settings.dice_weight`` > 0). ``progress`` sees ('read', 1, 1) once the files are read
    and checked, ('download', bytes done, total) and the registration's stages.
    """
    settings = settings or RegisterSettings()
    labels_given = pair.fixed_labels is not None and pair.moving_labels is not None
    settings.check_labels(True if labels_given else None)
    settings.check_masks(pair.fixed_mask, pair.moving_mask)
    paths.check(settings, labels_given)
    choose_device(device)
    loaded = load_pair(pair)
    if progress is not None:
        progress("read", 1, 1)
    network, frame = load_model(model, frame, offline, _download_progress(progress))
    registration = register(
        loaded.fixed,
        loaded.moving,
        model=network,
        frame=frame,
        device=device,
        progress=progress,
        labels=loaded.labels,
        settings=settings,
        fixed_mask=loaded.fixed_mask,
        moving_mask=loaded.moving_mask,
    )
    return finish_pair(loaded, registration, paths)


def _download_progress(progress: Progress | None):
    """A (bytes done, bytes total) callback that reports to ``progress`` as 'download'."""
    if progress is None:
        return None
    return lambda done, total: progress("download", done, total)
