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
CPU), and rank 0 validates and writes.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
from vitreg.errors import VitregError
from vitreg.frame import ModelFrame, frame_affine
from vitreg.image import atomic_path
from vitreg.losses import diffusion, local_ncc, mse, soft_dice
from vitreg.metrics import dice_per_label, folding, jacobian_determinant
from vitreg.nets.vitvnet import VitVNet, VitVNetConfig, load_state_dict
from vitreg.register import choose_device
from vitreg.transform import warp, warp_labels
from vitreg.weights import read_checkpoint, save_checkpoint

STATE_FILE = "state.safetensors"
STATE_FORMAT = "vitreg-train-state-1"
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
    linear layers. Loss: ``similarity`` (``mse``, ``ncc`` local 9^3, or ``none`` for training on
    labels alone, as with synthetic contrasts) + ``reg_weight`` x
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
        if self.similarity not in ("mse", "ncc", "none"):
            raise VitregError(f"--similarity {self.similarity}: expected mse, ncc or none")
        if self.similarity == "none" and self.dice_weight <= 0:
            raise VitregError("--similarity none trains on labels alone: give --dice-weight > 0")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise VitregError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.reg_weight < 0 or self.dice_weight < 0 or not 0 <= self.dropout < 1:
            raise VitregError("loss weights must be >= 0 and 0 <= dropout < 1")
        if self.int_steps < 0:
            raise VitregError(f"--int-steps {self.int_steps}: expected >= 0")

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


# ---------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one unless under torchrun)."""

    rank: int
    world: int
    device: torch.device
    started_group: bool

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        return self.rank == 0


