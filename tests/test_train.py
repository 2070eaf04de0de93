"""Tests of csa.training.train: a tiny CPU run, repeatability, resume, CLI, and torchrun (2 processes, gloo)."""
from __future__ import annotations

import csv
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from _subprocess import run
from _train_helpers import TOY_TRAINSET, tiny_config, write_toy_trainset
from csa.model import RerankTransformer
from csa.training.config import TrainConfig, build_parser, config_from_argv
from csa.cli import main as csa_main
from csa.training.train import run_training

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_tiny_run_learns_and_writes_every_file(tmp_path):
    write_toy_trainset(tmp_path)
    result = run_training(tiny_config(tmp_path, "run"))
    hist = result["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"]
    assert hist[-1]["contrastive"] < hist[0]["contrastive"]
    out = tmp_path / "run"
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert list(rows[0]) == ["epoch", "lr", "loss", "contrastive", "reconstruction", "skipped", "time"]
    assert float(rows[2]["loss"]) == pytest.approx(hist[2]["loss"])
    assert json.load(open(out / "history.json"))[3]["epoch"] == 4
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cache" / f"neighbours_{TOY_TRAINSET}_train_K16_L16_toyfeat.pkl").is_file()
    # the checkpoint loads with weights_only=True and has the official keys ('epoch', 'state_dict')
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 4
    assert {"optimizer", "schedule", "scaler", "rng", "config", "train_config", "history"} <= set(ckpt)
    model = RerankTransformer(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    assert ckpt["schedule"]["iteration"] == 4 * 6  # 96 samples / 16 per batch, 4 epochs
    assert ckpt["train_config"]["topk"] == 16
    # lr of the last iteration (numpy reference of the cosine: W = 6, T = 24)
    import numpy as np
    assert hist[-1]["lr"] == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi * 17 / 18)))


def test_same_seed_same_result_and_lr_scaling(tmp_path):
    write_toy_trainset(tmp_path)
    a = run_training(tiny_config(tmp_path, "a", num_epochs=2, lr_scaling="global"))  # dropout on (paper's 0.1)
    b = run_training(tiny_config(tmp_path, "b", num_epochs=2, lr_scaling="global"))
    sa, sb = state(tmp_path / "a" / "checkpoint.pth"), state(tmp_path / "b" / "checkpoint.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["history"][1]["loss"] == b["history"][1]["loss"]
    c = run_training(tiny_config(tmp_path, "c", num_epochs=2, lr_scaling="global", seed=1))
    assert c["history"][1]["loss"] != a["history"][1]["loss"]
    sched = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)["schedule"]
    assert sched["base_lr"] == pytest.approx(0.5 * 16 / 256) and sched["warmup_lr"] == pytest.approx(0.05 * 16 / 256)


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    write_toy_trainset(tmp_path)
    run_training(tiny_config(tmp_path, "full", num_epochs=3))
    run_training(tiny_config(tmp_path, "parts", num_epochs=3, stop_at_epoch=1))
    assert torch.load(tmp_path / "parts" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    resumed = run_training(tiny_config(tmp_path, "parts", num_epochs=3, resume="auto"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    full, parts = state(tmp_path / "full" / "checkpoint.pth"), state(tmp_path / "parts" / "checkpoint.pth")
    assert all(torch.equal(full[k], parts[k]) for k in full)
    # an explicit path works too; a missing one is an input error
    assert csa_main(["train", "--data-root", str(tmp_path), "--trainset", TOY_TRAINSET, "--feature-names",
                     "toyfeat", "--resume", str(tmp_path / "nope.pth"), "--output-dir", str(tmp_path / "x")]) == 2


def test_parser_has_every_field_with_defaults_and_errors_are_reported(tmp_path, capsys):
    parser = build_parser()
    help_text = parser.format_help()
    for flag in ("--topk", "--anchor-len", "--batch-size", "--warmup-epochs", "--base-lr", "--clip-grad",
                 "--lr-scaling", "--feature-names", "--resume", "--stop-at-epoch", "--amp", "--recipe", "--dry-run"):
        assert flag in help_text
    assert "[paper: 512]" in help_text and "[paper: 0.2]" in help_text
    cfg, dry_run = config_from_argv([])
    assert not dry_run and cfg == TrainConfig() == TrainConfig.from_recipe("paper")
    assert (cfg.topk, cfg.anchor_len, cfg.embed_dim, cfg.num_heads, cfg.depth, cfg.batch_size, cfg.num_epochs) == \
           (512, 512, 768, 12, 2, 256, 100)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.base_lr, cfg.final_lr, cfg.momentum, cfg.weight_decay) == \
           (20, 0.001, 0.1, 0.0, 0.9, 1e-6)
    assert (cfg.alpha, cfg.temperature, cfg.clip_grad, cfg.drop_rate, cfg.trainset) == \
           (0.2, 2.0, 1.0, 0.1, "retrieval-SfM-120k")
    args = parser.parse_args(["--feature-names", "a", "b", "--no-qkv-bias", "--stop-at-epoch", "3"])
    assert args.feature_names == ["a", "b"] and args.qkv_bias is False and args.stop_at_epoch == 3
    assert csa_main(["train", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "retrieval-SfM-120k.pkl" in err and "csa demo build" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_single_process(tmp_path):
    write_toy_trainset(tmp_path)
    common = ["--data-root", str(tmp_path), "--trainset", TOY_TRAINSET, "--feature-names", "toyfeat",
              "--topk", "16", "--anchor-len", "16", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
              "--batch-size", "16", "--num-epochs", "2", "--warmup-epochs", "1", "--base-lr", "0.5",
              "--warmup-lr", "0.05", "--lr-scaling", "none", "--num-workers", "0", "--no-progress",
              "--drop-rate", "0", "--attn-drop-rate", "0", "--drop-path-rate", "0", "--device", "cpu"]
    run_training(config_from_argv(common + ["--output-dir", str(tmp_path / "one")])[0])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [str(TORCHRUN), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "csa.training", *common, "--output-dir", str(tmp_path / "two")]
    proc = run(cmd, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 8" in proc.stdout
    one, two = state(tmp_path / "one" / "checkpoint.pth"), state(tmp_path / "two" / "checkpoint.pth")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    h1 = json.load(open(tmp_path / "one" / "history.json"))
    h2 = json.load(open(tmp_path / "two" / "history.json"))
    assert [r["loss"] for r in h2] == pytest.approx([r["loss"] for r in h1], rel=1e-5)
