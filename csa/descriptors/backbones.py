"""Build a global-descriptor network by name: the offline EfficientNet-Lite0 or a cirtorch GeM file.

The factory sits above the two families (:mod:`csa.descriptors.lite0`, :mod:`csa.descriptors.cirtorch`),
which build on :class:`csa.descriptors.networks.GeMNetwork`, so imports run one way.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from csa.descriptors.cirtorch import load_cirtorch_network
from csa.descriptors.lite0 import efficientnet_lite0_gem
from csa.descriptors.networks import LITE0, GeMNetwork
from csa.validation import CSAInputError

__all__ = ["load_backbone"]


def load_backbone(backbone: str, data_root: str | os.PathLike, device: str | torch.device = "cpu") -> GeMNetwork:
    """``'lite0'`` (offline EfficientNet-Lite0 GeM) or a cirtorch network name found in ``<root>/networks/``.

    The cirtorch ``-gem-w`` networks carry their learned whitening inside the checkpoint; it is applied.
    """
    if backbone == LITE0:
        return efficientnet_lite0_gem().to(device).eval()
    candidates = sorted(Path(data_root, "networks").glob(f"{backbone}*.pth"))
    if not candidates:
        raise CSAInputError(f"no network file for {backbone!r} in {Path(data_root, 'networks')}; download it "
                            f"with `csa download networks --data-root {data_root}`")
    # Official files carry numpy arrays in meta['Lw']: they are trusted only because download checks them.
    return load_cirtorch_network(candidates[0], trusted=True, device=device).eval()
