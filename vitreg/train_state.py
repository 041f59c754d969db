"""Where a training run stands, saved so that it continues exactly after a stop or a crash.

One file, ``state.safetensors``, in the container checkpoints use (:mod:`vitreg.container`):
the model's weights, Adam's moments and every process's RNG states as tensors; the counters,
the history, the recipe, frame, config and data description, the scheduler and the rest as
JSON. Nothing is pickled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vitreg.container import read_container, write_container
from vitreg.ddp import Processes, gather
from vitreg.nets.vitvnet import VitVNet, load_state_dict

STATE_FILE = "state.safetensors"
STATE_FORMAT = "vitreg-train-state-1"


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


def read_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON part and the tensors of a training-state file."""
    fields, tensors = read_container(path, STATE_FORMAT, "vitreg training state")
    return fields["state"], tensors


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class TrainState:
    """A run's position and the objects that carry what it learnt.

    ``epoch`` and ``step``: the next step to take (the step within the epoch). ``history``:
    the finished epochs' metrics rows; ``best``: the best epoch so far (``epoch``,
    ``metric``, ``value``, ``score``). ``loss_sum`` over ``loss_count`` steps: this process's
    running training loss in the epoch. ``model`` is the bare network (not DDP's wrapper).
    """

    model: VitVNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_generator: torch.Generator
    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    loss_sum: float = 0.0
    loss_count: int = 0

    def save(self, path: Path, processes: Processes, info: dict) -> None:
        """Gather every process's RNG states and running loss; rank 0 writes ``path``, with
        ``info`` (recipe, frame, config, data) beside the counters."""
        rng = capture_rng(self.data_generator, processes.device)
        rng["extra"].update(loss_sum=self.loss_sum, loss_count=self.loss_count)
        rng_by_rank = gather(processes, rng)
        if not processes.writes:
            return
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        optimizer_state = self.optimizer.state_dict()
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                tensors[f"optimizer.{index}.{name}"] = value
        for rank, rank_rng in enumerate(rng_by_rank):
            for name, value in rank_rng["tensors"].items():
                tensors[f"rng.{rank}.{name}"] = value
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {
            **info,
            "epoch": self.epoch,
            "step": self.step,
            "world": processes.world,
            "history": self.history,
            "best": self.best,
            "optimizer_groups": optimizer_state["param_groups"],
            "scheduler": scheduler,
            "rng_extra": [rank_rng["extra"] for rank_rng in rng_by_rank],
        }
        write_container(path, tensors, STATE_FORMAT, {"state": state})

    def restore(self, info: dict, tensors: dict[str, torch.Tensor], processes: Processes) -> None:
        """Continue from a saved state (:func:`read_state`): weights, Adam, scheduler and
        counters; this process's RNG streams too when the number of processes is the same
        (otherwise each process keeps the fresh streams it was seeded with)."""
        load_state_dict(self.model, _prefixed(tensors, "model."))
        moments: dict[int, dict] = {}
        for key, value in _prefixed(tensors, "optimizer.").items():
            index, name = key.split(".", 1)
            moments.setdefault(int(index), {})[name] = value
        groups = [
            {k: tuple(v) if k == "betas" else v for k, v in group.items()}
            for group in info["optimizer_groups"]
        ]
        self.optimizer.load_state_dict({"state": moments, "param_groups": groups})
        self.scheduler.load_state_dict({**info["scheduler"], "lr_lambdas": [None]})
        self.epoch, self.step = info["epoch"], info["step"]
        self.history, self.best = info["history"], info["best"]
        if info["world"] == processes.world:
            extra = info["rng_extra"][processes.rank]
            self.loss_sum, self.loss_count = extra["loss_sum"], extra["loss_count"]
            rng = {"tensors": _prefixed(tensors, f"rng.{processes.rank}."), "extra": extra}
            restore_rng(rng, self.data_generator, processes.device)
