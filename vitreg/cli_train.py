"""``vitreg train``: the training command (a thin layer on :func:`vitreg.train.train`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from vitreg.console import (
    DeviceOption,
    JsonOption,
    QuietOption,
    say,
    show_result,
    train_progress,
    user_errors,
)

DataArgument = Annotated[
    Path, typer.Argument(help="CSV (image[,labels][,split] or fixed,moving,...) or a folder.")
]
OutputOption = Annotated[Path, typer.Option("-o", "--output", help="Folder for the run.")]
AtlasOption = Annotated[
    Path | None, typer.Option(help="Pair every image with this atlas (it is the fixed image).")
]
AtlasMovingOption = Annotated[
    bool, typer.Option(help="The atlas is the moving image (the IXI protocol).")
]
EpochsOption = Annotated[int, typer.Option(help="Epochs (the paper: 500).")]
BatchSizeOption = Annotated[int, typer.Option(help="Pairs per step and process.")]
LrOption = Annotated[float, typer.Option(help="Adam learning rate (poly decay, power 0.9).")]
SimilarityOption = Annotated[
    str, typer.Option(help="mse (the paper), ncc (local 9^3), mi, or none (labels only).")
]
RegWeightOption = Annotated[float, typer.Option(help="Weight of the diffusion term.")]
DiceWeightOption = Annotated[
    float, typer.Option(help="Weight of a soft Dice loss on the labels (0: off).")
]
IntStepsOption = Annotated[
    int, typer.Option(help="Diffeomorphic: integrate a velocity in N steps (0: off).")
]
FlipOption = Annotated[bool, typer.Option(help="Random flips along each axis.")]
DropoutOption = Annotated[float, typer.Option(help="Dropout of the transformer.")]
SeedOption = Annotated[int, typer.Option(help="Random seed.")]
ValFractionOption = Annotated[
    float, typer.Option(help="Held out for validation when no row says 'val'.")
]
SizeOption = Annotated[
    tuple[int, int, int], typer.Option(help="Frame grid D H W (multiples of 32).")
]
SpacingOption = Annotated[tuple[float, float, float], typer.Option(help="Frame voxel mm.")]
OrientationOption = Annotated[str, typer.Option(help="Frame axis codes, e.g. LIA.")]
ConfigOption = Annotated[
    Path | None, typer.Option(help="JSON of ViT-V-Net config fields to change.")
]
InitOption = Annotated[
    str | None, typer.Option(help="Start from this checkpoint (its config and frame).")
]
CacheOption = Annotated[Path | None, typer.Option(help="Cache folder (default OUTPUT/cache).")]
ResumeOption = Annotated[
    bool, typer.Option(help="Continue OUTPUT's run with the options it started with.")
]
MaxMinutesOption = Annotated[
    float | None, typer.Option(help="Save and stop after this many minutes.")
]
NoBf16Option = Annotated[bool, typer.Option("--no-bf16", help="No bf16 autocast on CUDA.")]
CheckpointOption = Annotated[
    bool, typer.Option(help="Recompute activations in the backward pass: less memory, more time.")
]


def train(
    data: DataArgument,
    output: OutputOption,
    atlas: AtlasOption = None,
    atlas_moving: AtlasMovingOption = False,
    epochs: EpochsOption = 500,
    batch_size: BatchSizeOption = 2,
    lr: LrOption = 1e-4,
    similarity: SimilarityOption = "mse",
    reg_weight: RegWeightOption = 0.02,
    dice_weight: DiceWeightOption = 0.0,
    int_steps: IntStepsOption = 0,
    flip: FlipOption = True,
    dropout: DropoutOption = 0.1,
    seed: SeedOption = 0,
    val_fraction: ValFractionOption = 0.1,
    size: SizeOption = (160, 192, 224),
    spacing: SpacingOption = (1.0, 1.0, 1.0),
    orientation: OrientationOption = "LIA",
    config: ConfigOption = None,
    init: InitOption = None,
    cache: CacheOption = None,
    resume: ResumeOption = False,
    max_minutes: MaxMinutesOption = None,
    no_bf16: NoBf16Option = False,
    checkpoint_activations: CheckpointOption = False,
    device: DeviceOption = "auto",
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Train ViT-V-Net with the paper's recipe; resumable; torchrun for several GPUs.

    Writes OUTPUT/best.safetensors (by validation Dice) and last.safetensors, which
    'vitreg register --weights' takes directly, metrics.csv, curves.png and state.safetensors
    (for --resume). Several GPUs: torchrun --nproc-per-node 4 -m vitreg.cli train ...
    The paper's run is 500 epochs of 160x192x224 1 mm frames (the defaults), on a GPU; the
    example trains a small network for two epochs on the example pair, on the CPU.

    [bold]Example:[/bold] vitreg train examples/pairs.csv -o run1 --epochs 2
    --size 32 32 32 --spacing 6 6 6 --config examples/small_vitvnet.json --device cpu
    """
    interrupted = f"the state is saved after each epoch: --resume continues {output}'s run"
    with user_errors(interrupted=interrupted):
        from vitreg.frame import ModelFrame
        from vitreg.nets.vitvnet import VitVNetConfig
        from vitreg.train import TrainRecipe
        from vitreg.train import train as run_training

        recipe = TrainRecipe(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            flip=flip,
            dropout=dropout,
            similarity=similarity,
            reg_weight=reg_weight,
            dice_weight=dice_weight,
            int_steps=int_steps,
            seed=seed,
            bf16=not no_bf16,
            checkpoint_activations=checkpoint_activations,
            val_fraction=val_fraction,
        )
        frame = ModelFrame(orientation=orientation.upper(), spacing=spacing, shape=size)
        net_config = VitVNetConfig.from_json_file(config) if config is not None else None
        reports = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
        quiet = quiet or not reports
        if resume:
            say(quiet, f"resuming {output / 'state.safetensors'} with its recorded options")
        with train_progress(quiet) as progress:
            result = run_training(
                data, output, recipe, frame=frame, config=net_config, init=init, atlas=atlas,
                atlas_is_moving=atlas_moving, cache=cache, resume=resume,
                max_minutes=max_minutes, device=device, progress=progress,
            )  # fmt: skip
    if not reports:
        return
    if result.stopped_early:
        say(quiet, f"time budget used; continue: vitreg train {data} -o {output} --resume")
    summary = result.summary()
    show_result("vitreg train", [(k, str(v)) for k, v in summary.items()], summary, as_json, quiet)
