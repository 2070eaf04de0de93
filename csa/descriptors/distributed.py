"""Extraction over several processes started by ``torchrun``: who this process is, its device, the sync points.

``torchrun --nproc_per_node=N -m csa extract ...`` (or ``csa demo extract``) starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. :func:`ranks_from_environment` reads them (None when
``WORLD_SIZE`` is unset or 1: the one-process path); :func:`join_extraction_group` also joins the process
group (NCCL with one GPU per process, ``cuda:LOCAL_RANK``, when CUDA is present, else gloo on the CPU) and
agrees on a run id that marks the shard folders this run holds (:mod:`csa.descriptors.shard_lock`).
Rank r extracts the shards r, r + N, r + 2N, ... (:func:`owned_shards`); shards are named by image range,
so a run resumed with another N reuses every finished shard.  Rank 0 merges once all ranks passed
:func:`synchronize`.  Every rank must read the same files: several machines need a shared file system.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from csa.device import resolve_device
from csa.validation import CSAInputError

__all__ = ["Ranks", "ranks_from_environment", "join_extraction_group", "leave_extraction_group",
           "in_extraction_group", "extraction_device", "synchronize", "owned_shards", "GROUP_TIMEOUT"]

#: How long a rank waits at a sync point for the others (a resumed run may leave one rank most of the work).
GROUP_TIMEOUT = timedelta(hours=48)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-process extraction; ``run_id`` is the same on every rank of one run."""

    rank: int
    world_size: int
    local_rank: int
    run_id: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0 merges shards, writes the outputs and prints the reports."""
        return self.rank == 0

    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"


def ranks_from_environment(env: Mapping[str, str] | None = None) -> Ranks | None:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as torchrun sets them; None for one process."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE", "").strip() in ("", "1"):
        return None
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env.get("RANK", ""))
        local = int(env.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as exc:
        raise CSAInputError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} needs integer RANK and LOCAL_RANK (got "
                            f"RANK={env.get('RANK')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}); start the "
                            f"command with torchrun") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise CSAInputError(f"RANK={rank} is not within WORLD_SIZE={world}; start the command with torchrun")
    return Ranks(rank, world, local)


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def extraction_device(device: str, ranks: Ranks | None) -> torch.device:
    """One process: :func:`csa.device.resolve_device`; under torchrun: ``cuda:LOCAL_RANK`` or the CPU."""
    if ranks is None:
        return resolve_device(device)
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        return resolve_device(device)  # the same one error for an unknown device
    if not _wants_cuda(device):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise CSAInputError(f"--device {device} but CUDA is not available; use --device cpu")
    if ranks.local_rank >= torch.cuda.device_count():
        raise CSAInputError(f"LOCAL_RANK {ranks.local_rank} but this machine has {torch.cuda.device_count()} "
                            f"GPU(s); start at most that many processes per node (--nproc_per_node)")
    return torch.device(f"cuda:{ranks.local_rank}")


def join_extraction_group(device: str = "auto") -> Ranks | None:
    """Join the process group of a torchrun extraction (nothing for one process); returns the ranks
    with the run id rank 0 chose."""
    ranks = ranks_from_environment()
    if ranks is None:
        return None
    dev = extraction_device(device, ranks)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    token = [uuid.uuid4().hex if ranks.is_main else None]
    dist.broadcast_object_list(token, src=0)
    return Ranks(ranks.rank, ranks.world_size, ranks.local_rank, str(token[0]))


def leave_extraction_group(ranks: Ranks | None) -> None:
    """Leave the process group :func:`join_extraction_group` joined."""
    if ranks is not None and dist.is_initialized():
        dist.destroy_process_group()


_T = TypeVar("_T")


def in_extraction_group(device: str, body: Callable[[Ranks | None], _T]) -> _T:
    """``body(ranks)`` inside the process group of a torchrun extraction (``ranks`` None for one process),
    leaving the group afterwards whatever happens."""
    ranks = join_extraction_group(device)
    try:
        return body(ranks)
    finally:
        leave_extraction_group(ranks)


def synchronize(ranks: Ranks | None) -> None:
    """Wait until every rank got here (nothing for one process)."""
    if ranks is None:
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def owned_shards(n_shards: int, ranks: Ranks | None) -> range:
    """The shard numbers this process extracts: all of them for one process, else rank, rank + N, ..."""
    if ranks is None:
        return range(n_shards)
    return range(ranks.rank, n_shards, ranks.world_size)
