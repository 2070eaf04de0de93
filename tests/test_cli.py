"""The `csa` command line on a tiny synthetic data root: evaluate, rerank, saved ranks, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csa.checkpoint import save_checkpoint
from csa.cli import main
from csa.data.layout import save_gnd, save_test_features
from csa.model import RerankTransformer


@pytest.fixture()
def root(tmp_path):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(40, 8)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[[0, 10]] + 0.05 * rng.normal(size=(2, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    gnd = {"imlist": [f"db{i}" for i in range(40)], "qimlist": ["q0", "q1"],
           "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]},
                   {"easy": [10, 11], "hard": [], "junk": [], "bbx": [0, 0, 1, 1]}]}
    save_gnd(tmp_path, "toy", gnd)
    save_test_features(tmp_path, "toy", "feat", query=q, db=db)
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pth", RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2), epoch=1)
    return tmp_path


def test_evaluate_prints_the_first_stage(root, capsys):
    assert main(["evaluate", "--data-root", str(root), "--dataset", "toy", "--features", "feat"]) == 0
    out = capsys.readouterr().out
    assert ">> toy (first stage): mAP E:" in out and "mP@k[1, 5, 10]" in out


def test_rerank_uses_the_checkpoint_anchor_length_and_saves_ranks(root, capsys):
    out_file = root / "ranks.npy"
    code = main(["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
                 "--checkpoint", str(root / "model.pth"), "--topk", "16", "--output", str(out_file)])
    assert code == 0
    out = capsys.readouterr().out
    assert "CSA top-16" in out and "ms per query" in out
    ranks = np.load(out_file)
    assert ranks.shape == (40, 2)
    assert all(sorted(ranks[:, j]) == list(range(40)) for j in range(2))
    # re-evaluating the saved ranks goes through the same evaluation
    assert main(["evaluate", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
                 "--ranks", str(out_file)]) == 0


def test_rerank_with_a_wrong_anchor_length_fails_with_one_clear_message(root, capsys):
    code = main(["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat",
                 "--checkpoint", str(root / "model.pth"), "--topk", "16", "--anchor-len", "12"])
    assert code == 2
    err = capsys.readouterr().err
    assert "anchor_len=12" in err and "anchor_len=8" in err


def test_missing_features_name_the_file(root, capsys):
    code = main(["evaluate", "--data-root", str(root), "--dataset", "toy", "--features", "nope"])
    assert code == 2
    assert "nope.pkl" in capsys.readouterr().err
