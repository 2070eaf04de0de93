"""Smoke tests of the benchmark scripts: each one's smallest mode runs, exits 0 and prints its result lines.

Not timing tests: the figures of a tiny run mean nothing; what is checked is that every code path
(official re-creation, csa path, floor, quality, verdict, training loops, GPU script's CPU dry run)
executes and reports.  One thread per process, so a busy shared CPU does not stall them.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from _subprocess import run

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks"


def run_script(name: str, *args: str, expect_rc: int = 0) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = run([sys.executable, str(BENCH / name), *args], cwd=REPO_ROOT, env=env)
    assert proc.returncode == expect_rc, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_rerank_cpu_quick_reports_times_floor_and_order_check():
    out = run_script("rerank_cpu.py", "--quick")
    for label in ("official per-query loop", "csa.rerank", "fp32 floor", "speed-up vs official", "csa.rerank / floor"):
        assert re.search(rf"^{re.escape(label)}\s*: \d+\.\d+", out, re.M), (label, out)
    assert "top-K order equivalent to the official loop: True" in out


def test_model_flops_counts_every_matmul():
    sys.path.insert(0, str(BENCH))
    try:
        from rerank_cpu import model_flops
    finally:
        sys.path.remove(str(BENCH))
    # one query, K=1 (T=2 tokens), L=3, D=5, C=4, depth 1, hidden 16: hand-counted 2*m*n*k per product
    f = model_flops(1, topk=1, anchor_len=3, dim=5, embed_dim=4, depth=1)
    assert f == {"affinity bmm": 2 * 2 * 3 * 5, "topk_proj": 2 * 2 * 3 * 4, "qkv": 2 * 2 * 4 * 12,
                 "attention QK^T": 2 * 2 * 2 * 4, "attention AV": 2 * 2 * 2 * 4, "proj": 2 * 2 * 4 * 4,
                 "fc1": 2 * 2 * 4 * 16, "fc2": 2 * 2 * 16 * 4}
    assert model_flops(3, 1, 3, 5, 4, 2)["fc1"] == 3 * 2 * f["fc1"]


def test_precision_quick_reports_speed_quality_and_verdict():
    out = run_script("precision.py", "--quick")
    assert re.search(r"fp32: \d+\.\d+ s\s+bf16: \d+\.\d+ s\s+bf16 speed-up: \d+\.\d+x", out), out
    assert re.search(r"quality \[synthetic\].*Medium first stage \d+\.\d+, fp32 \d+\.\d+, bf16 \d+\.\d+", out), out
    assert re.search(r"verdict: 'auto' should pick (bf16|fp32) on this CPU", out), out


def test_train_throughput_quick_reports_both_pipelines_and_the_floor():
    out = run_script("train_throughput.py", "--quick", "--precision", "fp32,bf16")
    assert re.search(r"official pipeline\s+: \d+\.\d+ samples/s", out), out
    for p in ("fp32", "bf16"):
        assert re.search(rf"csa engine {p}\s+: \d+\.\d+ samples/s", out), out
        assert re.search(rf"{p} matmul floor\s+: \d+\.\d+ s per step", out), out
        for clock in ("wall", "CPU"):
            assert re.search(rf"csa {p} / {p} floor, {clock}\s*: \d+\.\d+x best/best; per repeat", out), out
    assert re.search(r"official / fp32 floor, wall\s*: \d+\.\d+x", out), out
    assert re.search(r"speed-up\s+: \d+\.\d+x", out), out


def test_training_gemms_count_every_product_of_forward_and_backward():
    sys.path.insert(0, str(BENCH))
    try:
        from train_throughput import training_gemms
    finally:
        sys.path.remove(str(BENCH))
    # batch 2, K=1 (T=2), L=3, D=5, C=4 (2 heads of 2), depth 1, hidden 16: hand-counted 2*m*k*n per product
    g = {gm.name: gm.flops for gm in training_gemms(2, topk=1, anchor_len=3, dim=5, embed_dim=4, depth=1, heads=2)}
    rows = 2 * 2
    assert g["affinity bmm"] == 2 * 2 * (2 * 5 * 3)
    assert g["topk_proj fwd"] == g["topk_proj dW"] == 2 * rows * 3 * 4 and "topk_proj dX" not in g
    for name, fan_in, fan_out in (("qkv", 4, 12), ("proj", 4, 4), ("fc1", 4, 16), ("fc2", 16, 4),
                                  ("feature_align", 4, 3)):
        assert g[f"{name} fwd"] == g[f"{name} dW"] == g[f"{name} dX"] == 2 * rows * fan_in * fan_out, name
    for name in ("QK^T fwd", "AV fwd", "dP bwd", "dV bwd", "dQ bwd", "dK bwd"):
        assert g[name] == 2 * (2 * 2) * 2 * 2 * 2, name  # batch x heads products of (T x T x head_dim)
    assert len(g) == 1 + 2 + 4 * 3 + 6 + 3


def test_gpu_dry_run_runs_every_path_on_cpu():
    out = run_script("gpu.py", "--dry-run")
    for pattern in (r"csa\.rerank fp32: \d", r"csa\.rerank bf16: \d", r"official per-query loop .*identical top-10",
                    r"csa engine, one epoch: 15 iterations x 8 = 120 samples in \d+\.\d s \(\d+\.\d samples/s",
                    r"paper: 9\.4 min per epoch .* target <= 30 s per epoch", r"official pipeline .*speed-up",
                    r"\[extract\] multi-scale \(1, 0\.7071, 0\.5\): \d+\.\d+ images/s",
                    r"\[extract\] single-scale \(1\): \d+\.\d+ images/s", r"PROJECTED: .* not measured",
                    r"1,012,456 test \+ R1M images .* 1 GPU \d+\.\d+ h, 4 GPUs \d+\.\d+ h, 8 GPUs \d+\.\d+ h"):
        assert re.search(pattern, out), (pattern, out)


def test_extraction_projection_is_the_image_count_over_the_rate():
    """Hours = (test images / multi-scale rate + 3 x rSfM120k / single-scale rate) / GPUs, by hand."""
    sys.path.insert(0, str(BENCH))
    import gpu

    hours = (1_012_456 / 10 + 3 * 91_642 / 20) / 3600
    assert gpu.extraction_hours(10.0, 20.0, 1) == pytest.approx(hours)
    assert gpu.extraction_hours(10.0, 20.0, 8) == pytest.approx(hours / 8)


def test_r1m_rerank_quick_runs_both_paths_with_identical_results():
    out = run_script("r1m_rerank.py", "--quick")
    for label in ("(a) in memory", "(b) memory map"):
        assert re.search(rf"^{re.escape(label)}.* \d+\.\d+s +\d+\.\d+G", out, re.M), (label, out)
    assert "identical first-stage APs, mAPs and mP@k: True; re-ranked: True; identical re-ranked top-32 lists: True" in out
    assert re.search(r"memory-map path peak beyond the memory map: .*target <= 1\.5 GB: met", out), out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_gpu_without_cuda_exits_with_a_message():
    out = run_script("gpu.py", expect_rc=2)
    assert "no CUDA device found" in out and "--dry-run" in out


def test_cpu_inference_fast_path_equals_the_autograd_forward(monkeypatch):
    """The model's CPU no-grad path (csa.cpu_kernels: row-chunked MLP, in-place residual; added for the rerank
    benchmark's speed target) gives the numbers of the plain eval forward, across chunk borders and under bf16."""
    import torch

    import csa.cpu_kernels as kernels
    import csa.model as model_module

    monkeypatch.setattr(kernels, "CPU_INFERENCE_CHUNK_ROWS", 7)  # 3 x 11 = 33 rows: 5 chunks, last partial
    torch.manual_seed(0)
    m = model_module.RerankTransformer(anchor_len=16, embed_dim=24, depth=2, num_heads=3).eval()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial norms and biases
            p.add_(0.1 * torch.randn_like(p))
    aff = torch.randn(3, 11, 16)
    original = aff.clone()
    reference = m.encode(aff)                       # grad enabled: the plain path
    assert reference.requires_grad
    with torch.inference_mode():
        fast = m.encode(aff)
    torch.testing.assert_close(fast, reference.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(aff, original)  # the input is not modified in place
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = m.encode(aff)
        with torch.no_grad():
            fast16 = m.encode(aff)
    assert fast16.dtype == ref16.dtype
    torch.testing.assert_close(fast16.float(), ref16.detach().float(), rtol=2e-2, atol=2e-2)
