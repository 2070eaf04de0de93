"""Saving and loading checkpoints: the one place where model and training-run files are written and read.

Model checkpoint format: ``{'epoch': int, 'state_dict': {...}, 'config': model.config, **extra}`` written with
``torch.save`` atomically.  Official CSA checkpoints (``{'epoch', 'state_dict'}``, no config) load
too: the architecture is inferred from the parameter shapes (``anchor_len`` and ``embed_dim`` from
``topk_proj.weight``, ``depth`` from the number of blocks, ``mlp_ratio`` from ``mlp.fc1``,
``qkv_bias`` from the presence of ``attn.qkv.bias``); ``num_heads`` cannot be read from the
weights, so it is 12 (the paper's value) unless given, and :func:`load_model` warns when it had to
assume it.  Loading uses ``weights_only=True``, so a checkpoint can never run code.

Integrity: :func:`save_checkpoint` refuses non-finite weights and stores ``'digest'``, a sha256 of
every tensor and value in the file; :func:`load_checkpoint` recomputes it and refuses a file whose
content changed (bytes flipped on disk, a bad copy).  Official files carry no digest: their weights
are checked to be finite instead (every load checks that too).

Training runs save the same file with the optimizer, schedule, scaler, RNG and history states added
(:func:`save_run_checkpoint`); :func:`load_run_checkpoint` reads it back for ``--resume``.
"""
from __future__ import annotations

import hashlib
import inspect
import os
import re
import warnings
from typing import Any, Mapping

import torch
import torch.nn as nn

from csa.fileio import atomic_write, check_manifest_digest
from csa.model import RerankTransformer, unwrap
from csa.validation import CSAInputError

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "load_state_dict_checked", "state_dict_mismatch",
           "infer_config", "checkpoint_digest", "DIGEST_KEY", "PAPER_NUM_HEADS",
           "save_run_checkpoint", "load_run_checkpoint", "RUN_STATE_KEYS"]

_SHAPE_ARGS = ("anchor_len", "embed_dim", "depth", "mlp_ratio", "qkv_bias")
#: Every argument of the RerankTransformer constructor (what ``load_model`` overrides may name).
_MODEL_ARGS = tuple(inspect.signature(RerankTransformer).parameters)
#: What a resumable training checkpoint holds besides the model's weights.
RUN_STATE_KEYS = ("optimizer", "schedule")
#: Checkpoint entry holding ``'sha256:<hex>'`` of everything else in the file.
DIGEST_KEY = "digest"
#: Head count assumed for official checkpoints, which do not record it (the paper's value).
PAPER_NUM_HEADS = 12


def _feed(h: "hashlib._Hash", value: Any) -> None:
    """Add ``value`` (nested dicts / lists / tuples of tensors and plain values) to the hash ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, Mapping):
        h.update(f"dict{len(value)}:".encode())
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}:".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def checkpoint_digest(ckpt: Mapping[str, Any]) -> str:
    """``'sha256:<hex>'`` of every entry of a checkpoint dict except :data:`DIGEST_KEY`."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in ckpt.items() if k != DIGEST_KEY})
    return "sha256:" + h.hexdigest()


def _non_finite(state_dict: Mapping[str, Any]) -> list[str]:
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_checkpoint(path: str | os.PathLike, model: nn.Module, epoch: int, **extra: Any) -> None:
    """Write ``{'epoch', 'state_dict', 'config', **extra}`` to ``path`` atomically.

    ``model`` may be wrapped in DistributedDataParallel; tensors are saved on the CPU.  ``extra``
    values should be plain Python data, tensors or state dicts (what ``weights_only`` loading accepts).
    """
    model = unwrap(model)
    ckpt = {"epoch": int(epoch),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": dict(model.config) if hasattr(model, "config") else None}
    clash = set(extra) & (set(ckpt) | {DIGEST_KEY})
    if clash:
        raise CSAInputError(f"extra checkpoint fields {sorted(clash)} clash with reserved keys; rename them")
    bad = _non_finite(ckpt["state_dict"])
    if bad:
        raise CSAInputError(f"the model's weights are not finite (NaN or inf in {bad[:3]}); {os.fspath(path)} was "
                            f"not written, so an earlier checkpoint there is kept")
    ckpt.update(extra)
    ckpt[DIGEST_KEY] = checkpoint_digest(ckpt)
    with atomic_write(path, "wb") as f:
        torch.save(ckpt, f)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) into a dict with a ``'state_dict'``.

    A file listed in a ``manifest.json`` beside it (released weights) must have the sha256 recorded there.
    A bare state dict is wrapped as ``{'state_dict': sd}``; a ``'module.'`` prefix left by
    DistributedDataParallel is removed.  A stored digest is verified and the weights must be
    finite; every unreadable file raises one :class:`CSAInputError` naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CSAInputError(f"no checkpoint file at {path!r}; check the path")
    if os.path.getsize(path) == 0:
        raise CSAInputError(f"checkpoint {path!r} is empty (0 bytes): it was never written completely; "
                            f"re-download or re-save it")
    check_manifest_digest(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unpickling refused...
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CSAInputError(f"cannot read checkpoint {path!r} ({type(e).__name__}: {first}); "
                            f"the file is truncated, corrupt or not a torch checkpoint — re-download or re-save it") from e
    if not isinstance(obj, Mapping):
        raise CSAInputError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict with 'state_dict'")
    if "state_dict" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = {"state_dict": dict(obj)}
        else:
            raise CSAInputError(f"checkpoint {path!r} has no 'state_dict' entry (keys: {sorted(obj)[:10]})")
    obj = dict(obj)
    if DIGEST_KEY in obj and obj[DIGEST_KEY] != checkpoint_digest(obj):
        raise CSAInputError(f"checkpoint {path!r} is corrupt: its content no longer matches the digest stored when "
                            f"it was saved (bytes changed on disk or in a copy); use another copy or re-train")
    sd = obj["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CSAInputError(f"checkpoint {path!r}: 'state_dict' must map parameter names to tensors")
    bad = _non_finite(sd)
    if bad:
        raise CSAInputError(f"checkpoint {path!r} holds non-finite weights (NaN or inf in {bad[:3]}"
                            f"{' and more' if len(bad) > 3 else ''}): the model diverged or the file is damaged; "
                            f"it cannot re-rank anything")
    if sd and all(k.startswith("module.") for k in sd):
        obj["state_dict"] = {k[len("module."):]: v for k, v in sd.items()}
    return obj


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int = PAPER_NUM_HEADS) -> dict[str, Any]:
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


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                        limit: int | None = None) -> str:
    """'' when ``given`` has exactly the keys and shapes of ``expected``; otherwise a description of the
    missing keys, unexpected keys and shape mismatches (at most ``limit`` of each)."""
    def cut(items: list[str]) -> str:
        return str(items if limit is None or len(items) <= limit else items[:limit] + ["..."])

    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = ([f"missing keys {cut(missing)}"] if missing else []) + \
            ([f"unexpected keys {cut(unexpected)}"] if unexpected else []) + \
            ([f"shape mismatches {cut(shapes)}"] if shapes else [])
    return ", ".join(parts)


