"""Descriptor extraction for the full data: ROxf/RPar test sets, rSfM120k training sets, R1M distractors.

Each function reads images from the data-root layout that :mod:`csa.download` fills and writes the
descriptors where training and re-ranking look for them (``docs/ARCHITECTURE.md``)::

    prepare_test_features(root, "roxford5k", "gl18-tl-resnet101-gem-w")   # test/roxford5k/<name>.pkl
    prepare_train_features(root, "gl18-tl-resnet101-gem-w")               # train/<name>.pkl (rSfM120k)
    prepare_r1m_features(root, "gl18-tl-resnet101-gem-w")                 # r1m/<name>.npy (fp16)

Extraction is resumable: images are processed in shards under ``<root>/cache/extract/`` and a rerun
skips finished shards. Defaults follow cirtorch's test protocol for the gl18 networks: 1024 px on the long
side, scales 1, 1/sqrt(2), sqrt(2), queries cropped to their box.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from csa.validation import CSAInputError

__all__ = ["MULTISCALE", "resolve_device", "load_backbone", "prepare_test_features", "prepare_train_features",
           "prepare_r1m_features", "sfm_image_path"]

#: cirtorch's multi-scale setting for the GeM networks.
MULTISCALE = (1.0, 1 / math.sqrt(2), math.sqrt(2))


def resolve_device(device: str = "auto") -> torch.device:
    """``'auto'`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CSAInputError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'")
    return torch.device(device)


def load_backbone(backbone: str, data_root: str | os.PathLike, device: str | torch.device = "cpu",
                  whitening: str | None = "retrieval-SfM-120k") -> torch.nn.Module:
    """``'lite0'`` (offline EfficientNet-Lite0 GeM) or a cirtorch network name found in ``<root>/networks/``.

    For the cirtorch networks the learned whitening inside the checkpoint is used (the ``-w`` networks);
    ``whitening`` names a post-hoc whitening in ``meta['Lw']`` when the file has one.
    """
    from csa.backbones import efficientnet_lite0_gem, load_cirtorch_network

    if backbone == "lite0":
        return efficientnet_lite0_gem().to(device).eval()
    candidates = sorted(Path(data_root, "networks").glob(f"{backbone}*.pth"))
    if not candidates:
        raise CSAInputError(f"no network file for {backbone!r} in {Path(data_root, 'networks')}; download it "
                            f"with `python -m csa.download {backbone} --data-root {data_root}`")
    # Official files carry numpy arrays in meta['Lw']: they are trusted only because download checks them.
    net = load_cirtorch_network(candidates[0], trusted=True, device=device)
    return net.eval()


def _shard_dir(data_root: str | os.PathLike, *parts: str) -> Path:
    return Path(data_root, "cache", "extract", *parts)


def prepare_test_features(data_root: str | os.PathLike, dataset: str, backbone: str, image_size: int = 1024,
                          scales: Sequence[float] = MULTISCALE, device: str = "auto", batch_size: int = 1,
                          num_workers: int = 4, feature_name: str | None = None, progress: bool = True) -> Path:
    """Descriptors of ``dataset``'s database and (box-cropped) queries -> ``test/<dataset>/<name>.pkl``."""
    from csa.datasets import load_gnd, save_test_features
    from csa.extract import extract_descriptors

    name = feature_name or backbone
    cfg = load_gnd(data_root, dataset)
    img_dir = Path(data_root, "jpg", dataset)
    db_paths = [img_dir / f"{n}.jpg" for n in cfg["imlist"]]
    q_paths = [img_dir / f"{n}.jpg" for n in cfg["qimlist"]]
    missing = [p for p in db_paths[:1] + q_paths[:1] if not p.is_file()]
    if missing:
        raise CSAInputError(f"images of {dataset} not found (e.g. {missing[0]}); download them with "
                            f"`python -m csa.download {dataset} --data-root {data_root}`")
    dev = resolve_device(device)
    net = load_backbone(backbone, data_root, dev)
    kw = dict(image_size=image_size, scales=scales, batch_size=batch_size, num_workers=num_workers, device=dev,
              progress=progress)
    db = extract_descriptors(net, db_paths, shard_dir=_shard_dir(data_root, dataset, name, "db"), **kw)
    bbxs = [list(map(float, g["bbx"])) for g in cfg["gnd"]]
    q = extract_descriptors(net, q_paths, bbxs=bbxs, shard_dir=_shard_dir(data_root, dataset, name, "query"), **kw)
    return save_test_features(data_root, dataset, name, query=q, db=db)


def sfm_image_path(ims_root: str | os.PathLike, cid: str) -> Path:
    """cirtorch's rSfM120k file layout: ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``."""
    return Path(ims_root, cid[-2:], cid[-4:-2], cid[-6:-4], cid)


def prepare_train_features(data_root: str | os.PathLike, backbone: str, trainset: str = "retrieval-SfM-120k",
                           image_size: int = 1024, scales: Sequence[float] = (1.0,), device: str = "auto",
                           batch_size: int = 1, num_workers: int = 4, feature_name: str | None = None,
                           progress: bool = True) -> Path:
    """Descriptors of every train/val image of rSfM120k -> ``train/<trainset>/<name>.pkl``.

    The image order is that of ``annotations/<trainset>.pkl`` (its ``cids``), so row i has cluster i.
    """
    from csa.datasets import clusters_path, save_train_features
    from csa.extract import extract_descriptors
    from csa.io import load_pickle

    name = feature_name or backbone
    ann_path = clusters_path(data_root, trainset)
    if not ann_path.is_file():
        raise CSAInputError(f"{ann_path} not found; download it with `python -m csa.download rsfm120k "
                            f"--data-root {data_root}`")
    ann = load_pickle(ann_path)
    ims = Path(data_root, "jpg", trainset, "ims")
    dev = resolve_device(device)
    net = load_backbone(backbone, data_root, dev)
    out = {}
    for split in ("train", "val"):
        cids = ann[split]["cids"]
        paths = [sfm_image_path(ims, c) for c in cids]
        if not paths[0].is_file():
            raise CSAInputError(f"rSfM120k images not found (e.g. {paths[0]}); download them with "
                                f"`python -m csa.download rsfm120k --data-root {data_root}`")
        out[split] = extract_descriptors(net, paths, image_size=image_size, scales=scales, batch_size=batch_size,
                                         num_workers=num_workers, device=dev, progress=progress,
                                         shard_dir=_shard_dir(data_root, trainset, name, split))
    return save_train_features(data_root, trainset, name, out["train"], out["val"])


