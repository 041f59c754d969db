"""Training on several processes (torchrun): who this process is, and the collectives the
training loop uses. With one process every helper is a no-op."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from vitreg.device import choose_device

RANK0_TIMEOUT = datetime.timedelta(hours=2)
"""How long the others wait at a barrier while rank 0 validates and writes."""


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
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=RANK0_TIMEOUT)
    return Processes(rank=rank, world=world, device=torch_device, started_group=started)


def stop_processes(processes: Processes) -> None:
    """Leave the process group this process started, if any."""
    if processes.started_group:
        torch.distributed.destroy_process_group()


def barrier(processes: Processes) -> None:
    """Wait for every process."""
    if processes.distributed:
        torch.distributed.barrier()


def gather(processes: Processes, value: object) -> list:
    """``value`` of every process, by rank."""
    if not processes.distributed:
        return [value]
    gathered: list = [None] * processes.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def mean_over_processes(processes: Processes, total: float, count: int) -> float:
    """Sum of ``total`` over processes divided by the sum of ``count``."""
    if processes.distributed:
        values = torch.tensor([total, float(count)], dtype=torch.float64, device=processes.device)
        torch.distributed.all_reduce(values)
        total, count = float(values[0]), int(values[1])
    return total / max(count, 1)


def rank0_says(processes: Processes, flag: bool) -> bool:
    """Rank 0's ``flag``, on every process (so all stop at the same step)."""
    if not processes.distributed:
        return flag
    value = torch.tensor([int(flag)], device=processes.device)
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


def wrap_model(model: torch.nn.Module, processes: Processes) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if not processes.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [processes.device.index] if processes.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
