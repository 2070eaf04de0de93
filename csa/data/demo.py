"""The embedded demo: two small real Revisited benchmarks built from photo subsets.

``csa demo build --source ../shared/data --out data/demo`` writes

* ``jpg/<dataset>/<name>.jpg``: the subset photos re-encoded (long side as stored, 512 px; JPEG quality 75,
  optimized, no metadata),
* ``annotations/<dataset>/gnd_<dataset>.pkl``: the official revisited ground truth restricted to the images
  present (absent database indices dropped, the rest re-indexed in official order; query boxes scaled to the
  stored size),
* ``annotations/<trainset>.pkl``: cross-city training sets (``rparis6k-mini-train`` trains the model tested on
  ``roxford5k-mini`` and vice versa), clusters = landmarks derived from the full official ground truth.

In the revisited datasets the 70 query images are *not* database images (``qimlist`` and ``imlist`` are
disjoint), so the demo keeps them apart too: a query photo is stored once, next to the database photos.

Their descriptors (``lite0-gem``) come from :func:`csa.descriptors.prepare.prepare_demo_features`
(``csa demo extract``).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from csa.data.layout import save_clusters, save_gnd
from csa.fileio import atomic_write, check_output_dir, load_pickle
from csa.validation import CSAInputError

__all__ = [
    "CITIES",
    "read_manifest",
    "restrict_gnd",
    "group_queries",
    "image_landmarks",
    "split_trainset",
    "build_demo",
    "image_categories",
    "leave_one_out_gnd",
    "image_folder",
    "LOO_BASE",
    "FEATURE_NAME",
]

#: Demo dataset -> its source folder, official ground truth, and the trainset built from its database.
CITIES: dict[str, dict[str, str]] = {
    "roxford5k-mini": {"folder": "oxford5k-subset", "gnd": "revisitop/gnd_roxford5k.pkl",
                       "trainset": "roxford5k-mini-train", "loo": "roxford5k-mini-loo"},
    "rparis6k-mini": {"folder": "paris6k-subset", "gnd": "revisitop/gnd_rparis6k.pkl",
                      "trainset": "rparis6k-mini-train", "loo": "rparis6k-mini-loo"},
}
#: Leave-one-out benchmark -> the mini benchmark whose database (and photos) it shares.
LOO_BASE = {city["loo"]: dataset for dataset, city in CITIES.items()}

JPEG_QUALITY = 75
LANDMARK_IOU = 0.3
VAL_FRACTION = 0.1
SPLIT_SEED = 0
#: Feature name of the demo descriptors (EfficientNet-Lite0, GeM p=3, 512 px, pixels in [-1, 1]).
FEATURE_NAME = "lite0-gem"


# --------------------------------------------------------------------------------------------
# ground truth restriction, landmarks, trainsets
# --------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``manifest.csv`` -> {name: {'orig_width', 'orig_height', 'width', 'height'}}."""
    with open(path, newline="") as f:
        return {r["name"]: {k: int(r[k]) for k in ("orig_width", "orig_height", "width", "height")}
                for r in csv.DictReader(f)}


