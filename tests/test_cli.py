"""The `csa` command line on a tiny synthetic data root: evaluate, rerank, saved ranks, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _toy_data import write_toy_root
from csa.checkpoint import save_checkpoint
from csa.cli import main
from csa.data.layout import save_gnd, save_test_features
from csa.model import RerankTransformer


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


def test_rerank_r1m_streams_the_distractors_and_prints_the_in_memory_results(tmp_path, capsys):
    """`--r1m` (float16 memory map, short lists) prints what the in-memory path prints for the concatenated
    database; its saved top rows evaluate to the same numbers with `csa evaluate --r1m --ranks`."""
    from _arrays import unit_quarter_rows
    from csa.data.r1m import save_distractors

    rng = np.random.default_rng(4)
    db, dis = unit_quarter_rows(rng, 60, 32), unit_quarter_rows(rng, 900, 32)
    q = np.where(rng.random((3, 32)) < 0.15, -1, 1).astype(np.float32) * db[[0, 10, 20]]  # near those rows
    gnd = {"imlist": [f"db{i}" for i in range(60)], "qimlist": ["q0", "q1", "q2"],
           "gnd": [{"easy": [0, 1, 2], "hard": [3, 40], "junk": [4], "bbx": [0, 0, 1, 1]},
                   {"easy": [10, 11], "hard": [], "junk": [12], "bbx": [0, 0, 1, 1]},
                   {"easy": [20], "hard": [21, 22, 23], "junk": [], "bbx": [0, 0, 1, 1]}]}
    save_gnd(tmp_path, "toy", gnd)
    save_test_features(tmp_path, "toy", "feat", query=q, db=db)
    # the same benchmark with the distractors appended to its database, held in memory
    save_gnd(tmp_path, "toy-big", {**gnd, "imlist": gnd["imlist"] + [f"d{i}" for i in range(len(dis))]})
    save_test_features(tmp_path, "toy-big", "feat", query=q, db=np.concatenate([db, dis]))
    distractors = save_distractors(dis, tmp_path / "r1m" / "feat.npy", dtype="float16")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "model.pth", RerankTransformer(anchor_len=8, embed_dim=16, num_heads=2), epoch=1)
    common = ["--data-root", str(tmp_path), "--dataset", "toy"]
    rerank = ["rerank", *common, "--checkpoint", str(tmp_path / "model.pth"), "--topk", "24", "--batch-size", "2"]

    def result_lines() -> list[str]:
        return [line.replace(">> toy-big", ">> toy") for line in capsys.readouterr().out.splitlines()
                if line.startswith(">> toy")]

    in_memory = ["rerank", "--data-root", str(tmp_path), "--dataset", "toy-big", "--checkpoint",
                 str(tmp_path / "model.pth"), "--topk", "24", "--batch-size", "2"]
    assert main([*in_memory, "--features", "feat"]) == 0
    expected = result_lines()
    out_file = tmp_path / "top.npy"
    assert main([*rerank, "--features", "feat", "--r1m", str(distractors), "--output", str(out_file)]) == 0
    got = result_lines()
    assert got == expected and len(got) == 4 and "CSA top-24" in got[2]  # mAP and mP@k lines, before and after
    assert got[0].split("):")[1] != got[2].split("):")[1]
    assert np.load(out_file).shape == (24, 3)  # the re-ranked top max(K, L-1) rows
    assert main(["evaluate", *common, "--features", "feat", "--r1m", str(distractors), "--ranks", str(out_file)]) == 0
    assert [line.split("):")[1] for line in result_lines()] == [line.split("):")[1] for line in got[2:]]
    assert main(["evaluate", *common, "--features", "feat", "--r1m", str(distractors)]) == 0
    assert result_lines() == got[:2]


@pytest.mark.parametrize("command", [[], ["train"], ["download"], ["batch"], ["rerank"], ["evaluate"],
                                     ["extract"], ["demo"], ["demo", "extract"], ["demo", "select"]])
def test_help_is_plain_text_without_rst_markup(command, capsys):
    from csa.cli import main as csa_main

    with pytest.raises(SystemExit) as exit_info:
        csa_main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: csa" in text
    assert "`" not in text, f"csa {' '.join(command)} --help shows markup: {text}"
