"""Released demo weights: the two cross-city models, committed with their sha256, recipe and command.

``data/demo/weights/<trainset>.pth`` holds the model trained on ``<trainset>`` (weights and config only),
and ``data/demo/weights/manifest.json`` records for each file its sha256, the recipe, the exact command that
produced it and the benchmark it is tested on.  Notebooks re-rank with these files by default, so every
notebook but the training one runs in seconds on a fresh clone; the main job retrains the models and
:func:`compare_to_release` reports how the retrained weights compare with the released ones
(:func:`csa.experiments.retrained.compare_retrained` adds their test mAPs).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from csa.checkpoint import load_checkpoint, load_model, save_checkpoint
from csa.fileio import (MANIFEST_NAME, atomic_write, check_manifest_digest, check_output_dir, read_manifest,
                        remove_stale_temporaries, sha256_file)
from csa.validation import CSAInputError

__all__ = ["WEIGHTS_DIR", "released_checkpoint", "release", "compare_to_release", "finish_interrupted_releases",
           "verify_release"]

#: Folder of the released weights inside the demo data root.
WEIGHTS_DIR = "weights"


def released_checkpoint(root: str | os.PathLike, trainset: str) -> Path:
    """``<root>/weights/<trainset>.pth``, checked against its manifest; a clear error when it is missing."""
    path = Path(root, WEIGHTS_DIR, f"{trainset}.pth")
    if path.parent.is_dir():
        finish_interrupted_releases(path.parent)
    if not path.is_file():
        raise CSAInputError(f"no released weights at {path}; train them with notebook 2 or `csa train --recipe "
                            f"demo ...` and release them with csa.training.release.release")
    return verify_release(path)


def release(checkpoint: str | os.PathLike, root: str | os.PathLike, trainset: str, recipe: str, command: str,
            tested_on: str) -> Path:
    """Write the model of ``checkpoint`` to ``<root>/weights/<trainset>.pth`` and record it in the manifest.

    Weights and manifest change together: the weights are staged as ``.<name>.staged``, the manifest
    (the commit point) is rewritten atomically, then the staged file replaces the old one.  A release
    interrupted before the manifest was written leaves the old pair; one interrupted after it is
    completed by :func:`finish_interrupted_releases`, which every release and every verified load runs
    first.  A damaged manifest is refused before anything is written.
    """
    model = load_model(checkpoint)
    out = Path(root, WEIGHTS_DIR, f"{trainset}.pth")
    check_output_dir(out.parent, "the release folder")
    remove_stale_temporaries(out.parent)
    finish_interrupted_releases(out.parent)
    manifest = read_manifest(out.parent)
    staged = _staged(out)
    save_checkpoint(staged, model, epoch=int(load_checkpoint(checkpoint).get("epoch", 0)))
    try:
        manifest[out.name] = {"sha256": sha256_file(staged), "trainset": trainset, "recipe": recipe,
                              "command": command, "tested_on": tested_on, "config": model.config}
        with atomic_write(out.parent / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, out)
    verify_release(out)
    return out


def _staged(out: Path) -> Path:
    return out.with_name(f".{out.name}.staged")


def finish_interrupted_releases(folder: str | os.PathLike) -> list[Path]:
    """Complete or undo releases into ``folder`` that were killed half-way; return the files completed.

    A staged file whose sha256 the manifest already records is moved onto its final name (the manifest
    was written: the release had committed); any other staged file is deleted (it had not).
    """
    folder = Path(folder)
    completed = []
    for staged in sorted(folder.glob(".*.staged")):
        final = folder / staged.name[1:-len(".staged")]
        entry = read_manifest(folder, only=final.name).get(final.name)
        if entry is not None and sha256_file(staged) == entry["sha256"]:
            os.replace(staged, final)
            completed.append(final)
        else:
            staged.unlink(missing_ok=True)
    return completed


def verify_release(path: str | os.PathLike) -> Path:
    """Check a released file against the manifest beside it (finishing an interrupted release first); return it.

    Raises :class:`CSAInputError` when the manifest is damaged, does not list the file, or records
    another sha256.
    """
    path = Path(path)
    finish_interrupted_releases(path.parent)
    if path.name not in read_manifest(path.parent, only=path.name):
        raise CSAInputError(f"{path} is not listed in {path.parent / MANIFEST_NAME}; release it with "
                            f"`csa demo release` so that its sha256 is recorded")
    check_manifest_digest(path)
    return path


def compare_to_release(checkpoint: str | os.PathLike, released: str | os.PathLike) -> dict[str, Any]:
    """``{'identical', 'max_abs_diff', 'parameters'}`` between a checkpoint's weights and the released ones."""
    a, b = load_model(checkpoint).state_dict(), load_model(released).state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return {"identical": False, "max_abs_diff": float("inf"), "parameters": sum(v.numel() for v in a.values())}
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"identical": diff == 0.0, "max_abs_diff": diff, "parameters": sum(v.numel() for v in a.values())}