def start_processes(device: str) -> Processes:
    """Join torchrun's process group if WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch_device = choose_device(device)
    if world == 1:
        return Processes(rank=0, world=1, device=torch_device, started_group=False)
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(torch_device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(
            backend="nccl" if torch_device.type == "cuda" else "gloo",
            # rank 0 validates and writes while the others wait at a barrier
            timeout=datetime.timedelta(hours=2),
        )
    return Processes(rank=rank, world=world, device=torch_device, started_group=started)


def _barrier(processes: Processes) -> None:
    if processes.distributed:
        torch.distributed.barrier()


def _gather(processes: Processes, value: object) -> list:
    """``value`` of every process, by rank."""
    if not processes.distributed:
        return [value]
    gathered: list = [None] * processes.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _mean_over_processes(processes: Processes, total: float, count: int) -> float:
    """Sum of ``total`` over processes divided by the sum of ``count``."""
    if processes.distributed:
        values = torch.tensor([total, float(count)], dtype=torch.float64, device=processes.device)
        torch.distributed.all_reduce(values)
        total, count = float(values[0]), int(values[1])
    return total / max(count, 1)


def _rank0_says(processes: Processes, flag: bool) -> bool:
    """Rank 0's ``flag``, on every process (so all stop at the same step)."""
    if not processes.distributed:
        return flag
    value = torch.tensor([int(flag)], device=processes.device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


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
    problems = [p for rank_problems in _gather(processes, problems) for p in rank_problems]
    if problems:
        raise VitregError(f"{dataset.origin}: {len(problems)} bad row(s): " + "; ".join(problems))
    _barrier(processes)
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
    if recipe.similarity == "mse":
        similarity = mse(batch.fixed, warped)
    elif recipe.similarity == "ncc":
        similarity = local_ncc(batch.fixed, warped)
    else:  # label-driven training (synthetic contrasts): Dice alone says what aligns
        similarity = torch.zeros((), device=flow.device)
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
                jacdet = jacobian_determinant(flow[index].cpu().numpy())
                folded.append(folding(jacdet).percent_nonpositive)
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
# Training state: safetensors for tensors, JSON for the rest, one file written atomically


def capture_rng(data_generator: torch.Generator, device: torch.device) -> dict:
    """This process's RNG states: python, numpy, torch (CPU and CUDA) and the data generator."""
    version, python_state, gauss = random.getstate()
    _, numpy_keys, numpy_pos, has_gauss, numpy_gauss = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
    }
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    extra = {
        "python_version": version,
        "python_gauss": gauss,
        "numpy_pos": int(numpy_pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(numpy_gauss),
    }
    return {"tensors": tensors, "extra": extra}


def restore_rng(rng: dict, data_generator: torch.Generator, device: torch.device) -> None:
    """Inverse of :func:`capture_rng`."""
    tensors, extra = rng["tensors"], rng["extra"]
    torch.set_rng_state(tensors["torch"])
    data_generator.set_state(tensors["data"])
    python_state = tuple(int(v) for v in tensors["python"].tolist())
    random.setstate((extra["python_version"], python_state, extra["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            tensors["numpy"].numpy().astype(np.uint32),
            extra["numpy_pos"],
            extra["numpy_has_gauss"],
            extra["numpy_gauss"],
        )
    )
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)


def save_state(
    path: Path,
    model: VitVNet,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng_by_rank: list[dict],
    info: dict,
) -> None:
    """Write the training state atomically (one safetensors file, JSON in its metadata)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
    rng_extra = []
    for rank, rng in enumerate(rng_by_rank):
        for name, value in rng["tensors"].items():
            tensors[f"rng.{rank}.{name}"] = value.cpu().contiguous()
        rng_extra.append(rng["extra"])  # includes the rank's running loss of the epoch
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    metadata = {
        "format": STATE_FORMAT,
        "vitreg_version": __version__,
        "state": json.dumps(
            {
                **info,
                "optimizer_groups": optimizer_state["param_groups"],
                "scheduler": scheduler_state,
                "rng_extra": rng_extra,
            }
        ),
    }
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON part and the tensors of a training-state file."""
    if not path.is_file():
        raise VitregError(f"{path}: no training state to resume from")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise VitregError(f"{path}: not a readable training state ({error})") from None
    if metadata.get("format") != STATE_FORMAT:
        raise VitregError(f"{path}: not a vitreg training state (format {metadata.get('format')})")
    return json.loads(metadata["state"]), tensors


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, info: dict, tensors: dict[str, torch.Tensor]
) -> None:
    """Load Adam's moments and parameter groups saved by :func:`save_state`."""
    state: dict[int, dict] = {}
    for key, value in _prefixed(tensors, "optimizer.").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()}
        for group in info["optimizer_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------------------------------------
# Outputs


def write_metrics(path: Path, history: list[dict]) -> None:
    """``metrics.csv``: one row per epoch (empty cells where a value does not exist)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_COLUMNS})
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), newline="")


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
        from vitreg.weights import resolve

        checkpoint = read_checkpoint(resolve(str(init), progress=False))
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
    output = Path(output)
    processes = start_processes(device)
    try:
        return _train(
            data=data,
            output=output,
            recipe=recipe or TrainRecipe(),
            frame=frame or ModelFrame(),
            config=config,
            init=init,
            atlas=atlas,
            atlas_is_moving=atlas_is_moving,
            val_pairs=val_pairs,
            cache=Path(cache) if cache else None,
            resume=resume,
            max_minutes=max_minutes,
            processes=processes,
            progress=progress if processes.writes else None,
        )
    finally:
        if processes.started_group:
            torch.distributed.destroy_process_group()


def _train(
    data: str | Path | PairSource,
    output: Path,
    recipe: TrainRecipe,
    frame: ModelFrame,
    config: VitVNetConfig | None,
    init: str | Path | None,
    atlas: str | Path | None,
    atlas_is_moving: bool,
    val_pairs: Sequence[TrainBatch],
    cache: Path | None,
    resume: bool,
    max_minutes: float | None,
    processes: Processes,
    progress: TrainProgress | None,
) -> TrainResult:
    start = time.monotonic()
    state_path = output / STATE_FILE
    saved, saved_tensors = read_state(state_path) if resume else (None, {})
    if saved is not None:
        recipe = TrainRecipe.from_dict(saved["recipe"])
        frame = ModelFrame.from_dict(saved["frame"])
        model = VitVNet(VitVNetConfig.from_dict(saved["config"]))
    else:
        if state_path.exists():
            raise VitregError(
                f"{output}: holds a training run already; continue it with --resume or choose "
                "another output folder"
            )
        torch.manual_seed(recipe.seed)  # the initial weights (DDP copies rank 0's anyway)
        model, frame = build_network(recipe, frame, config, init)
    model.checkpoint_activations(recipe.checkpoint_activations)
    if max_minutes is not None and max_minutes <= 0:
        raise VitregError(f"--max-minutes {max_minutes}: expected > 0")
    if isinstance(data, str | Path):  # every file checked before anything is written
        dataset = read_dataset(data, atlas, atlas_is_moving, recipe.val_fraction)
        pair_indices(dataset)
        centre_mm = check_files(dataset)
    if processes.writes:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise VitregError(f"{output}: cannot create the folder ({error.strerror})") from None
    _barrier(processes)

    data_info: dict = {"origin": "pair source"}
    if isinstance(data, str | Path):
        source, val_pairs, data_info = prepare_data(
            dataset, centre_mm, output, recipe, frame, processes, cache, progress
        )
    else:
        source = data
    data_info["pairs_per_epoch"] = source.pairs_per_epoch
    if saved is not None and saved["data"]["pairs_per_epoch"] != source.pairs_per_epoch:
        raise VitregError(
            f"{output}: the data changed since the run started ({source.pairs_per_epoch} pairs "
            f"per epoch now, {saved['data']['pairs_per_epoch']} then)"
        )
    if not processes.writes:
        val_pairs = ()

    torch.manual_seed(recipe.seed * 1009 + processes.rank)
    random.seed(recipe.seed * 1009 + processes.rank)
    np.random.seed((recipe.seed * 1009 + processes.rank) % 2**32)
    data_generator = torch.Generator().manual_seed(recipe.seed * 7919 + processes.rank)
    model = model.to(processes.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, amsgrad=recipe.amsgrad)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: max(0.0, 1 - epoch / recipe.epochs) ** recipe.lr_power
    )
    epoch, step, history, best = 0, 0, [], None
    loss_sum, loss_count = 0.0, 0
    if saved is not None:
        load_state_dict(model, _prefixed(saved_tensors, "model."))
        restore_optimizer(optimizer, saved, saved_tensors)
        scheduler.load_state_dict({**saved["scheduler"], "lr_lambdas": [None]})
        epoch, step, history, best = saved["epoch"], saved["step"], saved["history"], saved["best"]
        if saved["world"] == processes.world:
            extra = saved["rng_extra"][processes.rank]
            loss_sum, loss_count = extra["loss_sum"], extra["loss_count"]
            rng = {"tensors": _prefixed(saved_tensors, f"rng.{processes.rank}."), "extra": extra}
            restore_rng(rng, data_generator, processes.device)
        # with another number of processes, each keeps the fresh streams seeded above
        del saved_tensors
    net = model
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        model = DistributedDataParallel(net, device_ids=device_ids)

    steps_per_epoch = math.ceil(source.pairs_per_epoch / (recipe.batch_size * processes.world))
    deadline = start + 60 * max_minutes if max_minutes else None
    paths = {name: output / f"{name}.safetensors" for name in ("last", "best")}

    def checkpoint_recipe(row: dict | None) -> dict:
        details = {"trained_by": f"vitreg {__version__} train", "data": data_info["origin"]}
        if row is not None:
            details.update(
                {k: row[k] for k in ("epoch", "val_dice", "val_folding_percent") if k in row}
            )
        return {**recipe.to_dict(), **details}

    def write_state(next_epoch: int, next_step: int) -> None:
        """Gather every process's RNG states and running loss; rank 0 writes the state."""
        rng = capture_rng(data_generator, processes.device)
        rng["extra"].update(loss_sum=loss_sum, loss_count=loss_count)
        rng_by_rank = _gather(processes, rng)
        if processes.writes:
            info = {
                "epoch": next_epoch,
                "step": next_step,
                "world": processes.world,
                "history": history,
                "best": best,
                "recipe": recipe.to_dict(),
                "frame": frame.to_dict(),
                "config": net.config.to_dict(),
                "data": data_info,
            }
            save_state(state_path, net, optimizer, scheduler, rng_by_rank, info)

    if processes.writes and history:
        write_metrics(output / "metrics.csv", history)
        plot_curves(output / "curves.png", history)
    stopped_early = False
    while epoch < recipe.epochs and not stopped_early:
        epoch_start = time.monotonic()
        model.train()
        while step < steps_per_epoch:
            global_step = epoch * steps_per_epoch + step
            batch = source.batch(
                global_step * processes.world + processes.rank,
                recipe.batch_size,
                data_generator,
                processes.device,
            )
            loss = train_step(model, optimizer, batch, recipe)
            loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
            step += 1
            if progress is not None:
                progress(
                    "train",
                    step,
                    steps_per_epoch,
                    {"epoch": epoch + 1, "epochs": recipe.epochs, "loss": loss_sum / loss_count},
                )
            out_of_time = deadline is not None and time.monotonic() > deadline
            if deadline is not None and _rank0_says(processes, out_of_time):
                stopped_early = True
                break
        if stopped_early and step < steps_per_epoch:
            write_state(epoch, step)
            if processes.writes:
                save_checkpoint(paths["last"], net, frame, checkpoint_recipe(None))
            break
        train_loss = _mean_over_processes(processes, loss_sum, loss_count)
        if processes.writes:
            row = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                **validate(net, val_pairs, recipe, processes.device, progress),
            }
            row["seconds"] = round(time.monotonic() - epoch_start, 3)
            history.append(row)
            score = _score(row)
            if best is None or score["score"] > best["score"]:
                best = {"epoch": epoch + 1, **score}
                save_checkpoint(paths["best"], net, frame, checkpoint_recipe(row))
            save_checkpoint(paths["last"], net, frame, checkpoint_recipe(row))
        epoch, step, loss_sum, loss_count = epoch + 1, 0, 0.0, 0
        scheduler.step()
        write_state(epoch, 0)
        if processes.writes:
            write_metrics(output / "metrics.csv", history)
            plot_curves(output / "curves.png", history)
            if progress is not None:
                progress("epoch", epoch, recipe.epochs, history[-1])
        _barrier(processes)
    return TrainResult(
        output=output,
        epochs_done=epoch,
        epochs=recipe.epochs,
        best_epoch=best["epoch"] if best else None,
        best_metric=best["metric"] if best else "",
        best_value=best["value"] if best else None,
        stopped_early=stopped_early,
        history=history,
        last=paths["last"],
        best=paths["best"],
        state=state_path,
    )
