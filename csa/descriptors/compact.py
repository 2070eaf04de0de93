"""Committed, verified copies of the demo's descriptor sets: float16, one ``.npz`` per set, a sha256 manifest.

Extracting the two extra backbones of the demo takes minutes per backbone on a CPU; the experiments
that stack them read this compact copy instead (``data/demo/descriptors/<name>.npz``, about 4 MB per
set).  :func:`save_compact` writes the database and official-query rows of both cities from the
extracted ``test/<dataset>/<name>.pkl`` files and records the file's sha256 and the command that made
it in ``manifest.json``; :func:`load_compact` refuses a file whose digest differs and returns float32
rows, L2-normalized again after the float16 rounding.  :func:`ensure_demo_features` writes the demo's
test descriptor files from that copy when they are missing (a fresh clone), so inference runs without
extracting first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from csa.data.demo import CITIES, FEATURE_NAME
from csa.data.layout import gnd_path, load_gnd, load_test_features, save_test_features, test_features_path
from csa.descriptors.pooling import l2n
from csa.fileio import atomic_write, sha256_file
from csa.validation import CSAInputError

__all__ = ["COMPACT_DIR", "compact_path", "save_compact", "load_compact", "ensure_demo_features"]

#: Folder of the compact descriptor sets inside a demo data root.
COMPACT_DIR = "descriptors"


def compact_path(root: str | os.PathLike, name: str) -> Path:
    """``<root>/descriptors/<name>.npz``."""
    return Path(root, COMPACT_DIR, f"{name}.npz")


def _manifest_path(root: str | os.PathLike) -> Path:
    return Path(root, COMPACT_DIR, "manifest.json")


def _read_manifest(root: str | os.PathLike) -> dict:
    path = _manifest_path(root)
    return json.loads(path.read_text()) if path.is_file() else {}


def save_compact(root: str | os.PathLike, name: str, datasets: Sequence[str], command: str) -> Path:
    """Write ``<root>/descriptors/<name>.npz`` (``<dataset>/db`` and ``<dataset>/query``, float16) and record
    its sha256 and ``command`` in the manifest."""
    arrays = {}
    for dataset in datasets:
        feats = load_test_features(root, dataset, name, load_gnd(root, dataset))
        arrays[f"{dataset}/db"] = feats.db.astype(np.float16)
        arrays[f"{dataset}/query"] = feats.query.astype(np.float16)
    path = compact_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    manifest = _read_manifest(root)
    manifest[path.name] = {"sha256": sha256_file(path), "command": command, "datasets": list(datasets),
                           "dtype": "float16"}
    with atomic_write(_manifest_path(root), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def load_compact(root: str | os.PathLike, name: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(db, query)`` float32 rows of ``dataset`` from the compact set ``name``, digest-checked."""
    path = compact_path(root, name)
    entry = _read_manifest(root).get(path.name)
    if not path.is_file() or entry is None:
        raise CSAInputError(f"no compact descriptor set {path} listed in {_manifest_path(root)}; write it with "
                            f"csa.descriptors.compact.save_compact after `csa demo extract --backbone ...`")
    if sha256_file(path) != entry["sha256"]:
        raise CSAInputError(f"{path} does not match the sha256 in {_manifest_path(root)}; restore it from git or "
                            f"re-create it with: {entry['command']}")
    with np.load(path, allow_pickle=False) as data:
        if f"{dataset}/db" not in data:
            raise CSAInputError(f"{path} has no descriptors of {dataset}; it holds {entry['datasets']}")
        return (l2n(data[f"{dataset}/db"].astype(np.float32)), l2n(data[f"{dataset}/query"].astype(np.float32)))


def ensure_demo_features(root: str | os.PathLike = "data/demo", feature_name: str = FEATURE_NAME) -> list[Path]:
    """Write the demo's missing ``test/<dataset>/<feature_name>.pkl`` files (both mini benchmarks and their
    leave-one-out benchmarks) from the committed compact copy; return the paths written (``[]``: none missing).

    The rows written are the **float16-rounded** extracted descriptors, sha256-checked against the
    manifest and L2-normalized again as float32 (on the four demo benchmarks, first-stage mAP within
    0.01 point of the extracted descriptors' and the released models' re-ranked Medium mAP within 0.15);
    a leave-one-out benchmark takes its rows from its city's database by image name.  ``csa demo extract`` replaces them by the extracted descriptors (they carry no
    extraction fingerprint).  A data root without the demo's annotations is left alone.  Prints one line
    when it writes anything.
    """
    root = Path(root)
    written: list[Path] = []
    for dataset, city in CITIES.items():
        missing = [d for d in (dataset, city["loo"]) if not test_features_path(root, d, feature_name).is_file()]
        if not missing or not gnd_path(root, dataset).is_file():  # complete, or not a demo data root
            continue
        db, query = load_compact(root, feature_name, dataset)
        base = load_gnd(root, dataset)
        if (len(db), len(query)) != (len(base["imlist"]), len(base["qimlist"])):
            raise CSAInputError(f"{compact_path(root, feature_name)} holds {len(db)} database and {len(query)} query "
                                f"rows of {dataset}, its ground truth {len(base['imlist'])} and "
                                f"{len(base['qimlist'])}; re-extract with `csa demo extract --root {root}`")
        index = {name: i for i, name in enumerate(base["imlist"])}
        for target in missing:
            if target == dataset:
                rows = {"db": db, "query": query}
            else:  # leave-one-out: every query is a database photo of the same city
                gt = load_gnd(root, target)
                try:
                    rows = {"db": db[[index[n] for n in gt["imlist"]]],
                            "query": db[[index[n] for n in gt["qimlist"]]]}
                except KeyError as exc:
                    raise CSAInputError(f"{target} lists image {exc} that is not in {dataset}'s database; rebuild "
                                        f"the demo with `csa demo build`") from None
            # an extraction fingerprint left beside a deleted file would mark these rows as extracted
            path = test_features_path(root, target, feature_name)
            path.with_name(path.name + ".fingerprint").unlink(missing_ok=True)
            written.append(save_test_features(root, target, feature_name, query=rows["query"], db=rows["db"]))
    if written:
        print(f"{feature_name}: wrote {len(written)} missing test descriptor files under {root / 'test'} from the "
              f"committed float16 copy {compact_path(root, feature_name)} (sha256 verified); "
              f"`csa demo extract --root {root}` writes the extracted ones")
    return written
