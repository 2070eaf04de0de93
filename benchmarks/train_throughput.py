"""Benchmark: training samples/s of the csa engine vs the re-created official pipeline, on the CPU.

Ours: :class:`csa.training.sampler.TrainingSet` yields indices only, :class:`csa.training.sampler.GlobalBatchSampler`
batches them, :func:`csa.training.engine.train_one_epoch` builds the batch's affinities with one gather and
one ``bmm`` (:func:`csa.affinity.indexed_affinity`) and runs the model (fused SDPA attention).
Official (``benchmarks/_official.py``): the dataset multiplies each sample's descriptors itself
(one ``mm`` per sample), the collate function stacks them, the model computes attention explicitly,
and the step also logs two gradient maxima, as the official loop does.

Both sides: the same weights, neighbours, labels, batch size, SGD (lr 0.01, momentum 0.9), dropout
on, float32, no gradient clipping (the official recipe's setting), the same number of loader workers.
Reduced but representative default: K = L = 256, C = 768, 12 heads, depth 2, batch 32, 2048-d
descriptors of 4,000 synthetic clustered training images; ``--steps`` iterations per timing,
repeats interleaved, best of each side.

    python benchmarks/train_throughput.py          # reduced config (about 2-4 minutes on 2 cores)
    python benchmarks/train_throughput.py --quick  # tiny, a few seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import synthetic_training_data  # noqa: E402
from _official import OfficialStyleModel, OfficialTrainingSet, official_train_steps  # noqa: E402

from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet  # noqa: E402
from csa.training.engine import build_optimizer, train_one_epoch  # noqa: E402
from csa.device import cpu_has_native_bf16  # noqa: E402
from csa.losses import CSACriterion  # noqa: E402
from csa.model import RerankTransformer  # noqa: E402


class Gemm(NamedTuple):
    """One matrix product of a training step: ``count`` products (m x k) @ (k x n), operands transposed or not
    as autograd stores them."""

    name: str
    count: int
    m: int
    k: int
    n: int
    trans_a: bool = False
    trans_b: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.count * self.m * self.k * self.n


def training_gemms(batch: int, topk: int, anchor_len: int, dim: int, embed_dim: int, depth: int, heads: int,
                   mlp_ratio: float = 4.0) -> list[Gemm]:
    """Every matrix product of one training step (forward and backward) of the CSA model and its loss.

    Rows R = batch x T tokens (T = K + 1). Linear layers (x W^T): forward (R, in) x (in, out), input
    gradient (R, out) x (out, in) and weight gradient (out, R) x (R, in); ``topk_proj`` needs no input
    gradient (its input, the affinity, is data). Attention per block, batch x heads products: QK^T and
    AV forward, and dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q backward. The affinity ``bmm``
    (T, D) x (D, L) per sample has no backward.
    """
    t, c, h, hd = topk + 1, embed_dim, int(embed_dim * mlp_ratio), embed_dim // heads
    rows, bh = batch * t, batch * heads

    def linear(name: str, fan_in: int, fan_out: int, input_grad: bool = True) -> list[Gemm]:
        out = [Gemm(f"{name} fwd", 1, rows, fan_in, fan_out, trans_b=True),
               Gemm(f"{name} dW", 1, fan_out, rows, fan_in, trans_a=True)]
        return out + ([Gemm(f"{name} dX", 1, rows, fan_out, fan_in)] if input_grad else [])

    gemms = [Gemm("affinity bmm", batch, t, dim, anchor_len, trans_b=True)]
    gemms += linear("topk_proj", anchor_len, c, input_grad=False)
    for _ in range(depth):
        gemms += linear("qkv", c, 3 * c) + linear("proj", c, c) + linear("fc1", c, h) + linear("fc2", h, c)
        gemms += [Gemm("QK^T fwd", bh, t, hd, t, trans_b=True), Gemm("AV fwd", bh, t, t, hd),
                  Gemm("dP bwd", bh, t, hd, t, trans_b=True), Gemm("dV bwd", bh, t, t, hd, trans_a=True),
                  Gemm("dQ bwd", bh, t, t, hd), Gemm("dK bwd", bh, t, t, hd, trans_a=True)]
    gemms += linear("feature_align", c, anchor_len)
    return gemms


class GemmFloor:
    """Time the products of :func:`training_gemms` back to back with ``torch.mm`` / ``torch.bmm``, operands
    allocated once in the step's layouts (transposed views where autograd has them) and outputs preallocated:
    pure matrix-product time, the floor of the step (no activation, normalization, softmax, dropout,
    optimizer or allocation work)."""

    def __init__(self, gemms: list[Gemm], dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ops = []
        for gm in gemms:
            lead = (gm.count,) if gm.count > 1 else ()
            a = torch.randn(*lead, *((gm.k, gm.m) if gm.trans_a else (gm.m, gm.k)), generator=g).to(dtype)
            b = torch.randn(*lead, *((gm.n, gm.k) if gm.trans_b else (gm.k, gm.n)), generator=g).to(dtype)
            a, b = (a.transpose(-1, -2) if gm.trans_a else a), (b.transpose(-1, -2) if gm.trans_b else b)
            self.ops.append((torch.bmm if lead else torch.mm, a, b, torch.empty(*lead, gm.m, gm.n, dtype=dtype)))
        self.flops = sum(gm.flops for gm in gemms)
        self.run()  # warm-up

    def run(self) -> None:
        """One pass over every product."""
        for fn, a, b, out in self.ops:
            fn(a, b, out=out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=4000, help="training images")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--clusters", type=int, default=200)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--anchor-len", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=768)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="training iterations per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--precision", default="fp32", help="csa engine precisions to time: fp32, bf16 or fp32,bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (K=L=16, C=32, batch 8), 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.dim, args.clusters, args.topk, args.anchor_len = 200, 64, 10, 16, 16
        args.embed_dim, args.heads, args.batch_size, args.steps, args.repeats = 32, 2, 8, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x, labels = synthetic_training_data(args.samples, args.dim, args.clusters, args.seed)
    table = NeighbourTable([x], args.topk, args.anchor_len, progress=False)
    features = torch.from_numpy(x)
    neighbours = torch.from_numpy(table.indices.astype(np.int64))
    relevance = torch.from_numpy((labels[table.indices] == labels[:, None]).astype(np.float32))

    torch.manual_seed(args.seed)
    model = RerankTransformer(anchor_len=args.anchor_len, embed_dim=args.embed_dim, depth=args.depth,
                              num_heads=args.heads)
    twin = OfficialStyleModel.from_model(model)
    criterion = CSACriterion(alpha=0.2, temperature=2.0)
    opt_ours = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-6)
    opt_official = build_optimizer(twin, lr=0.01, momentum=0.9, weight_decay=1e-6)
    dataset = TrainingSet(table, labels, seed=args.seed)
    official_set = OfficialTrainingSet(features, neighbours, relevance, args.topk, args.anchor_len)
    gemms = training_gemms(args.batch_size, args.topk, args.anchor_len, args.dim, args.embed_dim, args.depth,
                           args.heads)
    precisions = [p for p in args.precision.split(",") if p]
    if any(p not in ("fp32", "bf16") for p in precisions) or not precisions:
        raise SystemExit(f"--precision must list fp32 and/or bf16, got {args.precision!r}")
    floors = {p: GemmFloor(gemms, torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}
    print(f"config: {args.samples} training images x {args.dim}-d, K={args.topk}, L={args.anchor_len}, "
          f"C={args.embed_dim}, heads={args.heads}, depth={args.depth}, batch {args.batch_size}, "
          f"{args.steps} steps per timing, {args.repeats} interleaved repeats, {args.workers} loader workers, "
          f"threads={torch.get_num_threads()}, native bf16 {cpu_has_native_bf16()}")

    epoch = itertools.count()

    def run_ours(steps: int, precision: str = "fp32") -> int:
        sampler = GlobalBatchSampler(len(dataset), args.batch_size, seed=args.seed)
        e = next(epoch)
        sampler.set_epoch(e)
        dataset.set_epoch(e)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)
        stats = train_one_epoch(model, criterion, itertools.islice(loader, steps), opt_ours, None, "cpu",
                                clip_grad=0.0, progress=False, features=features, amp=precision == "bf16",
                                amp_dtype=torch.bfloat16)
        return stats["iterations"]

    def run_official(steps: int) -> int:
        return official_train_steps(twin, official_set, args.batch_size, steps, opt_official, alpha=0.2,
                                    num_workers=args.workers)[0] // args.batch_size

    def step_time(fn, *a) -> tuple[float, float]:
        """(wall, CPU) seconds per step; CPU time = this process's, all threads."""
        w0, c0 = time.perf_counter(), time.process_time()
        done = fn(args.steps, *a)
        return (time.perf_counter() - w0) / done, (time.process_time() - c0) / done

    def floor_time(p: str) -> tuple[float, float]:
        runs = []
        for _ in range(3):
            w0, c0 = time.perf_counter(), time.process_time()
            floors[p].run()
            runs.append((time.perf_counter() - w0, time.process_time() - c0))
        return min(r[0] for r in runs), min(r[1] for r in runs)

    run_official(1)
    for p in precisions:
        run_ours(1, p)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"official": [], **{f"csa {p}": [] for p in precisions},
                                                   **{f"floor {p}": [] for p in precisions}}
    for _ in range(args.repeats):  # interleaved, so every ratio compares runs seconds apart
        times["official"].append(step_time(run_official))
        for p in precisions:
            times[f"csa {p}"].append(step_time(run_ours, p))
            times[f"floor {p}"].append(floor_time(p))

    clocks = {"wall": 0, "CPU": 1}

    def best(name: str, clock: str = "wall") -> float:
        return min(t[clocks[clock]] for t in times[name])

    def ratios(name: str, floor: str, clock: str) -> str:
        i = clocks[clock]
        r = sorted(a[i] / b[i] for a, b in zip(times[name], times[floor]))
        return (f"{best(name, clock) / best(floor, clock):.2f}x best/best; per repeat {', '.join(f'{x:.2f}' for x in r)} "
                f"(median {float(np.median(r)):.2f}, spread {r[-1] - r[0]:.2f})")

    def line(label: str, text: str) -> None:
        print(f"{label:27s}: {text}")

    fwd = sum(g.flops for g in gemms if "fwd" in g.name or g.name == "affinity bmm")
    total = floors[precisions[0]].flops
    line("matmul work per step", f"{total / 1e9:.1f} GFLOP (forward {fwd / 1e9:.1f}, backward {(total - fwd) / 1e9:.1f}; "
                                 f"{len(gemms)} products, see training_gemms)")
    line("official pipeline", f"{args.batch_size / best('official'):.2f} samples/s (fp32, step {best('official'):.3f} s)")
    for p in precisions:
        floor = best(f"floor {p}")
        line(f"{p} matmul floor", f"{floor:.3f} s per step ({total / floor / 1e9:.1f} GFLOP/s: every product of the "
                                  f"step at its own shape, torch.mm/bmm into preallocated outputs, best of the repeats)")
        line(f"csa engine {p}", f"{args.batch_size / best(f'csa {p}'):.2f} samples/s (step {best(f'csa {p}'):.3f} s)")
        for clock in clocks:
            line(f"csa {p} / {p} floor, {clock}", f"{ratios(f'csa {p}', f'floor {p}', clock)}  (target <= 1.5x)")
    if "fp32" in precisions:
        for clock in clocks:
            line(f"official / fp32 floor, {clock}", ratios("official", "floor fp32", clock))
        line("speed-up", f"{best('official') / best('csa fp32'):.2f}x (csa fp32 vs official, wall)")
    if "bf16" in precisions and "fp32" in precisions:
        line("bf16 speed-up", f"{best('csa fp32') / best('csa bf16'):.2f}x (csa bf16 vs csa fp32, wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
