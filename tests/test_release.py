"""Released demo weights: file, manifest with sha256, and the comparison with a retrained model."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from csa.checkpoint import load_model
from csa.training.release import compare_to_release, release, released_checkpoint
from csa.training.train import run_training
from csa.validation import CSAInputError

from _train_helpers import TOY_TRAINSET, tiny_config, write_toy_trainset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_release_writes_weights_and_manifest_and_compares(tmp_path):
    write_toy_trainset(tmp_path)
    run = run_training(tiny_config(tmp_path, "a", num_epochs=1))
    out = release(run["checkpoint"], tmp_path / "demo", TOY_TRAINSET, "demo", "csa train --recipe demo ...", "toy5k")
    assert out == released_checkpoint(tmp_path / "demo", TOY_TRAINSET)
    manifest = json.loads((out.parent / "manifest.json").read_text())[out.name]
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["recipe"] == "demo" and manifest["tested_on"] == "toy5k"
    assert "optimizer" not in torch.load(out, weights_only=False)           # weights and config only
    same = compare_to_release(run["checkpoint"], out)
    assert same["identical"] and same["max_abs_diff"] == 0.0
    other = run_training(tiny_config(tmp_path, "b", num_epochs=1, seed=3))
    diff = compare_to_release(other["checkpoint"], out)
    assert not diff["identical"] and diff["max_abs_diff"] > 0
    torch.testing.assert_close(load_model(out).state_dict(), load_model(run["checkpoint"]).state_dict())
    with pytest.raises(CSAInputError, match="no released weights"):
        released_checkpoint(tmp_path / "demo", "nope")
