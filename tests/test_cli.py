"""The `csa` command line on a tiny synthetic data root: evaluate, rerank, saved ranks, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from _toy_data import write_toy_root
from csa.cli import main


@pytest.fixture()
def root(tmp_path):
    return write_toy_root(tmp_path)


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
