"""A tiny evaluation data root (40 database images, 2 queries) and a small CSA checkpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from csa.checkpoint import save_checkpoint
from csa.data.layout import save_gnd, save_test_features
from csa.model import RerankTransformer

TOY_GND = {"imlist": [f"db{i}" for i in range(40)], "qimlist": ["q0", "q1"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]},
                   {"easy": [10, 11], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]}


def toy_descriptors() -> tuple[np.ndarray, np.ndarray]:
    """(query (2, 8), db (40, 8)) L2-normalized rows; query j is close to database image 10 j."""
    rng = np.random.default_rng(0)
    db = rng.normal(size=(40, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[[0, 10]] + 0.05 * rng.normal(size=(2, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, db


def write_toy_root(root: Path) -> Path:
    """Write dataset 'toy' (features 'feat') and ``model.pth`` (L = 8, C = 16, 2 heads) under ``root``."""
    q, db = toy_descriptors()
    save_gnd(root, "toy", TOY_GND)
    save_test_features(root, "toy", "feat", query=q, db=db)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pth", RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2), epoch=1)
    return root