def prepare_r1m_features(data_root: str | os.PathLike, backbone: str, image_size: int = 1024,
                         scales: Sequence[float] = MULTISCALE, device: str = "auto", batch_size: int = 1,
                         num_workers: int = 8, feature_name: str | None = None, dtype: str = "float16",
                         progress: bool = True) -> Path:
    """Descriptors of the revisitop 1M distractors -> ``r1m/<name>.npy`` (fp16 by default, memory-mapped)."""
    from csa.extract import extract_descriptors
    from csa.r1m import save_distractors

    name = feature_name or backbone
    listing = Path(data_root, "annotations", "revisitop1m", "revisitop1m.txt")
    if not listing.is_file():
        raise CSAInputError(f"{listing} not found; download R1M with `python -m csa.download r1m "
                            f"--data-root {data_root}`")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    paths = [Path(data_root, "jpg", "revisitop1m", n) for n in names]
    dev = resolve_device(device)
    net = load_backbone(backbone, data_root, dev)
    vecs = extract_descriptors(net, paths, image_size=image_size, scales=scales, batch_size=batch_size,
                               num_workers=num_workers, device=dev, progress=progress,
                               shard_dir=_shard_dir(data_root, "revisitop1m", name), shard_size=4096)
    return save_distractors(np.asarray(vecs), Path(data_root, "r1m", f"{name}.npy"), dtype=dtype)
