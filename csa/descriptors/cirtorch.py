"""The cirtorch ResNet GeM networks of the paper (gl18-tl-resnet*-gem-w, rSfM120k-tl-resnet*-gem-w).

Official ``.pth`` files (``{'state_dict', 'meta'}``, Radenović et al.) load into a
:class:`~csa.descriptors.networks.GeMNetwork` with the torchvision ResNet trunk.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from csa.checkpoint import state_dict_mismatch
from csa.descriptors.networks import GeMNetwork
from csa.descriptors.pooling import GeM, Whitening
from csa.validation import CSAInputError

__all__ = ["cirtorch_gem_network", "load_cirtorch_network", "CIRTORCH_OUTPUT_DIM", "IMAGENET_MEAN", "IMAGENET_STD"]

#: Descriptor dimension of the torchvision ResNets supported by :func:`cirtorch_gem_network`.
CIRTORCH_OUTPUT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def cirtorch_gem_network(arch: str = "resnet101", state_dict: Mapping[str, torch.Tensor] | None = None,
                         meta: Mapping[str, Any] | None = None, whitening: bool | None = None,
                         lw: Mapping[str, Any] | None = None) -> GeMNetwork:
    """Build a cirtorch-layout GeM network: torchvision ResNet trunk (``features.0`` .. ``features.7``),
    ``pool.p`` (learnable GeM power), optional ``whiten`` Linear(D, D); load ``state_dict`` if given.

    ``whitening`` defaults to ``meta['whitening']`` (False without meta).  ``lw`` = ``{'m', 'P'}`` adds a
    post-hoc learned whitening after the network.  Random weights when no ``state_dict`` is given.
    """
    if arch not in CIRTORCH_OUTPUT_DIM:
        raise CSAInputError(f"unsupported architecture {arch!r}; choose one of {sorted(CIRTORCH_OUTPUT_DIM)}")
    meta = dict(meta or {})
    if meta.get("pooling", "gem") != "gem" or meta.get("regional", False) or meta.get("local_whitening", False):
        raise CSAInputError(f"only global GeM networks are supported, meta says pooling={meta.get('pooling')!r}, "
                            f"regional={meta.get('regional')}, local_whitening={meta.get('local_whitening')}")
    if whitening is None:
        whitening = bool(meta.get("whitening", False))
    dim = CIRTORCH_OUTPUT_DIM[arch]
    resnet = getattr(torchvision.models, arch)(weights=None)
    features = nn.Sequential(*list(resnet.children())[:-2])  # ends with layer4 (ReLU inside): non-negative maps
    whiten = nn.Linear(dim, dim, bias=True) if whitening else None
    full_meta = {"architecture": arch, "pooling": "gem", "whitening": whitening,
                 "mean": list(meta.get("mean", IMAGENET_MEAN)), "std": list(meta.get("std", IMAGENET_STD)),
                 "outputdim": dim, **{k: v for k, v in meta.items() if k not in ("mean", "std", "outputdim")}}
    full_meta["whitening"] = whitening
    post = Whitening(lw["m"], lw["P"]) if lw is not None else None
    if post is not None:
        full_meta["outputdim"] = int(post.P.shape[0])
    net = GeMNetwork(features, GeM(3.0, learnable=True), whiten, full_meta, post)
    if state_dict is not None:
        _load_checked(net, state_dict)
    return net.eval()


def _load_checked(net: GeMNetwork, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith("post_whiten.")}
    problems = state_dict_mismatch(expected, state_dict, limit=4)
    if problems:
        raise CSAInputError(f"cirtorch state_dict does not fit {net.meta['architecture']} "
                            f"(whitening={net.meta['whitening']}): {problems}; check the meta's "
                            f"architecture/whitening or the file")
    net.load_state_dict(state_dict, strict=False)


def load_cirtorch_network(path: str | os.PathLike, lw: str | None = None, multiscale: bool = False,
                          trusted: bool = False, device: str | torch.device = "cpu") -> GeMNetwork:
    """Load an official cirtorch ``.pth`` ({'state_dict', 'meta'}) into a :class:`GeMNetwork` (eval mode).

    ``lw`` names a precomputed post-hoc whitening in ``meta['Lw']`` (e.g. ``'retrieval-SfM-120k'``), taking
    its ``'ms'`` or ``'ss'`` entry by ``multiscale``.  The file is read with ``weights_only=True``; files
    whose meta holds numpy arrays need ``trusted=True`` (full unpickling: only for files you trust, e.g.
    ones whose hash was checked on download).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as exc:
        raise CSAInputError(f"{path} holds objects beyond tensors (e.g. numpy arrays in meta['Lw']); if the file "
                            f"is the official one, load it with trusted=True") from exc
    except FileNotFoundError as exc:
        raise CSAInputError(f"network file {path} not found; download it (csa download networks)") from exc
    except Exception as exc:  # truncated or foreign file
        raise CSAInputError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {exc}); "
                            f"re-download it") from exc
    if not isinstance(state, dict) or "state_dict" not in state or "meta" not in state:
        raise CSAInputError(f"{path} is not in the cirtorch layout {{'state_dict', 'meta'}}; "
                            f"got keys {sorted(state) if isinstance(state, dict) else type(state).__name__}")
    meta = state["meta"]
    for key in ("architecture", "pooling", "mean", "std"):
        if key not in meta:
            raise CSAInputError(f"{path}: meta lacks {key!r}; it is not a cirtorch network file")
    post = None
    if lw is not None:
        available = sorted(meta.get("Lw", {}))
        if lw not in meta.get("Lw", {}):
            raise CSAInputError(f"{path} has no precomputed whitening {lw!r}; available: {available}")
        post = meta["Lw"][lw]["ms" if multiscale else "ss"]
    net = cirtorch_gem_network(meta["architecture"], state["state_dict"], meta, lw=post)
    return net.to(device)
