"""Random state of a training run: seeding, per-epoch seeds, and the state a checkpoint stores to resume exactly."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_all", "derived_seed", "rng_state", "set_rng_state"]


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a function of ``keys`` (e.g. seed, stream, epoch, rank)."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def rng_state() -> dict[str, Any]:
    """Torch (and CUDA), Python and numpy generator states, in tensors and builtins a ``weights_only`` load reads."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
