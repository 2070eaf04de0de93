"""Synthetic clustered descriptors written in the csa data layout, for the datasets/engine/train tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from csa.data.layout import save_clusters, save_train_features
from csa.training.config import TrainConfig

TOY_TRAINSET = "toy-train"
#: A model and schedule small enough to train on the toy trainset in about a second per epoch.
TINY = dict(trainset=TOY_TRAINSET, feature_names=["toyfeat"], topk=16, anchor_len=16, embed_dim=32, depth=1,
            num_heads=2, batch_size=16, num_epochs=4, warmup_epochs=1, warmup_lr=0.05, base_lr=0.5,
            lr_scaling="none", num_workers=0, progress=False)


def tiny_config(root: Path, out: str = "run", **kw) -> TrainConfig:
    """:data:`TINY` reading ``root`` and writing ``root / out``; ``kw`` overrides fields."""
    return TrainConfig(**{**TINY, "data_root": str(root), "output_dir": str(root / out), **kw})


def clustered_descriptors(n_clusters: int, per_cluster: int, dim: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalized (n_clusters * per_cluster, dim) float32 rows around random centres, and their cluster ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_clusters), per_cluster)
    x = centres[labels] + noise * rng.standard_normal((len(labels), dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(len(labels))  # interleave clusters
    return x[order].astype(np.float32), labels[order].astype(np.int64)


def write_toy_trainset(root: Path, names: tuple[str, ...] = ("toyfeat",), n_clusters: int = 8, per_cluster: int = 12,
                       dim: int = 32, noise: float = 1.2, seed: int = 0) -> np.ndarray:
    """Write annotations/<TOY_TRAINSET>.pkl and train/<TOY_TRAINSET>/<name>.pkl; return the cluster ids."""
    labels = None
    for i, name in enumerate(names):
        x, lab = clustered_descriptors(n_clusters, per_cluster, dim, noise, seed)  # same images ...
        x = x + 0.05 * i * np.random.default_rng(100 + i).standard_normal(x.shape).astype(np.float32)  # ... other nets
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        save_train_features(root, TOY_TRAINSET, name, train=x, val=x[:10])
        labels = lab
    save_clusters(root, TOY_TRAINSET, {"train": {"cluster": labels.tolist()}, "val": {"cluster": labels[:10].tolist()}})
    return labels
