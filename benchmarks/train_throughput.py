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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import OfficialStyleModel, OfficialTrainingSet, official_train_steps  # noqa: E402

from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet  # noqa: E402
from csa.training.engine import build_optimizer, train_one_epoch  # noqa: E402
from csa.losses import CSACriterion  # noqa: E402
from csa.model import RerankTransformer  # noqa: E402


def synthetic_training_data(n: int, dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around ``n_clusters`` random centres, and their cluster ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] / np.sqrt(dim) + 1.0 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


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
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (both sides)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes (K=L=16, C=32, batch 8), 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.dim, args.clusters, args.topk, args.anchor_len = 200, 64, 10, 16, 16
        args.embed_dim, args.heads, args.batch_size, args.steps, args.repeats = 32, 2, 8, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
    print(f"config: {args.samples} training images x {args.dim}-d, K={args.topk}, L={args.anchor_len}, "
          f"C={args.embed_dim}, heads={args.heads}, depth={args.depth}, batch {args.batch_size}, float32, "
          f"{args.steps} steps per timing, {args.workers} loader workers, threads={torch.get_num_threads()}")

    epoch = itertools.count()

    def run_ours(steps: int) -> int:
        sampler = GlobalBatchSampler(len(dataset), args.batch_size, seed=args.seed)
        e = next(epoch)
        sampler.set_epoch(e)
        dataset.set_epoch(e)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers)
        stats = train_one_epoch(model, criterion, itertools.islice(loader, steps), opt_ours, None, "cpu",
                                clip_grad=0.0, progress=False, features=features)
        return stats["iterations"] * args.batch_size

    def run_official(steps: int) -> int:
        return official_train_steps(twin, official_set, args.batch_size, steps, opt_official, alpha=0.2,
                                    num_workers=args.workers)[0]

    run_ours(1), run_official(1)  # warm-up
    best = {"official": 0.0, "ours": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("official", run_official), ("ours", run_ours)):
            t0 = time.perf_counter()
            seen = fn(args.steps)
            best[name] = max(best[name], seen / (time.perf_counter() - t0))
    print(f"official pipeline : {best['official']:.2f} samples/s")
    print(f"csa engine        : {best['ours']:.2f} samples/s")
    print(f"speed-up          : {best['ours'] / best['official']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
