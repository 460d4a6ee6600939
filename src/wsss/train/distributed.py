"""Process-group set-up for ``torchrun`` (NCCL on GPU, gloo on CPU) and small collective helpers.

Every helper is a no-op for a single process, so the engine calls them unconditionally. They are collectives:
every rank must call them at the same point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment; a no-op for one process.

    On CUDA each process first selects GPU ``LOCAL_RANK``, as NCCL expects.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world <= 1:
        return DistInfo()
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over all processes (the tensor itself when alone)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world_size


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when alone."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every process."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, synchronize: bool = True) -> None:
    """Leave the process group after the last collective. With ``synchronize`` (the normal end; not after an
    error, when a rank may never arrive) everyone first waits for everyone, so no rank tears its connections down
    while another still uses them."""
    if info.enabled and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or DataParallel) wrapper, else the model itself."""
    return model.module if hasattr(model, "module") else model