def restrict_gnd(gt: dict, present: set[str] | Sequence[str], scale: dict[str, float] | None = None) -> dict:
    """Restrict a revisitop ground truth to the images in ``present``.

    Database images absent from ``present`` are dropped and the others re-indexed (official order kept);
    only queries present are kept; each kept query's bbx is multiplied by ``scale[name]`` (stored width /
    original width).  Returns a new ``{'imlist', 'qimlist', 'gnd'}``.
    """
    present = set(present)
    new_index = {}
    imlist = []
    for old, name in enumerate(gt["imlist"]):
        if name in present:
            new_index[old] = len(imlist)
            imlist.append(name)
    qimlist, gnd = [], []
    for q, name in enumerate(gt["qimlist"]):
        if name not in present:
            continue
        entry = gt["gnd"][q]
        s = 1.0 if scale is None else float(scale[name])
        out = {"bbx": [float(v) * s for v in entry["bbx"]]}
        for key in ("easy", "hard", "junk"):
            out[key] = [new_index[i] for i in entry[key] if i in new_index]
        qimlist.append(name)
        gnd.append(out)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def group_queries(gnd: Sequence[dict], iou: float = LANDMARK_IOU) -> np.ndarray:
    """Landmark id of every query: union-find over query pairs whose positive sets (easy + hard) have
    IoU >= ``iou``.  Ids are 0..L-1, numbered by the first query of each group."""
    pos = [set(g["easy"]) | set(g["hard"]) for g in gnd]
    parent = list(range(len(gnd)))
    for a in range(len(gnd)):
        for b in range(a + 1, len(gnd)):
            union = len(pos[a] | pos[b])
            if union and len(pos[a] & pos[b]) / union >= iou:
                ra, rb = _find(parent, a), _find(parent, b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = [_find(parent, i) for i in range(len(gnd))]
    ids: dict[int, int] = {}
    return np.array([ids.setdefault(r, len(ids)) for r in roots], dtype=np.int64)


def image_landmarks(gnd: Sequence[dict], n_images: int, query_landmark: np.ndarray) -> np.ndarray:
    """Landmark of each database image: the landmark of the queries listing it as easy or hard (-1: none).

    An image listed by queries of several landmarks gets the one listing it most often (ties: lowest id).
    """
    n_landmarks = int(query_landmark.max()) + 1 if len(query_landmark) else 0
    votes = np.zeros((n_images, max(n_landmarks, 1)), dtype=np.int64)
    for q, g in enumerate(gnd):
        for i in set(g["easy"]) | set(g["hard"]):
            votes[i, query_landmark[q]] += 1
    out = votes.argmax(axis=1)
    out[votes.sum(axis=1) == 0] = -1
    return out


def split_trainset(images: Sequence[str], landmarks: np.ndarray, val_fraction: float = VAL_FRACTION,
                   seed: int = SPLIT_SEED) -> dict[str, dict[str, list]]:
    """rSfM120k-style trainset ``{'train': {'images', 'cluster'}, 'val': {...}}`` from per-image landmarks.

    Cluster = landmark id; an image without landmark is its own cluster (ids after the landmarks).  'val'
    takes whole landmark clusters, in a seeded random order, until it holds ``val_fraction`` of the
    landmark images, plus every 1/val_fraction-th image without landmark (distractors); the rest is 'train'.
    """
    landmarks = np.asarray(landmarks)
    labelled = sorted(set(int(x) for x in landmarks if x >= 0))
    cluster = landmarks.copy()
    free = np.flatnonzero(landmarks < 0)
    next_id = (max(labelled) + 1) if labelled else 0
    cluster[free] = next_id + np.arange(len(free))
    rng = np.random.default_rng(seed)
    order = [labelled[i] for i in rng.permutation(len(labelled))]
    target = val_fraction * int((landmarks >= 0).sum())
    val_landmarks: set[int] = set()
    count = 0
    for lm in order:
        if count >= target or len(val_landmarks) >= len(labelled) - 1:
            break
        val_landmarks.add(lm)
        count += int((landmarks == lm).sum())
    step = max(1, round(1 / val_fraction)) if val_fraction > 0 else 0
    val_free = set(free[::step].tolist()) if step else set()
    is_val = np.array([(lm in val_landmarks) or (i in val_free) for i, lm in enumerate(landmarks.tolist())])
    splits = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        idx = np.flatnonzero(mask)
        splits[split] = {"images": [images[i] for i in idx], "cluster": [int(cluster[i]) for i in idx]}
    return splits


def image_categories(gnd: Sequence[dict], image_landmark: np.ndarray, query_landmark: np.ndarray
                     ) -> tuple[np.ndarray, dict[int, set[int]]]:
    """Each image's category for its own landmark, and each landmark's junk images.

    Category: 'easy' or 'hard' by majority of the landmark's queries listing it (a tie counts as easy),
    '' for images without landmark.  Junk of a landmark: the images its queries list as junk and that are
    not positives of that landmark.
    """
    votes = np.zeros((len(image_landmark), 2), dtype=np.int64)
    junk: dict[int, set[int]] = {}
    for q, g in enumerate(gnd):
        lm = int(query_landmark[q])
        for col, key in enumerate(("easy", "hard")):
            for i in g[key]:
                if image_landmark[i] == lm:
                    votes[i, col] += 1
        junk.setdefault(lm, set()).update(int(i) for i in g["junk"])
    for lm in junk:
        junk[lm] -= set(np.flatnonzero(image_landmark == lm).tolist())
    category = np.where(votes[:, 0] >= votes[:, 1], "easy", "hard").astype(object)
    category[image_landmark < 0] = ""
    return category, junk


def leave_one_out_gnd(imlist: Sequence[str], landmark: np.ndarray, category: np.ndarray,
                      junk: dict[int, set[int]], sizes: dict[str, tuple[int, int]]) -> dict:
    """The leave-one-out benchmark of a database: every image with a landmark is a query against the others.

    Query i (box = the whole image, ``sizes[name] = (width, height)``): easy / hard = the *other* images of
    its landmark by their :func:`image_categories`; junk = its landmark's junk plus the image itself (it is
    still in the database). Images whose landmark has no other image are not queries.
    """
    landmark = np.asarray(landmark)
    qimlist, gnd = [], []
    for i, name in enumerate(imlist):
        lm = int(landmark[i])
        if lm < 0:
            continue
        mates = [int(j) for j in np.flatnonzero(landmark == lm) if j != i]
        if not mates:
            continue
        w, h = sizes[name]
        qimlist.append(name)
        gnd.append({"bbx": [0.0, 0.0, float(w), float(h)],
                    "easy": [j for j in mates if category[j] == "easy"],
                    "hard": [j for j in mates if category[j] == "hard"],
                    "junk": sorted(junk.get(lm, set()) | {i})})
    return {"imlist": list(imlist), "qimlist": qimlist, "gnd": gnd}


def image_folder(root: str | os.PathLike, dataset: str) -> Path:
    """Folder of a demo dataset's photos (a leave-one-out benchmark shares its base benchmark's)."""
    return Path(root, "jpg", LOO_BASE.get(dataset, dataset))


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------
def _reencode(src: Path, dst: Path, quality: int) -> None:
    with Image.open(src) as im:
        rgb = im.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality, optimize=True)  # no exif / icc given: no metadata written
    data = buf.getvalue()
    if dst.exists() and dst.read_bytes() == data:
        return
    with atomic_write(dst, "wb") as f:
        f.write(data)


