"""Training ViT-V-Net: the paper's recipe, exact resume, one process or many (torchrun).

:func:`train` reads the data (:mod:`vitreg.data`), frames it once into a cache, and runs the
loop. Batches come from a pair source (see :mod:`vitreg.data`), so a synthetic source can
replace the files. What lands in the output folder (rank 0 writes, nobody else):

- ``last.safetensors``, ``best.safetensors`` (highest validation Dice; lowest validation
  loss without labels; lowest training loss without validation pairs): vitreg checkpoints
  that ``vitreg register --weights PATH`` uses directly;
- ``state.safetensors``: everything needed to continue exactly (model, Adam moments, scheduler,
  every process's RNG states and data generator, epoch, step, history), tensors as safetensors
  and the rest as JSON in its metadata; written atomically after every epoch, and when
  ``max_minutes`` runs out (mid-epoch). Nothing is pickled.
- ``metrics.csv`` and ``curves.png``, re-drawn from the history after every epoch;
- ``cache/``: the framed arrays (``.npy``, memory-mapped), shared with later runs.

Under ``torchrun --nproc-per-node N`` each process draws its own batches (the effective batch
is N x batch_size), gradients are averaged by DistributedDataParallel (NCCL on CUDA, gloo on
CPU; :mod:`vitreg.ddp`), and rank 0 validates and writes. The state file is
:mod:`vitreg.train_state`'s.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitreg import __version__
from vitreg.data import (
    CachedPairs,
    Dataset,
    PairSource,
    TrainBatch,
    build_cache_entry,
    cache_entries,
    cache_folder,
    check_files,
    open_cache_entry,
    pair_indices,
    read_dataset,
)
from vitreg.ddp import (
    Processes,
    barrier,
    gather,
    mean_over_processes,
    rank0_says,
    start_processes,
    stop_processes,
    wrap_model,
)
from vitreg.errors import OptionError, VitregError
from vitreg.files import atomic_path, make_folder, write_csv
from vitreg.frame import ModelFrame, frame_affine
from vitreg.losses import diffusion, similarity_function, soft_dice
from vitreg.metrics import dice_per_label, jacobian_folding
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig, load_state_dict
from vitreg.train_state import STATE_FILE, TrainState, read_state
from vitreg.transform import warp, warp_labels
from vitreg.weights import read_checkpoint, resolve, save_checkpoint

METRIC_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_dice",
    "val_folding_percent",
    "seconds",
)

TrainProgress = Callable[[str, int, int, dict], None]
"""Called as ``progress(stage, done, total, info)``: stage ``prepare`` (caching files),
``train`` (steps of an epoch; info has ``epoch``, ``epochs`` and ``loss``), ``validate``, and
``epoch`` once per finished epoch (info is the metrics row)."""


@dataclass(frozen=True)
class TrainRecipe:
    """How to train; the defaults are the paper's (ViT-V-Net, Chen et al. 2021, Table 2).

    Adam (``amsgrad`` as the official code) at ``lr``, decayed per epoch as
    lr * (1 - epoch / epochs) ** ``lr_power``; ``batch_size`` pairs per step and process;
    random flips along each axis (the same for both images); ``dropout`` in the transformer's
    linear layers. Loss: ``similarity`` (``mse``, ``ncc`` local 9^3, ``mi``, or ``none`` for
    training on labels alone, as with synthetic contrasts) + ``reg_weight`` x
    diffusion of the flow (voxels) + ``dice_weight`` x soft Dice of the one-hot labels warped
    trilinearly (only for pairs with labels). ``int_steps`` > 0 makes the network output a
    velocity integrated by scaling and squaring (diffeomorphic). ``bf16``: autocast on CUDA.
    ``checkpoint_activations``: recompute each network stage in the backward pass instead of
    keeping its activations (22 % less memory and 19 % more time for a full-size CPU
    step in benchmarks/train_step.py; the same gradients).
    ``val_fraction`` of the rows are held out when the data names no validation rows.
    """

    epochs: int = 500
    batch_size: int = 2
    lr: float = 1e-4
    amsgrad: bool = True
    lr_power: float = 0.9
    flip: bool = True
    dropout: float = 0.1
    similarity: str = "mse"
    reg_weight: float = 0.02
    dice_weight: float = 0.0
    int_steps: int = 0
    seed: int = 0
    bf16: bool = True
    checkpoint_activations: bool = False
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.similarity != "none":
            similarity_function(self.similarity)
        elif self.dice_weight <= 0:
            raise OptionError(
                "similarity", "none", "trains on labels alone: give {dice_weight} > 0"
            )
        for option in ("epochs", "batch_size"):
            if getattr(self, option) < 1:
                raise OptionError(option, getattr(self, option), "must be >= 1")
        for option in ("reg_weight", "dice_weight", "int_steps"):
            if getattr(self, option) < 0:
                raise OptionError(option, getattr(self, option), "must be >= 0")
        if self.lr <= 0:
            raise OptionError("lr", self.lr, "must be > 0")
        if not 0 <= self.dropout < 1:
            raise OptionError("dropout", self.dropout, "expected 0 <= dropout < 1")

    def to_dict(self) -> dict:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainRecipe:
        """Inverse of :meth:`to_dict` (unknown keys ignored, so older states still load)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: epochs completed (of ``recipe.epochs``), the best epoch and its
    score, whether ``max_minutes`` stopped it, and the files written."""

    output: Path
    epochs_done: int
    epochs: int
    best_epoch: int | None
    best_metric: str
    best_value: float | None
    stopped_early: bool
    history: list[dict]
    last: Path
    best: Path
    state: Path

    def summary(self) -> dict:
        """The result without the history, JSON-able, for reports."""
        best_value = None if self.best_value is None else round(self.best_value, 6)
        return {
            "output": str(self.output),
            "epochs_done": self.epochs_done,
            "epochs": self.epochs,
            "stopped_early": self.stopped_early,
            "best_epoch": self.best_epoch,
            "best_metric": self.best_metric,
            "best_value": best_value,
            "best": str(self.best),
            "last": str(self.last),
        }


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(
    dataset: Dataset,
    centre_mm: np.ndarray,
    output: Path,
    recipe: TrainRecipe,
    frame: ModelFrame,
    processes: Processes,
    cache: str | Path | None = None,
    progress: TrainProgress | None = None,
) -> tuple[CachedPairs, Sequence[TrainBatch], dict]:
    """Frame every file into the cache (work shared among processes), open the pair source.

    ``centre_mm`` is the frame grid's world centre (from :func:`vitreg.data.check_files`).
    Returns the training pair source, the validation pairs and a description for the state.
    """
    items, partners, val_pairs, _files = pair_indices(dataset)
    grid_affine = frame_affine(frame, centre_mm)
    entries = cache_entries(dataset, frame, grid_affine, cache_folder(output, cache))
    problems = []
    for number, entry in enumerate(entries):
        if number % processes.world == processes.rank:
            try:
                build_cache_entry(entry, frame, grid_affine)
            except VitregError as error:
                where = f"{entry.item.where}: " if entry.item.where else ""
                problems.append(f"{where}{error}")
        if progress is not None:
            progress("prepare", number + 1, len(entries), {})
    problems = [p for rank_problems in gather(processes, problems) for p in rank_problems]
    if problems:
        raise VitregError(f"{dataset.origin}: {len(problems)} bad row(s): " + "; ".join(problems))
    barrier(processes)
    source = CachedPairs(
        [open_cache_entry(e) for e in entries], items, partners, recipe.seed, recipe.flip
    )
    description = {
        "origin": str(dataset.origin),
        "mode": dataset.mode,
        "files": len(entries),
        "pairs_per_epoch": source.pairs_per_epoch,
        "val_pairs": len(val_pairs),
        "grid_affine": grid_affine.tolist(),
    }
    return source, source.validation(val_pairs), description


# ---------------------------------------------------------------------------------------------
# Losses and validation


def _one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, 1, D, H, W) class indices -> (B, classes, D, H, W) float one-hot."""
    return F.one_hot(labels[:, 0], classes).permute(0, 4, 1, 2, 3).float()


