"""The folder a training run writes: its files, the rules for reusing it, resuming from it, and its history.

``--output-dir`` must be writable and must not hold another run unless ``--resume`` (which refuses a
stored config that differs in a field that changes the model or the data, :data:`RESUME_FIXED`) or
``--overwrite`` is given.  The neighbour table is cached under ``--cache-dir`` (default
``<data_root>/cache``).
"""
from __future__ import annotations

import csv
import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

from csa.fileio import atomic_write, check_output_dir, remove_stale_temporaries, save_figure
from csa.training.config import TrainConfig, option_flag, resume_given
from csa.training.sampler import neighbour_cache_path
from csa.validation import CSAInputError

__all__ = ["CHECKPOINT_NAME", "HISTORY_COLUMNS", "RESUME_FIXED", "CURVES_EVERY_S", "resolve_resume",
           "prepare_output_dir", "check_resume_matches", "neighbour_cache", "write_history"]

CHECKPOINT_NAME = "checkpoint.pth"
HISTORY_COLUMNS = ["epoch", "lr", "loss", "contrastive", "reconstruction", "skipped", "time"]
#: Config fields that ``--resume`` must find unchanged: they define the model or the data it sees.
RESUME_FIXED = ("trainset", "split", "feature_names", "topk", "anchor_len", "embed_dim", "depth", "num_heads",
                "mlp_ratio", "qkv_bias", "batch_size", "seed")
#: ``curves.png`` is redrawn at most this often (seconds) during a run, and always after the last epoch.
CURVES_EVERY_S = 60.0


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint ``--resume`` names (``auto``: the output folder's, when there is one), or ``None``."""
    if not resume_given(config.resume):
        return None
    if config.resume == "auto":
        path = Path(config.output_dir) / CHECKPOINT_NAME
        return path if path.is_file() else None
    path = Path(config.resume)
    if not path.is_file():
        raise CSAInputError(f"--resume {path}: no such checkpoint; give the path of a checkpoint.pth written by "
                            f"csa train, 'auto', or leave --resume out to start from scratch")
    return path


def prepare_output_dir(config: TrainConfig, resuming: bool, main_process: bool) -> Path:
    """``--output-dir`` before any work: writable, and not holding another run unless resuming or
    ``--overwrite``.  Rank 0 then clears what an interrupted run left (temporary files) and, with
    ``--overwrite``, the old run's per-epoch checkpoints."""
    out = Path(config.output_dir)
    existing = out / CHECKPOINT_NAME
    if existing.is_file() and not resuming and not config.overwrite:
        raise CSAInputError(f"--output-dir {out} already holds a training run ({existing}); continue it with "
                            f"--resume auto, replace it with --overwrite, or choose another --output-dir")
    if main_process:
        check_output_dir(out, "--output-dir")
        remove_stale_temporaries(out)
        if config.overwrite:
            for stale in out.glob("checkpoint-epoch*.pth"):
                stale.unlink()
    return out


def check_resume_matches(ckpt: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume ``ckpt`` with a config that changes the model or the data (:data:`RESUME_FIXED`)."""
    stored = ckpt.get("train_config") or {}
    current = asdict(config)
    changed = [f for f in RESUME_FIXED if f in stored and stored[f] != current[f]]
    if changed:
        diff = ", ".join(f"{option_flag(f)} {stored[f]!r} -> {current[f]!r}" for f in changed)
        raise CSAInputError(f"--resume {path}: the run was trained with other settings ({diff}); resuming would "
                            f"continue a different model or data. Use the stored values, or start a new run "
                            f"(another --output-dir, or --overwrite)")


def neighbour_cache(config: TrainConfig, out: Path) -> Path:
    """Cache file of the neighbour table: under ``--cache-dir`` (default ``<data_root>/cache``); when the
    default is read-only and holds no table yet, under ``<output_dir>/cache`` (with a warning)."""
    def cache_in(folder: Path) -> Path:
        return neighbour_cache_path(folder, config.trainset, config.split, config.topk, config.anchor_len,
                                    config.feature_names)

    folder = Path(config.cache_dir) if config.cache_dir else Path(config.data_root) / "cache"
    if cache_in(folder).is_file():
        return cache_in(folder)
    try:
        check_output_dir(folder, "--cache-dir")
    except CSAInputError:
        if config.cache_dir:
            raise
        warnings.warn(f"{folder} cannot be written (read-only data root?): the neighbour table is cached in "
                      f"{out / 'cache'} instead; choose the place with --cache-dir", stacklevel=2)
        return cache_in(out / "cache")
    return cache_in(folder)


def write_history(history: list[dict[str, Any]], out: Path, draw: bool = True) -> None:
    """``history.json`` and ``history.csv`` (:data:`HISTORY_COLUMNS`), and ``curves.png`` when ``draw``
    (a figure problem warns, never stops training)."""
    with atomic_write(out / "history.json", "w") as f:
        json.dump(history, f, indent=1)
    with atomic_write(out / "history.csv", "w") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    if not draw:
        return
    try:
        from csa.training.curves import plot_training_curves  # matplotlib only when a figure is drawn

        save_figure(plot_training_curves(history), out / "curves.png", dpi=110)
    except Exception as exc:  # a figure problem must never stop training
        warnings.warn(f"could not draw curves.png: {exc}", stacklevel=2)
