"""From images to the descriptor files that re-ranking and training read: the demo and the full data.

One loop serves every test set (:func:`prepare_test_features`): it reads the images of a data root
laid out as :mod:`csa.data.layout` describes, extracts descriptors in resumable shards under
``<root>/cache/extract/`` and writes ``test/<dataset>/<name>.pkl`` atomically, next to a fingerprint
of what went in (image names and sizes, boxes, network, size, scales); a rerun with the same inputs
does nothing unless ``force``.  The demo (:func:`prepare_demo_features`) is that loop with the
offline EfficientNet-Lite0 at 512 px, plus the cross-city training sets cut from the database rows.
:func:`prepare` runs the right one for a dataset name (the data notebook and ``csa extract`` call it)::

    prepare("demo", "data/demo")                                               # offline, CPU
    prepare("roxford5k", "data", "gl18-tl-resnet101-gem-w", download=True)     # test/roxford5k/<name>.pkl
    prepare("rsfm120k", "data", "gl18-tl-resnet101-gem-w")                     # train/retrieval-SfM-120k/<name>.pkl
    prepare("r1m", "data", "gl18-tl-resnet101-gem-w")                          # r1m/<name>.npy (fp16)

Defaults follow cirtorch's test protocol for the gl18 networks: 1024 px on the long side, scales 1,
1/sqrt(2), sqrt(2), queries cropped to their box.  Training descriptors are single-scale by default:
the scales behind the official training features are not published.

Under torchrun, every function takes the ``ranks`` of
:func:`csa.descriptors.distributed.join_extraction_group`: each process extracts its share of the shards
on its own device, rank 0 merges, writes the outputs and returns their paths (the other ranks return
``{}`` or None).  Outputs are the same bytes as a one-process run's.
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from csa.data.demo import CITIES, FEATURE_NAME
from csa.data.layout import (REFERENCE_TRAINSET, clusters_path, load_gnd, load_test_features, save_test_features,
                             save_train_features, test_features_path, train_features_path)
from csa.descriptors.distributed import Ranks, extraction_device, synchronize
from csa.descriptors.extract import extract_descriptors
from csa.descriptors.backbones import load_backbone
from csa.descriptors.networks import LITE0, LITE_BACKBONES
from csa.fileio import atomic_write, check_output_dir, check_output_file, fingerprint, load_pickle
from csa.validation import CSAInputError

__all__ = ["MULTISCALE", "DATASETS", "TEST_SHARD_SIZE", "TRAIN_SHARD_SIZE", "R1M_SHARD_SIZE", "prepare",
           "prepare_demo_features", "prepare_test_features",
           "prepare_train_features", "prepare_r1m_features", "sfm_image_path"]

#: cirtorch's multi-scale setting for the GeM networks.
MULTISCALE = (1.0, 1 / math.sqrt(2), math.sqrt(2))

#: Images per extraction shard of a test set: an interrupted extraction loses at most this many.
TEST_SHARD_SIZE = 64
#: Images per extraction shard of rSfM120k (each split) and of R1M.
TRAIN_SHARD_SIZE = 256
R1M_SHARD_SIZE = 4096

#: What :func:`prepare` accepts, with the downloads each needs (see :mod:`csa.data.download`).
DATASETS: dict[str, tuple[str, ...]] = {
    "demo": (),
    "roxford5k": ("roxford5k", "networks"),
    "rparis6k": ("rparis6k", "networks"),
    "rsfm120k": ("rsfm120k", "networks"),
    "r1m": ("r1m", "networks"),
}


# --------------------------------------------------------------------------------------------
# up-to-date outputs: a fingerprint file next to each output
# --------------------------------------------------------------------------------------------
def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".fingerprint")


def _up_to_date(path: Path, digest: str) -> bool:
    side = _sidecar(path)
    return path.is_file() and side.is_file() and side.read_text().strip() == digest


def _write_sidecar(path: Path, digest: str) -> None:
    with atomic_write(_sidecar(path), "w") as f:
        f.write(digest + "\n")


def _file_signature(paths: Sequence[Path]) -> list:
    return [[p.name, p.stat().st_size] for p in paths]


def _shard_dir(data_root: str | os.PathLike, *parts: str) -> Path:
    return Path(data_root, "cache", "extract", *parts)


# --------------------------------------------------------------------------------------------
# test sets (the demo's mini benchmarks, ROxf, RPar)
# --------------------------------------------------------------------------------------------
def prepare_test_features(data_root: str | os.PathLike, dataset: str, backbone: str, image_size: int = 1024,
                          scales: Sequence[float] = MULTISCALE, device: str = "auto", batch_size: int = 1,
                          num_workers: int = 4, feature_name: str | None = None, force: bool = False,
                          progress: bool = True, shard_size: int | None = None,
                          ranks: Ranks | None = None) -> Path | None:
    """Descriptors of ``dataset``'s database and (box-cropped) queries -> ``test/<dataset>/<name>.pkl``.

    ``name`` is ``feature_name`` or the backbone's name.  Skipped when the output is up to date
    (same images, boxes, backbone, size and scales) unless ``force``; an interrupted run resumes from its
    finished shards (``shard_size`` images each, default :data:`TEST_SHARD_SIZE`).  The output and cache
    locations are checked before extraction starts.  Under torchrun only rank 0 writes and returns the path.
    """
    name = feature_name or backbone
    gt = load_gnd(data_root, dataset)
    img_dir = Path(data_root, "jpg", dataset)
    db_paths = [img_dir / f"{n}.jpg" for n in gt["imlist"]]
    q_paths = [img_dir / f"{n}.jpg" for n in gt["qimlist"]]
    missing = [p for p in db_paths + q_paths if not p.is_file()]
    if missing:
        raise CSAInputError(f"{len(missing)} images of {dataset} not found (e.g. {missing[0]}); download them with "
                            f"`csa download {dataset} --data-root {data_root}`")
    bbxs = [list(map(float, g["bbx"])) for g in gt["gnd"]]
    out = test_features_path(data_root, dataset, name)
    digest = fingerprint({"backbone": backbone, "image_size": image_size, "scales": [float(s) for s in scales],
                          "db": _file_signature(db_paths), "query": _file_signature(q_paths), "bbxs": bbxs})
    if not force and _up_to_date(out, digest):
        return out
    shards = _shard_dir(data_root, dataset, f"{name}-{digest[:12]}")
    main = ranks is None or ranks.is_main
    if force and main:
        shutil.rmtree(shards, ignore_errors=True)
    if force:
        synchronize(ranks)  # no rank starts in the folder before it is emptied
    check_output_file(out, f"the descriptors of {dataset}")
    check_output_dir(shards, "the extraction cache")
    dev = extraction_device(device, ranks)
    net = load_backbone(backbone, data_root, dev)
    kw = dict(image_size=image_size, scales=scales, batch_size=batch_size, num_workers=num_workers, device=dev,
              progress=progress and main, shard_size=shard_size or TEST_SHARD_SIZE, ranks=ranks)
    db = extract_descriptors(net, db_paths, shard_dir=shards / "db", desc=f"{dataset} database", **kw)
    q = extract_descriptors(net, q_paths, bbxs=bbxs, shard_dir=shards / "query", desc=f"{dataset} queries", **kw)
    if not main:
        return None
    save_test_features(data_root, dataset, name, query=q, db=db)
    _write_sidecar(out, digest)
    shutil.rmtree(shards, ignore_errors=True)
    return out


def prepare_demo_features(root: str | os.PathLike = "data/demo", image_size: int = 512,
                          scales: Sequence[float] = (1.0,), batch_size: int = 8, num_workers: int = 0,
                          force: bool = False, feature_name: str | None = None, device: str = "auto",
                          progress: bool = True, shard_size: int | None = None,
                          ranks: Ranks | None = None, backbone: str = LITE0) -> dict[str, Path]:
    """The demo's descriptors: both mini benchmarks (EfficientNet-Lite0/1/2 GeM, ``<backbone>-gem`` unless
    ``feature_name``), their leave-one-out benchmarks and their cross-city trainsets.

    A trainset's descriptors, and a leave-one-out benchmark's queries and database, are rows of its city's
    database descriptors (same photos, whole images), picked by image name.  Returns
    ``{dataset or trainset: path written}`` (``{}`` on the ranks other than 0 under torchrun).
    """
    root = Path(root)
    if not (root / "annotations").is_dir():
        raise CSAInputError(f"{root} is not a demo data root (it has no annotations/ folder); give the folder "
                            f"`csa demo build` wrote (default data/demo)")
    if backbone not in LITE_BACKBONES:
        raise CSAInputError(f"the demo extracts offline backbones only; choose one of {', '.join(LITE_BACKBONES)}")
    feature_name = feature_name or (FEATURE_NAME if backbone == LITE0 else f"{backbone}-gem")
    written: dict[str, Path] = {}
    for dataset, city in CITIES.items():
        path = prepare_test_features(root, dataset, backbone, image_size=image_size, scales=scales, device=device,
                                     batch_size=batch_size, num_workers=num_workers, feature_name=feature_name,
                                     force=force, progress=progress, shard_size=shard_size, ranks=ranks)
        if path is None:
            continue  # not rank 0: rank 0 writes the outputs
        written[dataset] = path
        written.update(_derive_from_database(root, dataset, feature_name, _derived_outputs(root, city, feature_name),
                                             force))
    return written


class _Derived(NamedTuple):
    """An output cut from a city's database descriptors: ``write`` gets ``{key: rows of names[key]}``."""

    key: str                                # the leave-one-out benchmark or trainset
    out: Path
    digest: dict[str, list[str]]            # fingerprinted with the test file's fingerprint
    names: dict[str, list[str]]             # image names of the rows each part takes
    what: str                               # for error messages
    write: Callable[[dict[str, np.ndarray]], Path]