def pair_loss(
    recipe: TrainRecipe, batch: TrainBatch, flow: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, similarity term) of a batch and its flow (B, 3, D, H, W) voxels."""
    warped = warp(batch.moving, flow)
    if recipe.similarity == "none":  # label-driven training (synthetic contrasts)
        similarity = torch.zeros((), device=flow.device)
    else:
        similarity = similarity_function(recipe.similarity)(batch.fixed, warped)
    loss = similarity + recipe.reg_weight * diffusion(flow)
    if recipe.dice_weight > 0 and batch.fixed_labels is not None and batch.num_classes > 1:
        fixed_onehot = _one_hot(batch.fixed_labels, batch.num_classes)
        warped_onehot = warp(_one_hot(batch.moving_labels, batch.num_classes), flow)
        # class 0 is the background
        loss = loss + recipe.dice_weight * soft_dice(fixed_onehot[:, 1:], warped_onehot[:, 1:])
    return loss, similarity


def _autocast(recipe: TrainRecipe, device: torch.device):
    return torch.autocast(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=recipe.bf16 and device.type == "cuda",
    )


def _flow(model: torch.nn.Module, batch: TrainBatch, recipe: TrainRecipe) -> torch.Tensor:
    """The network's flow (B, 3, D, H, W) voxels in float32 (bf16 autocast on CUDA)."""
    with _autocast(recipe, batch.fixed.device):
        flow = model(torch.cat([batch.moving, batch.fixed], dim=1))
    return flow.float()


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: TrainBatch, recipe: TrainRecipe
) -> torch.Tensor:
    """One optimisation step on ``batch``; returns the (detached) loss."""
    loss, _ = pair_loss(recipe, batch, _flow(model, batch, recipe))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def validate(
    model: VitVNet,
    pairs: Sequence[TrainBatch],
    recipe: TrainRecipe,
    device: torch.device,
    progress: TrainProgress | None = None,
) -> dict:
    """Mean validation loss, Dice (labels warped by nearest neighbour; None without labels)
    and % voxels with det(J) <= 0 over ``pairs``."""
    if len(pairs) == 0:
        return {"val_loss": None, "val_dice": None, "val_folding_percent": None}
    model.eval()
    losses, dice, folded = [], [], []
    with torch.no_grad():
        for number in range(len(pairs)):
            pair = pairs[number]
            batch = TrainBatch(
                fixed=pair.fixed.to(device),
                moving=pair.moving.to(device),
                fixed_labels=None if pair.fixed_labels is None else pair.fixed_labels.to(device),
                moving_labels=None if pair.moving_labels is None else pair.moving_labels.to(device),
                num_classes=pair.num_classes,
            )
            flow = _flow(model, batch, recipe)
            losses.append(float(pair_loss(recipe, batch, flow)[0]))
            for index in range(flow.shape[0]):
                _, fold = jacobian_folding(flow[index].cpu().numpy())
                folded.append(fold.percent_nonpositive)
            if batch.fixed_labels is not None:
                warped = warp_labels(batch.moving_labels, flow)
                for index in range(flow.shape[0]):
                    dice.append(dice_per_label(batch.fixed_labels[index, 0], warped[index, 0]).mean)
            if progress is not None:
                progress("validate", number + 1, len(pairs), {})
    return {
        "val_loss": float(np.mean(losses)),
        "val_dice": float(np.mean(dice)) if dice else None,
        "val_folding_percent": float(np.mean(folded)),
    }


