"""The demo's test descriptors written from their committed float16 copy (a fresh clone runs notebook 00
without extracting), checked against the extracted descriptors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from csa import evaluate_revisited, first_stage, load_gnd, load_test_features
from csa.data.demo import CITIES
from csa.data import layout
from csa.descriptors.compact import compact_path, ensure_demo_features
from csa.validation import CSAInputError

from conftest import DEMO_ROOT

NAME = "lite0-gem"
BENCHMARKS = [d for dataset, city in CITIES.items() for d in (dataset, city["loo"])]


def _clone_without_descriptors(tmp_path):
    """A data root as a fresh clone has it: annotations and the compact copies, no ``test/``."""
    for part in ("annotations", "descriptors"):
        shutil.copytree(DEMO_ROOT / part, tmp_path / part)
    return tmp_path


def _medium_map(root, dataset):
    feats = load_test_features(root, dataset, NAME)
    return evaluate_revisited(first_stage(feats.query, feats.db), load_gnd(root, dataset))["medium"]["map"]


def test_missing_demo_descriptors_are_written_from_the_compact_copy(demo_features, tmp_path, capsys):
    root = _clone_without_descriptors(tmp_path)
    written = ensure_demo_features(root, NAME)
    assert written == [layout.test_features_path(root, d, NAME) for d in BENCHMARKS]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "float16" in lines[0] and "csa demo extract" in lines[0]
    assert not list((root / "test").rglob("*.fingerprint"))  # `csa demo extract` does not take them as extracted
    for dataset in BENCHMARKS:
        restored = load_test_features(root, dataset, NAME)
        extracted = load_test_features(demo_features, dataset, NAME)
        for got, want in ((restored.db, extracted.db), (restored.query, extracted.query)):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(got, want, atol=1e-3)  # float16 keeps about 3 decimal digits
        assert abs(_medium_map(root, dataset) - _medium_map(demo_features, dataset)) < 0.2, dataset


def test_a_second_call_and_existing_files_are_left_alone(tmp_path, capsys):
    root = _clone_without_descriptors(tmp_path)
    ensure_demo_features(root, NAME)
    stamps = {p: p.stat().st_mtime_ns for p in (root / "test").rglob("*.pkl")}
    capsys.readouterr()
    assert ensure_demo_features(root, NAME) == [] and capsys.readouterr().out == ""
    assert {p: p.stat().st_mtime_ns for p in (root / "test").rglob("*.pkl")} == stamps

    loo = layout.test_features_path(root, "roxford5k-mini-loo", NAME)
    loo.unlink()
    stale = loo.with_name(loo.name + ".fingerprint")
    stale.write_text("fingerprint of an earlier extraction\n")
    assert ensure_demo_features(root, NAME) == [loo]
    assert not stale.exists()
    assert {p: p.stat().st_mtime_ns for p in (root / "test").rglob("*.pkl") if p != loo} == \
           {p: t for p, t in stamps.items() if p != loo}
    assert ensure_demo_features(tmp_path / "not-a-demo-root", NAME) == []


def test_a_changed_compact_copy_is_refused_and_nothing_is_written(tmp_path):
    root = _clone_without_descriptors(tmp_path)
    path = compact_path(root, NAME)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CSAInputError, match="sha256"):
        ensure_demo_features(root, NAME)
    assert not (root / "test").exists()


def test_missing_descriptors_name_the_command_that_extracts_them(tmp_path):
    root = _clone_without_descriptors(tmp_path)
    with pytest.raises(CSAInputError, match=r"lite0-gem\.pkl.*csa demo extract") as err:
        load_test_features(root, "roxford5k-mini", NAME)
    assert "csa demo build" not in str(err.value)
