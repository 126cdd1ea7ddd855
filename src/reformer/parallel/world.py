"""The processes of a run: who this one is, and the few collectives the trainer needs.

``torchrun`` starts one process per device and tells each its place through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). :func:`init_world` reads it, joins
the process group (gloo on the CPU, NCCL on CUDA) and gives each process one device: the GPU of
its local rank, or the CPU. Without torchrun it returns the one-process :class:`World`, whose
collectives are no-ops, so the same training code runs either way.

Decision: a user's mistake found by rank 0 alone (a run directory in use, say) must stop every
rank with the same message, not leave the others waiting in a collective:
:meth:`World.on_main` runs a function on rank 0 and re-raises its ValueError everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` processes (one device each)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Each value summed over the processes (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, value: int, device: torch.device) -> int:
        """The largest of the processes' values."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: T) -> list[T]:
        """Every process's ``obj``, in rank order, on every process (picklable objects)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; a ValueError it raises is raised on every rank.

        Returns ``fn``'s result on rank 0 and None elsewhere.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except ValueError as err:
                error = str(err)
                if not self.distributed:
                    raise
        if self.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise ValueError(box[0])
        return result

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """Whether the launcher's environment variables are set (torchrun or an equivalent)."""
    return all(name in os.environ for name in LAUNCHER_VARIABLES)


def init_world(device: str = "auto") -> World:
    """Join the launcher's process group, if there is one; the one-process World otherwise.

    Args:
        device: the run's device, auto, cpu or cuda: the backend is NCCL when it means CUDA,
            else gloo. Under torchrun, cuda means the GPU of this process's local rank
            (reformer.training.trainer.resolve_device), and auto picks CUDA when there is one.
    """
    if not launched_by_torchrun():
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                  int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda:"):
        raise ValueError(f"device={device!r}: under torchrun each process takes the GPU of its "
                         "local rank; pass --device cuda (or set CUDA_VISIBLE_DEVICES)")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise ValueError(f"local rank {world.local_rank} has no GPU "
                             f"({torch.cuda.device_count()} visible); start at most that many "
                             "processes per node, or pass --device cpu")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank,
                                world_size=world.size,
                                device_id=torch.device("cuda", world.local_rank) if cuda else None)
    return world


def close_world(world: World, wait: bool = True) -> None:
    """Leave the process group (after the last collective).

    With ``wait``, every process first waits for the others to get here: a process that tore
    its gloo connections down while rank 0 was still writing the run's files made rank 0's
    gloo threads abort ("terminate called without an active exception", exit -6), seen once
    in CI. After a failure (``wait=False``) another process may never arrive.
    """
    if world.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