def _score(row: dict) -> dict:
    """What 'best' means for a metrics row: the metric, its value and a score to maximise."""
    if row["val_dice"] is not None:
        return {"metric": "val_dice", "value": row["val_dice"], "score": row["val_dice"]}
    name = "val_loss" if row["val_loss"] is not None else "train_loss"
    return {"metric": name, "value": row[name], "score": -row[name]}


# ---------------------------------------------------------------------------------------------
# Outputs


def write_metrics(path: Path, history: list[dict]) -> None:
    """``metrics.csv``: one row per epoch (empty cells where a value does not exist)."""
    write_csv(path, history, METRIC_COLUMNS)


def plot_curves(path: Path, history: list[dict]) -> None:
    """``curves.png``: losses, validation Dice and folding per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]

    def series(name: str) -> list[float]:
        return [math.nan if row.get(name) is None else row[name] for row in history]

    figure = Figure(figsize=(12, 3.6), layout="constrained")
    axes = figure.subplots(1, 3)
    axes[0].plot(epochs, series("train_loss"), marker=".", label="train")
    axes[0].plot(epochs, series("val_loss"), marker=".", label="validation")
    axes[0].set(title="loss", xlabel="epoch")
    axes[0].legend()
    axes[1].plot(epochs, series("val_dice"), marker=".", color="tab:green")
    axes[1].set(title="validation Dice", xlabel="epoch")
    axes[2].plot(epochs, series("val_folding_percent"), marker=".", color="tab:red")
    axes[2].set(title="% det(J) <= 0 (validation)", xlabel="epoch")
    for axis in axes:
        axis.grid(alpha=0.3)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)


# ---------------------------------------------------------------------------------------------
# The loop


def build_network(
    recipe: TrainRecipe,
    frame: ModelFrame,
    config: VitVNetConfig | None = None,
    init: str | Path | None = None,
) -> tuple[VitVNet, ModelFrame]:
    """The network to train: ``config`` (default: the published one), or the architecture and
    weights of checkpoint ``init`` (fine-tuning; its frame too), sized to the frame grid with
    the recipe's dropout and integration steps."""
    state = None
    if init is not None:
        checkpoint = read_checkpoint(resolve(str(init)))
        config, frame, state = checkpoint.config, checkpoint.frame, checkpoint.state_dict
    config = replace(
        config or VitVNetConfig(),
        img_size=tuple(frame.shape),
        dropout_rate=recipe.dropout,
        int_steps=recipe.int_steps,
    )
    model = VitVNet(config)
    if state is not None:
        load_state_dict(model, state)
    return model, frame