def _derived_outputs(root: Path, city: dict[str, str], name: str) -> Iterator[_Derived]:
    """A city's leave-one-out benchmark, then its trainset (lazily: each annotation file is read in turn)."""
    loo, trainset = city["loo"], city["trainset"]
    gt = load_gnd(root, loo)
    yield _Derived(loo, test_features_path(root, loo, name), {"imlist": gt["imlist"], "qimlist": gt["qimlist"]},
                   {"db": gt["imlist"], "query": gt["qimlist"]}, f"benchmark {loo}",
                   lambda rows: save_test_features(root, loo, name, query=rows["query"], db=rows["db"]))
    splits = load_pickle(clusters_path(root, trainset))
    images = {s: splits[s]["images"] for s in ("train", "val")}
    yield _Derived(trainset, train_features_path(root, trainset, name), images, images, f"trainset {trainset}",
                   lambda rows: save_train_features(root, trainset, name, rows["train"], rows["val"]))


def _derive_from_database(root: Path, dataset: str, name: str, outputs: Iterable[_Derived],
                          force: bool) -> dict[str, Path]:
    """Write each of ``outputs`` from rows of ``dataset``'s database descriptors, picked by image name;
    return ``{key: path}``.

    An output is up to date when its fingerprint (the test file's fingerprint and its ``digest`` lists) is
    unchanged; the database descriptors and their name index are loaded once, and only if one is stale.
    """
    test_digest = _sidecar(test_features_path(root, dataset, name)).read_text().strip()
    db = index = None
    written: dict[str, Path] = {}
    for d in outputs:
        digest = fingerprint({"test": test_digest, **d.digest})
        if force or not _up_to_date(d.out, digest):
            if db is None:
                gt = load_gnd(root, dataset)
                db = load_test_features(root, dataset, name, gnd=gt).db
                index = {n: i for i, n in enumerate(gt["imlist"])}
            try:
                rows = {k: db[[index[n] for n in wanted]] for k, wanted in d.names.items()}
            except KeyError as exc:
                raise CSAInputError(f"{d.what} lists image {exc} that is not in {dataset}'s database; rebuild "
                                    f"the demo with `csa demo build`") from exc
            d.write(rows)
            _write_sidecar(d.out, digest)
        written[d.key] = d.out
    return written