def load_state_dict_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` with one clear error listing every
    missing key, unexpected key and shape mismatch."""
    problems = state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CSAInputError("checkpoint does not match the model architecture: " + problems
                            + "; build the model with the checkpoint's config (see csa.checkpoint.infer_config)")
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", **overrides: Any) -> RerankTransformer:
    """Build a :class:`RerankTransformer` from a checkpoint and load its weights (eval mode).

    ``overrides`` replace config entries: architecture arguments the weights cannot tell
    (``num_heads`` of an official checkpoint, which has no config: without it the paper's 12 is
    assumed, with a warning saying so) and dropout rates.  Asking for an architecture different from
    the one the checkpoint records or its weights fix (``anchor_len``, ``embed_dim``, ``num_heads``
    of a ``csa train`` checkpoint...) raises :class:`CSAInputError`.
    """
    ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    stored = ckpt.get("config")
    unknown = set(overrides) - set(_MODEL_ARGS)
    if unknown:
        raise CSAInputError(f"unknown model argument(s) {sorted(unknown)}; valid: {sorted(_MODEL_ARGS)}")
    assumed = not stored and "num_heads" not in overrides
    inferred = infer_config(sd, num_heads=overrides.get("num_heads", (stored or {}).get("num_heads", PAPER_NUM_HEADS)))
    cfg = dict(stored) if stored else dict(inferred)
    fixed = {**inferred, **({"num_heads": stored["num_heads"]} if stored and "num_heads" in stored else {})}
    for key in (*_SHAPE_ARGS, "num_heads"):
        if key in overrides and key in fixed and overrides[key] != fixed[key] and (key != "num_heads" or stored):
            what = "anchors L" if key == "anchor_len" else key
            why = "is fixed by the weights" if key != "num_heads" else "is recorded in the checkpoint's config"
            raise CSAInputError(f"{key}={overrides[key]!r} was requested but checkpoint {os.fspath(path)!r} was "
                                f"trained with {key}={fixed[key]!r} ({what} {why}); use {key}={fixed[key]!r}")
    cfg.update(overrides)
    if cfg["embed_dim"] % cfg["num_heads"]:
        guess = (f" (checkpoint {os.fspath(path)!r} does not record its head count, so the paper's "
                 f"{PAPER_NUM_HEADS} was assumed)" if assumed else "")
        raise CSAInputError(f"num_heads={cfg['num_heads']} does not divide embed_dim={cfg['embed_dim']}{guess}; pass "
                            f"the num_heads the checkpoint was trained with (csa rerank --num-heads)")
    if assumed:
        warnings.warn(f"checkpoint {os.fspath(path)!r} does not record its head count (official format): "
                      f"num_heads={PAPER_NUM_HEADS} (the paper's value) was assumed; a model trained with another "
                      f"head count scores differently — pass num_heads=... (csa rerank --num-heads) to set it",
                      UserWarning, stacklevel=2)
    model = RerankTransformer(**cfg)
    load_state_dict_checked(model, sd)
    return model.to(device).eval()


def save_run_checkpoint(path: str | os.PathLike, model: nn.Module, epoch: int, **state: Any) -> None:
    """A resumable training checkpoint: :func:`save_checkpoint` plus the run's ``state``
    (``optimizer``, ``schedule``, ``scaler``, ``rng``, ``train_config``, ``history`` ...)."""
    missing = [k for k in RUN_STATE_KEYS if k not in state]
    if missing:
        raise CSAInputError(f"a run checkpoint needs {missing}; pass them to save_run_checkpoint")
    save_checkpoint(path, model, epoch, **state)


def load_run_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_run_checkpoint` (for ``--resume``)."""
    ckpt = load_checkpoint(path)
    missing = [k for k in ("epoch", *RUN_STATE_KEYS) if k not in ckpt]
    if missing:
        raise CSAInputError(f"checkpoint {os.fspath(path)} lacks {missing}: it is not a resumable training "
                            f"checkpoint (weights-only checkpoints can be evaluated but not resumed)")
    return ckpt