def _read_city(source: Path, city: Mapping[str, Any]) -> tuple[Path, dict, dict, dict]:
    """``(photo folder, manifest, full official ground truth, ground truth restricted to the subset)`` of one
    city in ``source``, each checked (one :class:`CSAInputError` naming the file)."""
    folder = source / city["folder"]
    manifest_file, gnd_file = folder / "manifest.csv", source / city["gnd"]
    for p in (manifest_file, gnd_file):
        if not p.is_file():
            raise CSAInputError(f"{p} not found; --source must be the offline data folder "
                                f"(../shared/data) holding {city['folder']}/ and revisitop/")
    manifest = read_manifest(manifest_file)
    full = load_pickle(gnd_file)
    overlap = set(full["imlist"]) & set(full["qimlist"])
    if overlap:
        raise CSAInputError(f"{gnd_file}: {len(overlap)} query names are also database names; the demo build "
                            f"assumes the revisited layout where they are disjoint")
    scale = {n: m["width"] / m["orig_width"] for n, m in manifest.items()}
    gnd = restrict_gnd(full, set(manifest), scale)
    unused = set(manifest) - set(gnd["imlist"]) - set(gnd["qimlist"])
    if unused:
        raise CSAInputError(f"{len(unused)} photos of {folder} are neither database nor query images of "
                            f"{gnd_file}, e.g. {sorted(unused)[0]}")
    return folder, manifest, full, gnd


