"""Benchmark on one CUDA GPU (a few minutes): re-ranking and one training epoch at the paper's sizes.

1. Re-ranking 70 queries (one ROxf / RPar query set) at K = 1024, L = 512, C = 768, 12 heads,
   depth 2 over a seeded 5,000 x 2048 random database: ``csa.rerank`` in fp32 and bf16, and the
   re-created official per-query loop (``benchmarks/_official.py``; fp16 autocast like the official
   ``forward_feature``) for reference; time and peak GPU memory of each.
2. One whole training epoch at the paper's configuration: 91,642 simulated 2048-d training descriptors
   (the size of rSfM120k's training split) in synthetic clusters, resident on the GPU; K = L = 512,
   C = 768, 12 heads, depth 2, global batch 256, fp16 AMP, SGD; ``csa.training.engine.train_one_epoch``
   builds every batch's affinities on the device (one gather and one ``bmm``). Prints the epoch time
   (loader start included), samples/s and peak GPU memory next to the paper's 9.4 min per epoch on
   4 x RTX 2080 Ti and the target of 30 s per epoch on one H100-class GPU; then the official pipeline
   (per-sample ``mm`` in 8 CPU loader workers, collate, same model) for a few iterations, projected to
   an epoch.

Without a CUDA device it exits with a message (status 2) unless ``--dry-run`` is given: then every
path runs at tiny sizes on the CPU (used by the tests).

    python benchmarks/gpu.py              # on one CUDA GPU
    python benchmarks/gpu.py --dry-run    # tiny CPU run of the same code
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
from _common import add_rerank_size_args, sync, synthetic_training_data  # noqa: E402
from _official import (OfficialStyleModel, OfficialTrainingSet, official_rerank,  # noqa: E402
                       official_train_steps)

from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet  # noqa: E402
from csa.training.engine import build_optimizer, train_one_epoch  # noqa: E402
from csa.losses import CSACriterion  # noqa: E402
from csa.model import RerankTransformer  # noqa: E402
from csa.rerank import rerank  # noqa: E402
from csa.search import first_stage  # noqa: E402

RSFM120K_TRAIN = 91_642
PAPER_MIN_PER_EPOCH = 9.4
TARGET_EPOCH_S = 30.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Best wall time of ``fn()`` over ``repeats`` runs (after one warm-up), and its last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_rerank(args, device: torch.device) -> None:
    g = torch.Generator().manual_seed(args.seed)
    db = torch.randn(args.db, args.dim, generator=g)
    q = torch.randn(args.queries, args.dim, generator=g)
    db, q = db / db.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    ranks = first_stage(q, db, device=device).cpu()
    torch.manual_seed(args.seed)
    model = RerankTransformer(anchor_len=args.anchor_len, embed_dim=args.embed_dim, depth=args.depth,
                              num_heads=args.heads).to(device).eval()
    print(f"[rerank] {args.queries} queries, database {args.db} x {args.dim}, K={args.topk}, L={args.anchor_len}, "
          f"C={args.embed_dim}, heads={args.heads}, depth={args.depth}, batch_size={args.rerank_batch}")
    results = {}
    for precision in ("fp32", "bf16"):
        reset_peak(device)
        t, out = timed(lambda: rerank(model, q, db, ranks, topk=args.topk, anchor_len=args.anchor_len,
                                      batch_size=args.rerank_batch, precision=precision, progress=False),
                       device, args.repeats)
        results[precision] = out
        print(f"[rerank] csa.rerank {precision}: {t:.3f} s ({t / args.queries * 1e3:.2f} ms/query), "
              f"peak GPU memory {peak_gib(device)}")
    twin = OfficialStyleModel.from_model(model).eval()
    amp = device.type == "cuda"

    def official():
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            return official_rerank(twin, q, db, ranks, args.topk, args.anchor_len, num_workers=0, device=str(device))

    reset_peak(device)
    t, out = timed(official, device, args.repeats)
    top10 = float((out[:10] == results["fp32"][:10]).all(dim=0).float().mean())
    print(f"[rerank] official per-query loop ({'fp16 autocast' if amp else 'fp32'}): {t:.3f} s "
          f"({t / args.queries * 1e3:.2f} ms/query), peak GPU memory {peak_gib(device)}; identical top-10 with "
          f"csa fp32: {100 * top10:.0f}% of queries")


def bench_train(args, device: torch.device) -> None:
    x, labels = synthetic_training_data(args.samples, args.dim, args.clusters, args.seed)
    t0 = time.perf_counter()
    table = NeighbourTable([x], args.train_topk, args.train_anchor_len, device=device, progress=False)
    amp = device.type == "cuda" and args.amp != "off"
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    print(f"[train] {args.samples:,} synthetic {args.dim}-d descriptors ({args.clusters} clusters), neighbour table on "
          f"the device in {time.perf_counter() - t0:.1f} s; K={args.train_topk}, L={args.train_anchor_len}, "
          f"C={args.embed_dim}, heads={args.heads}, depth={args.depth}, global batch {args.train_batch}, "
          f"AMP {args.amp if amp else 'off (CPU)'}, {args.workers} loader workers; affinities built on the device "
          f"per batch (csa.affinity.indexed_affinity)")
    features = torch.from_numpy(x).to(device)
    torch.manual_seed(args.seed)
    model = RerankTransformer(anchor_len=args.train_anchor_len, embed_dim=args.embed_dim, depth=args.depth,
                              num_heads=args.heads).to(device)
    twin = OfficialStyleModel.from_model(model)
    criterion = CSACriterion()
    optimizer = build_optimizer(model, lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    dataset = TrainingSet(table, labels, seed=args.seed)
    epochs = itertools.count()

    def ours(steps: int | None) -> tuple[int, float]:
        """Train ``steps`` iterations (None: one whole epoch, loader start included); (iterations, seconds)."""
        e = next(epochs)
        sampler = GlobalBatchSampler(len(dataset), args.train_batch, seed=args.seed)
        sampler.set_epoch(e)
        dataset.set_epoch(e)
        sync(device)
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                             pin_memory=device.type == "cuda")
        batches = loader if steps is None else itertools.islice(loader, steps)
        stats = train_one_epoch(model, criterion, batches, optimizer, None, device, scaler=scaler, clip_grad=0.0,
                                amp=amp, amp_dtype=amp_dtype, progress=False, features=features)
        sync(device)
        return stats["iterations"], time.perf_counter() - t0

    ours(args.train_warmup)  # untimed: cuBLAS heuristics, allocator, kernels
    reset_peak(device)
    iterations, seconds = ours(None)
    samples = iterations * args.train_batch
    rate = samples / seconds
    paper_s = PAPER_MIN_PER_EPOCH * 60
    print(f"[train] csa engine, one epoch: {iterations} iterations x {args.train_batch} = {samples:,} samples in "
          f"{seconds:.1f} s ({rate:.1f} samples/s; the loader's start included; the last incomplete batch is "
          f"dropped), peak GPU memory {peak_gib(device)}")
    verdict = ("n/a on the CPU" if device.type != "cuda" else
               f"{'met' if seconds <= TARGET_EPOCH_S else 'NOT met'} ({seconds:.1f} s on this device)")
    print(f"[train] paper: {PAPER_MIN_PER_EPOCH} min per epoch on 4 x RTX 2080 Ti = {paper_s / seconds:.1f}x this "
          f"epoch; target <= {TARGET_EPOCH_S:.0f} s per epoch on one H100-class GPU: {verdict}")

    if args.official_steps:
        neighbours = torch.from_numpy(table.indices.astype(np.int64))
        relevance = torch.from_numpy((labels[table.indices] == labels[:, None]).astype(np.float32))
        official_set = OfficialTrainingSet(torch.from_numpy(x), neighbours, relevance, args.train_topk,
                                           args.train_anchor_len)
        opt_official = build_optimizer(twin, lr=0.01)

        reset_peak(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
            seen, off_seconds = official_train_steps(twin, official_set, args.train_batch, args.official_steps,
                                                     opt_official, num_workers=args.official_workers,
                                                     device=str(device), skip=args.train_warmup)
        rate_off = seen / off_seconds
        print(f"[train] official pipeline ({args.official_workers} workers, per-sample mm on the CPU, no loss scaling), "
              f"{args.official_steps} iterations: {rate_off:.1f} samples/s, projected epoch "
              f"{RSFM120K_TRAIN / rate_off:.1f} s, peak GPU memory {peak_gib(device)}; csa engine speed-up "
              f"{rate / rate_off:.2f}x")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_rerank_size_args(p, queries=70)
    p.add_argument("--rerank-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=RSFM120K_TRAIN, help="synthetic training descriptors (rSfM120k: 91,642)")
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--train-topk", type=int, default=512)
    p.add_argument("--train-anchor-len", type=int, default=512)
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--train-warmup", type=int, default=3, help="untimed iterations first (both pipelines)")
    p.add_argument("--amp", default="fp16", choices=["fp16", "bf16", "off"], help="training autocast (the paper: fp16)")
    p.add_argument("--workers", type=int, default=4, help="loader workers of the csa engine (indices only)")
    p.add_argument("--official-steps", type=int, default=4, help="0 skips the official training pipeline")
    p.add_argument("--official-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to test the script")
    args = p.parse_args(argv)
    if args.dry_run:
        args.queries, args.db, args.dim, args.topk, args.anchor_len = 3, 200, 64, 32, 16
        args.embed_dim, args.heads, args.rerank_batch, args.repeats = 32, 2, 2, 1
        args.samples, args.clusters, args.train_topk, args.train_anchor_len = 120, 6, 16, 16
        args.train_batch, args.workers, args.official_steps, args.official_workers = 8, 0, 1, 0
        args.train_warmup = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        print("device: CPU dry run (tiny sizes; the figures mean nothing)")
    elif not torch.cuda.is_available():
        print("no CUDA device found: this benchmark needs a GPU (run with --dry-run to test it on the CPU)",
              file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        print(f"device: {torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB), torch "
              f"{torch.__version__}, CUDA {torch.version.cuda}, bf16 supported {torch.cuda.is_bf16_supported()}")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    t0 = time.perf_counter()
    bench_rerank(args, device)
    if not args.skip_train:
        bench_train(args, device)
    print(f"total benchmark time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
