"""Build a global-descriptor network by name: an offline EfficientNet-Lite (0/1/2) or a cirtorch GeM file.

The factory sits above the two families (:mod:`csa.descriptors.lite0`, :mod:`csa.descriptors.cirtorch`),
which build on :class:`csa.descriptors.networks.GeMNetwork`, so imports run one way.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from csa.descriptors.cirtorch import load_cirtorch_network
from csa.descriptors.lite0 import efficientnet_lite_gem
from csa.descriptors.networks import LITE_BACKBONES, GeMNetwork
from csa.validation import CSAInputError

__all__ = ["load_backbone"]


def load_backbone(backbone: str, data_root: str | os.PathLike, device: str | torch.device = "cpu") -> GeMNetwork:
    """``'lite0'``/``'lite1'``/``'lite2'`` (offline EfficientNet-Lite GeM) or a cirtorch network name found in
    ``<root>/networks/``.

    The cirtorch ``-gem-w`` networks carry their learned whitening inside the checkpoint; it is applied.
    """
    if backbone in LITE_BACKBONES:
        return efficientnet_lite_gem(backbone).to(device).eval()
    candidates = sorted(Path(data_root, "networks").glob(f"{backbone}*.pth"))
    if not candidates:
        raise CSAInputError(f"no network file for {backbone!r} in {Path(data_root, 'networks')}; download it "
                            f"with `csa download networks --data-root {data_root}`")
    # Official files carry numpy arrays in meta['Lw']: they are trusted only because download checks them.
    return load_cirtorch_network(candidates[0], trusted=True, device=device).eval()
