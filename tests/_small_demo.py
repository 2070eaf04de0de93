"""A small copy of the demo data root: the first images of each city, its annotations cut to them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from csa.data.demo import CITIES, restrict_gnd
from csa.data.layout import load_gnd
from csa.fileio import load_pickle, save_pickle


def make_small_demo(demo: Path, out: Path, n_db: int = 24, n_query: int = 3) -> Path:
    """``out`` with annotations of ``n_db`` database photos and ``n_query`` queries per city (images linked)."""
    for dataset, city in CITIES.items():
        gt = load_gnd(demo, dataset)
        kept = list(gt["imlist"][:n_db])
        small = restrict_gnd(gt, kept + list(gt["qimlist"][:n_query]))
        save_pickle(small, out / "annotations" / dataset / f"gnd_{dataset}.pkl")
        loo = restrict_gnd(load_gnd(demo, city["loo"]), kept)
        save_pickle(loo, out / "annotations" / city["loo"] / f"gnd_{city['loo']}.pkl")
        splits = load_pickle(demo / "annotations" / f"{city['trainset']}.pkl")
        cut = {}
        for split, part in splits.items():
            keep = [i for i, name in enumerate(part["images"]) if name in set(kept)]
            cut[split] = {key: ([values[i] for i in keep] if not isinstance(values, np.ndarray) else values[keep])
                          for key, values in part.items()}
        save_pickle(cut, out / "annotations" / f"{city['trainset']}.pkl")
    (out / "jpg").symlink_to((demo / "jpg").resolve())
    return out