def train(
    data: str | Path | PairSource,
    output: str | Path,
    recipe: TrainRecipe | None = None,
    *,
    frame: ModelFrame | None = None,
    config: VitVNetConfig | None = None,
    init: str | Path | None = None,
    atlas: str | Path | None = None,
    atlas_is_moving: bool = False,
    val_pairs: Sequence[TrainBatch] = (),
    cache: str | Path | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    device: str = "auto",
    progress: TrainProgress | None = None,
) -> TrainResult:
    """Train ViT-V-Net on ``data`` (a CSV or data folder, see :mod:`vitreg.data`, or a pair
    source with ``val_pairs``) into the folder ``output``.

    With ``resume`` the run continues from ``output/state.safetensors`` with the recipe, frame
    and config it was started with (the arguments are then ignored). ``max_minutes`` stops
    after the step that runs past the budget, with the state saved.
    """
    start, output = time.monotonic(), Path(output)
    if max_minutes is not None and max_minutes <= 0:
        raise OptionError("max_minutes", max_minutes, "expected > 0")
    processes = start_processes(device)
    progress = progress if processes.writes else None
    try:
        saved = read_state(output / STATE_FILE) if resume else None
        recipe, frame, network = _network(
            output, recipe or TrainRecipe(), frame, config, init, saved
        )
        network.checkpoint_activations(recipe.checkpoint_activations)
        source, val_pairs, data_info = _open_data(
            data, output, recipe, frame, (atlas, atlas_is_moving, val_pairs, cache), processes,
            progress,
        )  # fmt: skip
        if saved is not None and saved[0]["data"]["pairs_per_epoch"] != source.pairs_per_epoch:
            raise VitregError(
                f"{output}: the data changed since the run started ({source.pairs_per_epoch} "
                f"pairs per epoch now, {saved[0]['data']['pairs_per_epoch']} then)"
            )
        run = _Run(
            output=output,
            recipe=recipe,
            frame=frame,
            processes=processes,
            source=source,
            val_pairs=val_pairs if processes.writes else (),
            data_info=data_info,
            state=_initial_state(network, recipe, processes, saved),
            deadline=start + 60 * max_minutes if max_minutes else None,
            progress=progress,
        )
        return run.loop()
    finally:
        stop_processes(processes)


