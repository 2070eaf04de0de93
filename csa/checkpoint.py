"""Saving and loading RerankTransformer checkpoints.

Format: ``{'epoch': int, 'state_dict': {...}, 'config': model.config, **extra}`` written with
``torch.save`` atomically.  Official CSA checkpoints (``{'epoch', 'state_dict'}``, no config) load
too: the architecture is inferred from the parameter shapes (``anchor_len`` and ``embed_dim`` from
``topk_proj.weight``, ``depth`` from the number of blocks, ``mlp_ratio`` from ``mlp.fc1``,
``qkv_bias`` from the presence of ``attn.qkv.bias``); ``num_heads`` cannot be read from the
weights, so it is 12 (the paper's value) unless given.  Loading uses ``weights_only=True``, so a
checkpoint can never run code.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from .io import atomic_write
from .model import RerankTransformer
from .validation import CSAInputError

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_checked", "infer_config"]

_SHAPE_ARGS = ("anchor_len", "embed_dim", "depth", "mlp_ratio", "qkv_bias")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(path: str | os.PathLike, model: nn.Module, epoch: int, **extra: Any) -> None:
    """Write ``{'epoch', 'state_dict', 'config', **extra}`` to ``path`` atomically.

    ``model`` may be wrapped in DistributedDataParallel; tensors are saved on the CPU.  ``extra``
    values should be plain Python data, tensors or state dicts (what ``weights_only`` loading accepts).
    """
    model = _unwrap(model)
    ckpt = {"epoch": int(epoch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": dict(model.config) if hasattr(model, "config") else None}
    clash = set(extra) & set(ckpt)
    if clash:
        raise CSAInputError(f"extra checkpoint fields {sorted(clash)} clash with reserved keys; rename them")
    ckpt.update(extra)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) into a dict with a ``'state_dict'``.

    A bare state dict is wrapped as ``{'state_dict': sd}``; a ``'module.'`` prefix left by
    DistributedDataParallel is removed.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CSAInputError(f"no checkpoint file at {path!r}; check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused...
        raise CSAInputError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                            f"the file is truncated, corrupt or not a torch checkpoint — re-download or re-save it") from e
    if not isinstance(obj, Mapping):
        raise CSAInputError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict with 'state_dict'")
    if "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {"state_dict": dict(obj)}
        else:
            raise CSAInputError(f"checkpoint {path!r} has no 'state_dict' entry (keys: {sorted(obj)[:10]})")
    obj = dict(obj)
    sd = obj["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        obj["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return obj


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int = 12) -> dict[str, Any]:
    """Architecture arguments of :class:`RerankTransformer` read from parameter shapes."""
    if "topk_proj.weight" not in state_dict:
        raise CSAInputError("state dict has no 'topk_proj.weight'; it is not a CSA RerankTransformer checkpoint")
    embed_dim, anchor_len = state_dict["topk_proj.weight"].shape
    blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    cfg: dict[str, Any] = dict(anchor_len=int(anchor_len), embed_dim=int(embed_dim), depth=depth,
                               num_heads=int(num_heads), qkv_bias="blocks.0.attn.qkv.bias" in state_dict or depth == 0)
    if "blocks.0.mlp.fc1.weight" in state_dict:
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        ratio = hidden / embed_dim
        cfg["mlp_ratio"] = int(ratio) if ratio == int(ratio) else ratio
    return cfg


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` with one clear error listing every
    missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape mismatches [" + "; ".join(shapes) + "]")
        raise CSAInputError("checkpoint does not match the model architecture: " + ", ".join(parts)
                            + "; build the model with the checkpoint's config (see csa.checkpoint.infer_config)")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> RerankTransformer:
    """Build a :class:`RerankTransformer` from a checkpoint and load its weights (eval mode).

    ``overrides`` replace config entries (e.g. ``num_heads`` for official checkpoints, or dropout
    rates); asking for an architecture different from the checkpoint's (``anchor_len`` etc.)
    raises :class:`CSAInputError`.
    """
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    stored = ckpt.get("config")
    inferred = infer_config(sd, num_heads=overrides.get("num_heads", (stored or {}).get("num_heads", 12)))
    cfg = dict(stored) if stored else dict(inferred)
    for key in _SHAPE_ARGS:
        if key in overrides and key in inferred and overrides[key] != inferred[key]:
            what = "anchors L" if key == "anchor_len" else key
            raise CSAInputError(f"{key}={overrides[key]!r} was requested but checkpoint {os.fspath(path)!r} was "
                                f"trained with {key}={inferred[key]!r} ({what} is fixed by the weights); use "
                                f"{key}={inferred[key]!r}")
    unknown = set(overrides) - set(_all_args())
    if unknown:
        raise CSAInputError(f"unknown model argument(s) {sorted(unknown)}; valid: {sorted(_all_args())}")
    cfg.update(overrides)
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise CSAInputError(f"num_heads={cfg['num_heads']} does not divide embed_dim={cfg['embed_dim']}; pass "
                            f"the num_heads the checkpoint was trained with")
    model = RerankTransformer(**cfg)
    load_state_dict_checked(model, sd)
    return model.to(device).eval()


def _all_args() -> tuple[str, ...]:
    return ("anchor_len", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "drop_rate",
            "attn_drop_rate", "drop_path_rate")