# --------------------------------------------------------------------------------------------
# training set (rSfM120k) and distractors (R1M)
# --------------------------------------------------------------------------------------------
def sfm_image_path(ims_root: str | os.PathLike, cid: str) -> Path:
    """cirtorch's rSfM120k file layout: ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``."""
    return Path(ims_root, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def prepare_train_features(data_root: str | os.PathLike, backbone: str, trainset: str = REFERENCE_TRAINSET,
                           image_size: int = 1024, scales: Sequence[float] = (1.0,), device: str = "auto",
                           batch_size: int = 1, num_workers: int = 4, feature_name: str | None = None,
                           progress: bool = True, shard_size: int | None = None,
                           ranks: Ranks | None = None) -> Path | None:
    """Descriptors of every train/val image of rSfM120k -> ``train/<trainset>/<name>.pkl``.

    The image order is that of ``annotations/<trainset>.pkl`` (its ``cids``), so row i has cluster i.
    ``scales`` defaults to single-scale (an assumption: the official training features' scales are
    not published; pass :data:`MULTISCALE` to match the test side).
    """
    name = feature_name or backbone
    ann_path = clusters_path(data_root, trainset)
    if not ann_path.is_file():
        raise CSAInputError(f"{ann_path} not found; download it with `csa download rsfm120k --data-root {data_root}`")
    ann = load_pickle(ann_path)
    ims = Path(data_root, "jpg", trainset, "ims")
    check_output_file(train_features_path(data_root, trainset, name), f"the descriptors of {trainset}")
    dev = extraction_device(device, ranks)
    net = load_backbone(backbone, data_root, dev)
    main = ranks is None or ranks.is_main
    out = {}
    for split in ("train", "val"):
        cids = ann[split]["cids"]
        paths = [sfm_image_path(ims, c) for c in cids]
        if not paths[0].is_file():
            raise CSAInputError(f"rSfM120k images not found (e.g. {paths[0]}); download them with "
                                f"`csa download rsfm120k --data-root {data_root}`")
        out[split] = extract_descriptors(net, paths, image_size=image_size, scales=scales, batch_size=batch_size,
                                         num_workers=num_workers, device=dev, progress=progress and main,
                                         shard_dir=_shard_dir(data_root, trainset, name, split),
                                         shard_size=shard_size or TRAIN_SHARD_SIZE, ranks=ranks,
                                         desc=f"{trainset} {split}")
    if not main:
        return None
    return save_train_features(data_root, trainset, name, out["train"], out["val"])


def prepare_r1m_features(data_root: str | os.PathLike, backbone: str, image_size: int = 1024,
                         scales: Sequence[float] = MULTISCALE, device: str = "auto", batch_size: int = 1,
                         num_workers: int = 8, feature_name: str | None = None, dtype: str = "float16",
                         progress: bool = True, shard_size: int | None = None,
                         ranks: Ranks | None = None) -> Path | None:
    """Descriptors of the revisitop 1M distractors -> ``r1m/<name>.npy`` (fp16 by default, memory-mapped)."""
    from csa.data.r1m import save_distractors

    name = feature_name or backbone
    listing = Path(data_root, "annotations", "revisitop1m", "revisitop1m.txt")
    if not listing.is_file():
        raise CSAInputError(f"{listing} not found; download R1M with `csa download r1m --data-root {data_root}`")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    paths = [Path(data_root, "jpg", "revisitop1m", n) for n in names]
    check_output_file(Path(data_root, "r1m", f"{name}.npy"), "the R1M descriptors")
    dev = extraction_device(device, ranks)
    net = load_backbone(backbone, data_root, dev)
    main = ranks is None or ranks.is_main
    vecs = extract_descriptors(net, paths, image_size=image_size, scales=scales, batch_size=batch_size,
                               num_workers=num_workers, device=dev, progress=progress and main,
                               shard_dir=_shard_dir(data_root, "revisitop1m", name),
                               shard_size=shard_size or R1M_SHARD_SIZE,
                               ranks=ranks, desc="R1M distractors")
    if not main:
        return None
    return save_distractors(np.asarray(vecs), Path(data_root, "r1m", f"{name}.npy"), dtype=dtype)


def prepare(dataset: str, data_root: str | os.PathLike, backbone: str = LITE0, image_size: int | None = None,
            scales: Sequence[float] | None = None, device: str = "auto", num_workers: int | None = None,
            download: bool = False, force: bool = False, progress: bool = True, shard_size: int | None = None,
            ranks: Ranks | None = None) -> dict[str, Path]:
    """Descriptors for ``dataset`` (a key of :data:`DATASETS`); returns ``{name: path written}`` (``{}`` on
    the ranks other than 0 of a torchrun run, see :mod:`csa.descriptors.distributed`).

    ``download`` first fetches the images, annotations and networks the dataset needs.  Unset sizes
    and scales take each dataset's default (demo: 512 px single-scale; test sets: 1024 px multi-scale;
    rSfM120k: 1024 px single-scale); unset ``shard_size`` takes :data:`TEST_SHARD_SIZE` for test sets,
    :data:`TRAIN_SHARD_SIZE` for rSfM120k and :data:`R1M_SHARD_SIZE` for R1M.  Under torchrun, only rank 0
    downloads.
    """
    if dataset not in DATASETS:
        raise CSAInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "demo":
        return prepare_demo_features(data_root, image_size=image_size or 512, scales=scales or (1.0,),
                                     num_workers=num_workers or 0, force=force, device=device, progress=progress,
                                     shard_size=shard_size, ranks=ranks)
    if download:
        from csa.data.download import download_dataset

        if ranks is None or ranks.is_main:
            for group in DATASETS[dataset]:
                download_dataset(group, data_root, progress=progress)
        synchronize(ranks)
    kw = dict(image_size=image_size or 1024, device=device, progress=progress, ranks=ranks)
    if num_workers is not None:
        kw["num_workers"] = num_workers
    if dataset == "rsfm120k":
        path = prepare_train_features(data_root, backbone, scales=scales or (1.0,),
                                      shard_size=shard_size, **kw)
    elif dataset == "r1m":
        path = prepare_r1m_features(data_root, backbone, scales=scales or MULTISCALE,
                                    shard_size=shard_size, **kw)
    else:
        path = prepare_test_features(data_root, dataset, backbone, scales=scales or MULTISCALE, force=force,
                                     shard_size=shard_size, **kw)
    return {} if path is None else {dataset: path}