def _city_summary(full: dict, gnd: dict, q_landmark: np.ndarray, sub_lm: np.ndarray, splits: dict, loo: dict,
                  trainset: str) -> dict[str, Any]:
    """What :func:`build_demo` reports for one city: sizes, landmarks, the trainset's split, the LOO queries."""
    n_pos = [len(g["easy"]) + len(g["hard"]) for g in gnd["gnd"]]
    return {
        "db": len(gnd["imlist"]), "queries": len(gnd["qimlist"]),
        "queries_with_medium_positive": int(sum(p > 0 for p in n_pos)),
        "landmarks_full_gnd": int(q_landmark.max()) + 1,
        "landmark_queries": {int(k): [full["qimlist"][q] for q in np.flatnonzero(q_landmark == k)]
                             for k in range(int(q_landmark.max()) + 1)},
        "trainset": trainset,
        "train_images": len(splits["train"]["images"]), "val_images": len(splits["val"]["images"]),
        "val_landmarks": sorted({c for c, n in zip(splits["val"]["cluster"], splits["val"]["images"])
                                 if sub_lm[gnd["imlist"].index(n)] >= 0}),
        "db_images_with_landmark": int((sub_lm >= 0).sum()),
        "loo_queries": len(loo["qimlist"]),
    }


def build_demo(source: str | os.PathLike, out: str | os.PathLike, quality: int = JPEG_QUALITY,
               progress: bool = True) -> dict[str, Any]:
    """Build the demo data root ``out`` from the offline photo subsets in ``source``; return a summary."""
    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise CSAInputError(f"--source {source} is not a folder; give the offline data folder (../shared/data) "
                            f"holding {', '.join(c['folder'] for c in CITIES.values())} and revisitop/")
    check_output_dir(out, "--out")
    summary: dict[str, Any] = {}
    for dataset, city in CITIES.items():
        folder, manifest, full, gnd = _read_city(source, city)
        save_gnd(out, dataset, gnd)

        names = gnd["imlist"] + gnd["qimlist"]
        for name in tqdm(names, desc=f"{dataset} jpg", disable=not progress):
            _reencode(folder / "jpg" / f"{name}.jpg", out / "jpg" / dataset / f"{name}.jpg", quality)

        # landmarks from the FULL official ground truth (all 70 queries), then the subset's database
        q_landmark = group_queries(full["gnd"])
        full_lm = image_landmarks(full["gnd"], len(full["imlist"]), q_landmark)
        index = {n: i for i, n in enumerate(full["imlist"])}
        sub_lm = np.array([full_lm[index[n]] for n in gnd["imlist"]], dtype=np.int64)
        splits = split_trainset(gnd["imlist"], sub_lm)
        save_clusters(out, city["trainset"], splits)

        # leave-one-out benchmark: every landmark photo of the database queries the rest of it
        full_cat, full_junk = image_categories(full["gnd"], full_lm, q_landmark)
        sub_index = {index[n]: k for k, n in enumerate(gnd["imlist"])}
        sub_junk = {lm: {sub_index[i] for i in js if i in sub_index} for lm, js in full_junk.items()}
        sub_cat = np.array([full_cat[index[n]] for n in gnd["imlist"]], dtype=object)
        sizes = {n: (manifest[n]["width"], manifest[n]["height"]) for n in gnd["imlist"]}
        loo = leave_one_out_gnd(gnd["imlist"], sub_lm, sub_cat, sub_junk, sizes)
        save_gnd(out, city["loo"], loo)
        summary[dataset] = _city_summary(full, gnd, q_landmark, sub_lm, splits, loo, city["trainset"])
    return summary
