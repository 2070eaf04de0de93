"""Released weights and their manifest change together and are verified on every load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from csa.checkpoint import load_checkpoint, load_model, save_checkpoint
from csa.model import RerankTransformer
from csa.training.release import finish_interrupted_releases, release, released_checkpoint, verify_release
from csa.validation import CSAInputError

TRAINSET = "toy-train"


def trained(tmp_path: Path, name: str, seed: int) -> Path:
    torch.manual_seed(seed)
    model = RerankTransformer(anchor_len=16, embed_dim=32, depth=1, num_heads=2)
    path = tmp_path / f"{name}.pth"
    save_checkpoint(path, model, epoch=3)
    return path


def released(tmp_path: Path) -> Path:
    return release(trained(tmp_path, "a", 0), tmp_path / "demo", TRAINSET, "demo", "csa train ...", "toy5k")


def state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_release_file_replaced_by_other_weights_is_refused_everywhere(tmp_path):
    out = released(tmp_path)
    assert verify_release(out) == out and load_model(out).config["anchor_len"] == 16
    trained(tmp_path, "other", 1).replace(out)                   # its own digest is valid, the manifest's is not
    assert load_checkpoint(tmp_path / "a.pth")                   # a file without a manifest loads as before
    for load in (load_model, load_checkpoint, verify_release,
                 lambda p: released_checkpoint(tmp_path / "demo", TRAINSET)):
        with pytest.raises(CSAInputError, match="does not match .*manifest.json"):
            load(out)


def test_a_damaged_manifest_is_refused_before_anything_is_replaced(tmp_path):
    out = released(tmp_path)
    manifest = out.parent / "manifest.json"
    for damage in ("{not json", json.dumps(["a list"]), json.dumps({out.name: {"sha256": "short"}})):
        manifest.write_text(damage)
        before = state(out.parent)
        with pytest.raises(CSAInputError, match="manifest.json is damaged"):
            release(trained(tmp_path, "b", 2), tmp_path / "demo", TRAINSET, "demo", "csa train ...", "toy5k")
        assert state(out.parent) == before
        with pytest.raises(CSAInputError, match="damaged"):
            load_model(out)


def test_a_release_killed_before_its_manifest_keeps_the_old_pair(tmp_path):
    out = released(tmp_path)
    before = state(out.parent)
    staged = out.with_name(f".{out.name}.staged")                # new weights written, manifest not yet
    staged.write_bytes(trained(tmp_path, "b", 2).read_bytes())
    assert finish_interrupted_releases(out.parent) == []
    assert state(out.parent) == before


def test_a_release_killed_after_its_manifest_is_completed_on_the_next_load(tmp_path):
    out = released(tmp_path)
    new = trained(tmp_path, "b", 2).read_bytes()
    staged = out.with_name(f".{out.name}.staged")
    staged.write_bytes(new)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    manifest[out.name]["sha256"] = hashlib.sha256(new).hexdigest()        # the commit point was written
    (out.parent / "manifest.json").write_text(json.dumps(manifest))
    assert released_checkpoint(tmp_path / "demo", TRAINSET) == out       # completes the release, then verifies
    assert out.read_bytes() == new and not staged.exists()


def test_verify_release_needs_the_file_in_the_manifest(tmp_path):
    out = released(tmp_path)
    stray = out.with_name("stray.pth")
    stray.write_bytes(out.read_bytes())
    with pytest.raises(CSAInputError, match="not listed"):
        verify_release(stray)
    assert load_model(stray)                                     # unlisted files load (no manifest claim)


def test_a_load_looks_only_at_its_own_manifest_entry(tmp_path):
    out = released(tmp_path)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    manifest["notes.txt"] = "not a release entry"                # someone else's entry: not this file's business
    (out.parent / "manifest.json").write_text(json.dumps(manifest))
    assert load_model(out).config["anchor_len"] == 16
    with pytest.raises(CSAInputError, match=r"damaged: \['notes.txt'\]"):   # a new release rewrites it: refused
        release(trained(tmp_path, "b", 2), tmp_path / "demo", TRAINSET, "demo", "csa train ...", "toy5k")
