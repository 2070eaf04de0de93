"""Released demo weights: the two cross-city models, committed with their sha256, recipe and command.

``data/demo/weights/<trainset>.pth`` holds the model trained on ``<trainset>`` (weights and config only),
and ``data/demo/weights/manifest.json`` records for each file its sha256, the recipe, the exact command that
produced it and the benchmark it is tested on.  Notebooks re-rank with these files by default, so every
notebook but the training one runs in seconds on a fresh clone; the main job retrains the models and
:func:`compare_to_release` reports how the retrained weights compare with the released ones.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from csa.checkpoint import load_checkpoint, load_model, save_checkpoint
from csa.fileio import atomic_write, sha256_file
from csa.validation import CSAInputError

__all__ = ["WEIGHTS_DIR", "released_checkpoint", "release", "compare_to_release", "compare_retrained"]

#: Folder of the released weights inside the demo data root.
WEIGHTS_DIR = "weights"


def released_checkpoint(root: str | os.PathLike, trainset: str) -> Path:
    """``<root>/weights/<trainset>.pth``; a clear error when it is missing."""
    path = Path(root, WEIGHTS_DIR, f"{trainset}.pth")
    if not path.is_file():
        raise CSAInputError(f"no released weights at {path}; train them with notebook 2 or `csa train --recipe "
                            f"demo ...` and release them with csa.training.release.release")
    return path


def release(checkpoint: str | os.PathLike, root: str | os.PathLike, trainset: str, recipe: str, command: str,
            tested_on: str) -> Path:
    """Write the model of ``checkpoint`` to ``<root>/weights/<trainset>.pth`` and record it in the manifest."""
    model = load_model(checkpoint)
    out = Path(root, WEIGHTS_DIR, f"{trainset}.pth")
    save_checkpoint(out, model, epoch=int(load_checkpoint(checkpoint).get("epoch", 0)))
    manifest_path = out.parent / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest[out.name] = {"sha256": sha256_file(out), "trainset": trainset, "recipe": recipe, "command": command,
                          "tested_on": tested_on, "config": model.config}
    with atomic_write(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return out


def compare_to_release(checkpoint: str | os.PathLike, released: str | os.PathLike) -> dict[str, Any]:
    """``{'identical', 'max_abs_diff', 'parameters'}`` between a checkpoint's weights and the released ones."""
    a, b = load_model(checkpoint).state_dict(), load_model(released).state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return {"identical": False, "max_abs_diff": float("inf"), "parameters": sum(v.numel() for v in a.values())}
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    return {"identical": diff == 0.0, "max_abs_diff": diff, "parameters": sum(v.numel() for v in a.values())}


def compare_retrained(root: str | os.PathLike, trainset: str, checkpoint: str | os.PathLike,
                      n_boot: int = 200) -> list[dict[str, Any]]:
    """A retrained model of ``trainset`` against its released weights: one row per test benchmark with
    whether the weights are identical, their largest difference and both models' CSA Medium mAP."""
    from csa.training.selection import csa_gain, held_out_benchmark, test_benchmarks

    released = released_checkpoint(root, trainset)
    same = compare_to_release(checkpoint, released)
    models = {"retrained": load_model(checkpoint), "released": load_model(released)}
    rows = []
    for benchmark in test_benchmarks(trainset):
        data = held_out_benchmark(root, benchmark)
        medium = {name: csa_gain(model, *data, n_boot=n_boot)["csa_medium"] for name, model in models.items()}
        rows.append({"trainset": trainset, "benchmark": benchmark, "identical weights": same["identical"],
                     "max |weight difference|": same["max_abs_diff"],
                     "retrained: CSA Medium": medium["retrained"], "released: CSA Medium": medium["released"],
                     "difference": medium["retrained"] - medium["released"]})
    return rows
