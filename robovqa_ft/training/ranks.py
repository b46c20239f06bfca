"""What the training processes of one job share: who they are, and the few things they
must agree on (when to save or stop, which checkpoint to resume, the job's counters).

One process (no torchrun) is a world of size 1, where every helper here does nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among the job's training processes (torchrun's variables)."""
    env = os.environ
    return World(
        int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))
    )


def start(hang_timeout_minutes: float) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU). A collective that
    does not return within the timeout (a dead rank, a stuck GPU) raises, so the job
    ends and can be retried instead of hanging."""
    if world().size == 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(world().local_rank)
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        timeout=timedelta(minutes=hang_timeout_minutes),
    )


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(value: Any) -> Any:
    """Rank 0's `value`, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def summed(values: list[float]) -> list[float]:
    """Each value summed over the ranks."""
    return _reduced(values, dist.ReduceOp.SUM)


def highest(values: list[float]) -> list[float]:
    """Each value's maximum over the ranks (a flag raised on any rank is raised)."""
    return _reduced(values, dist.ReduceOp.MAX)


def _reduced(values: list[float], op) -> list[float]:
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()
