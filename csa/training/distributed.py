"""The processes of a training run: one process, or one per device under ``torchrun`` (``torch.distributed``)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from csa.device import resolve_device

__all__ = ["Processes", "setup_processes", "teardown_processes", "barrier"]


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: ``rank`` of ``world`` processes, its ``device``, and whether the
    process group was created here (and so is destroyed here)."""

    rank: int
    world: int
    device: torch.device
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0


def setup_processes(device: str) -> Processes:
    """Resolve ``device`` (``csa.device.resolve_device``) and, under ``torchrun`` (``WORLD_SIZE`` > 1), join the
    process group: NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU."""
    resolved = resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(0, 1, resolved, False)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolved.type == "cuda"
    resolved = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(resolved)
    initialized = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
        initialized = True
    return Processes(rank, world, resolved, initialized)


def teardown_processes(processes: Processes) -> None:
    """Leave the process group when :func:`setup_processes` created it."""
    if processes.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for with one)."""
    if world > 1:
        dist.barrier()