def _network(
    output: Path,
    recipe: TrainRecipe,
    frame: ModelFrame | None,
    config: VitVNetConfig | None,
    init: str | Path | None,
    saved: tuple[dict, dict] | None,
) -> tuple[TrainRecipe, ModelFrame, VitVNet]:
    """The recipe, frame and network of the run: a saved state's, else new ones."""
    if saved is not None:
        info = saved[0]
        model = VitVNet(VitVNetConfig.from_dict(info["config"]))
        return TrainRecipe.from_dict(info["recipe"]), ModelFrame.from_dict(info["frame"]), model
    if (output / STATE_FILE).exists():
        raise VitregError(
            f"{output}: holds a training run already; continue it with {{resume=True}} or "
            "choose another output folder"
        )
    torch.manual_seed(recipe.seed)  # the initial weights (DDP copies rank 0's anyway)
    model, frame = build_network(recipe, frame or ModelFrame(), config, init)
    return recipe, frame, model


def _open_data(
    data: str | Path | PairSource,
    output: Path,
    recipe: TrainRecipe,
    frame: ModelFrame,
    options: tuple,
    processes: Processes,
    progress: TrainProgress | None,
) -> tuple[PairSource, Sequence[TrainBatch], dict]:
    """The pair source, validation pairs and data description of ``data``.

    ``options`` are (atlas, atlas_is_moving, val_pairs, cache). Files are read and every one
    checked before anything is written; then rank 0 creates ``output`` and the files are
    framed into the cache. A pair source comes with its own ``val_pairs``.
    """
    atlas, atlas_is_moving, val_pairs, cache = options
    dataset = None
    if isinstance(data, str | Path):
        dataset = read_dataset(data, atlas, atlas_is_moving, recipe.val_fraction)
        pair_indices(dataset)
        centre_mm = check_files(dataset)
    if processes.writes:
        make_folder(output, "folder")
    barrier(processes)
    if dataset is None:
        return data, val_pairs, {"origin": "pair source", "pairs_per_epoch": data.pairs_per_epoch}
    cache = Path(cache) if cache else None
    return prepare_data(dataset, centre_mm, output, recipe, frame, processes, cache, progress)


def _initial_state(
    network: VitVNet, recipe: TrainRecipe, processes: Processes, saved: tuple[dict, dict] | None
) -> TrainState:
    """Seed this process, put the network on its device with Adam and the poly schedule, and
    continue from ``saved`` (a state read by :func:`read_state`) if given."""
    seed = recipe.seed * 1009 + processes.rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    data_generator = torch.Generator().manual_seed(recipe.seed * 7919 + processes.rank)
    model = network.to(processes.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, amsgrad=recipe.amsgrad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: max(0.0, 1 - epoch / recipe.epochs) ** recipe.lr_power
    )
    state = TrainState(model, optimizer, scheduler, data_generator)
    if saved is not None:
        state.restore(*saved, processes)
    return state


@dataclass
class _Run:
    """One training run, set up: what the loop reads, and the state it moves forward."""

    output: Path
    recipe: TrainRecipe
    frame: ModelFrame
    processes: Processes
    source: PairSource
    val_pairs: Sequence[TrainBatch]
    data_info: dict
    state: TrainState
    deadline: float | None
    progress: TrainProgress | None
    model: torch.nn.Module = field(init=False)  # the state's, in DDP's wrapper if distributed
    steps_per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.model = wrap_model(self.state.model, self.processes)
        per_step = self.recipe.batch_size * self.processes.world
        self.steps_per_epoch = math.ceil(self.source.pairs_per_epoch / per_step)

    def loop(self) -> TrainResult:
        """Epochs until the recipe's last, or until the time budget runs out."""
        state, stopped = self.state, False
        if self.processes.writes and state.history:
            self._write_history()
        while state.epoch < self.recipe.epochs and not stopped:
            epoch_start = time.monotonic()
            stopped = self._train_epoch()
            if stopped and state.step < self.steps_per_epoch:  # mid-epoch: save and stop
                self._save_state()
                if self.processes.writes:
                    self._save_checkpoint("last", None)
                break
            self._finish_epoch(epoch_start)
        return self._result(stopped)

    def _train_epoch(self) -> bool:
        """Steps until the epoch ends; True when the time budget stopped it."""
        state, processes = self.state, self.processes
        self.model.train()
        while state.step < self.steps_per_epoch:
            draw = (state.epoch * self.steps_per_epoch + state.step) * processes.world
            batch = self.source.batch(
                draw + processes.rank, self.recipe.batch_size, state.data_generator,
                processes.device,
            )  # fmt: skip
            loss = train_step(self.model, state.optimizer, batch, self.recipe)
            state.loss_sum, state.loss_count = state.loss_sum + loss.item(), state.loss_count + 1
            state.step += 1
            if self.progress is not None:
                info = {"epoch": state.epoch + 1, "epochs": self.recipe.epochs}
                info["loss"] = state.loss_sum / state.loss_count
                self.progress("train", state.step, self.steps_per_epoch, info)
            if self.deadline is not None:
                if rank0_says(processes, time.monotonic() > self.deadline):
                    return True
        return False

    def _finish_epoch(self, epoch_start: float) -> None:
        """Validate, keep the best and last checkpoints, step the schedule, save the state."""
        state, processes = self.state, self.processes
        train_loss = mean_over_processes(processes, state.loss_sum, state.loss_count)
        if processes.writes:
            row = {
                "epoch": state.epoch + 1,
                "step": (state.epoch + 1) * self.steps_per_epoch,
                "lr": state.optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                **validate(
                    state.model, self.val_pairs, self.recipe, processes.device, self.progress
                ),
            }
            row["seconds"] = round(time.monotonic() - epoch_start, 3)
            state.history.append(row)
            score = _score(row)
            if state.best is None or score["score"] > state.best["score"]:
                state.best = {"epoch": state.epoch + 1, **score}
                self._save_checkpoint("best", row)
            self._save_checkpoint("last", row)
        state.epoch, state.step, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        state.scheduler.step()
        self._save_state()
        if processes.writes:
            self._write_history()
            if self.progress is not None:
                self.progress("epoch", state.epoch, self.recipe.epochs, state.history[-1])
        barrier(processes)

    def _save_state(self) -> None:
        info = {
            "recipe": self.recipe.to_dict(),
            "frame": self.frame.to_dict(),
            "config": self.state.model.config.to_dict(),
            "data": self.data_info,
        }
        self.state.save(self.output / STATE_FILE, self.processes, info)

    def _save_checkpoint(self, name: str, row: dict | None) -> None:
        """``NAME.safetensors`` with the recipe, the data's origin and the epoch's scores."""
        details = {"trained_by": f"vitreg {__version__} train", "data": self.data_info["origin"]}
        if row is not None:
            keys = ("epoch", "val_dice", "val_folding_percent")
            details.update({k: row[k] for k in keys if k in row})
        recipe = {**self.recipe.to_dict(), **details}
        save_checkpoint(self.output / f"{name}.safetensors", self.state.model, self.frame, recipe)

    def _write_history(self) -> None:
        write_metrics(self.output / "metrics.csv", self.state.history)
        plot_curves(self.output / "curves.png", self.state.history)

    def _result(self, stopped: bool) -> TrainResult:
        best = self.state.best
        return TrainResult(
            output=self.output,
            epochs_done=self.state.epoch,
            epochs=self.recipe.epochs,
            best_epoch=best["epoch"] if best else None,
            best_metric=best["metric"] if best else "",
            best_value=best["value"] if best else None,
            stopped_early=stopped,
            history=self.state.history,
            last=self.output / "last.safetensors",
            best=self.output / "best.safetensors",
            state=self.output / STATE_FILE,
        )
