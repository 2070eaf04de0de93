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
3. Descriptor extraction: ``csa.descriptors.extract.extract_descriptors`` with a ResNet-101 GeM network
   (whitening layer, random weights) over synthetic JPEG files of 1024 x 768 px, batch 1 (sizes vary in real
   data), at scales 1, 1/sqrt(2), 1/2 (the test sets and R1M) and at scale 1 (rSfM120k's training
   descriptors): images/s on this GPU, the FLOPs per image (counted with ``torch.utils.flop_counter``),
   and the projected hours for ROxf + RPar + R1M (multi-scale) plus rSfM120k for three backbones (the
   augmented model: R50 + R101 + R152 cost about three R101 passes) on 1, 4 and 8 GPUs (shards are
   independent: N GPUs are counted N times as fast, the loader keeping up).  Without a GPU measurement
   (``--cpu``, the dry run) the GPU hours are projected from the FLOPs and ``--assumed-gpu-tflops``.

Without a CUDA device it exits with a message (status 2) unless ``--dry-run`` or ``--cpu`` is given: the dry
run runs every path at tiny sizes on the CPU (used by the tests); ``--cpu`` runs the chosen sections at the
sizes given on the CPU (the CPU extraction measurement of benchmarks/RESULTS.md).

    python benchmarks/gpu.py              # on one CUDA GPU
    python benchmarks/gpu.py --dry-run    # tiny CPU run of the same code
    python benchmarks/gpu.py --cpu --skip-rerank --skip-train --extract-size 320 --extract-images 12
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_rerank_size_args, sync, synthetic_training_data  # noqa: E402
from _official import (OfficialStyleModel, OfficialTrainingSet, official_rerank,  # noqa: E402
                       official_train_steps)

from csa.descriptors.cirtorch import cirtorch_gem_network  # noqa: E402
from csa.descriptors.extract import extract_descriptors, load_image_tensor  # noqa: E402
from csa.training.sampler import GlobalBatchSampler, NeighbourTable, TrainingSet  # noqa: E402
from csa.training.engine import build_optimizer, train_one_epoch  # noqa: E402
from csa.losses import CSACriterion  # noqa: E402
from csa.model import RerankTransformer  # noqa: E402
from csa.rerank import rerank  # noqa: E402
from csa.search import first_stage  # noqa: E402

RSFM120K_TRAIN = 91_642
#: Images described at test time: ROxf and RPar (database + 70 queries each) and the R1M distractors.
FULL_TEST_IMAGES = 4_993 + 70 + 6_322 + 70 + 1_001_001
AUGMENTED_BACKBONES = 3
EXTRACT_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
GPU_COUNTS = (1, 4, 8)
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


def write_synthetic_jpegs(folder: Path, n: int, long_side: int, seed: int) -> list[Path]:
    """``n`` JPEG photos-like files (smooth random colour fields, 4:3 landscape, quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((long_side, long_side * 3 // 4), Image.BICUBIC)
        paths.append(folder / f"synthetic_{i:04d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def flops_per_image(net: torch.nn.Module, path: Path, image_size: int, scales, device: torch.device) -> float:
    """Forward FLOPs of one image at ``scales`` (bilinear resizes not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = load_image_tensor(path, image_size, None, net.meta["mean"], net.meta["std"])[None].to(device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for s in scales:
            net(x if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear"))
    return float(counter.get_total_flops())


def extraction_hours(rate_ms: float, rate_ss: float, gpus: int) -> float:
    """Hours for the full data on ``gpus`` devices at per-device images/s (multi-scale, single-scale)."""
    seconds = FULL_TEST_IMAGES / rate_ms + AUGMENTED_BACKBONES * RSFM120K_TRAIN / rate_ss
    return seconds / gpus / 3600


def bench_extract(args, device: torch.device) -> None:
    torch.manual_seed(args.seed)
    net = cirtorch_gem_network(args.extract_arch, whitening=True).to(device).eval()
    print(f"[extract] {args.extract_arch} GeM + whitening (random weights), {args.extract_images} synthetic JPEGs of "
          f"{args.extract_size} x {args.extract_size * 3 // 4} px, batch 1, {args.extract_workers} loader workers")
    rates, flops = {}, {}
    with tempfile.TemporaryDirectory(prefix="csa-extract-bench-") as tmp:
        paths = write_synthetic_jpegs(Path(tmp), args.extract_images, args.extract_size, args.seed)
        for label, scales in (("multi-scale", EXTRACT_SCALES), ("single-scale", (1.0,))):
            run = lambda: extract_descriptors(net, paths, image_size=args.extract_size, scales=scales,  # noqa: E731
                                              batch_size=1, num_workers=args.extract_workers, device=device,
                                              progress=False)
            extract_descriptors(net, paths[:1], image_size=args.extract_size, scales=scales, device=device,
                                progress=False)  # warm-up
            seconds, _ = timed(run, device, 1)
            rates[label] = len(paths) / seconds
            flops[label] = flops_per_image(net, paths[0], args.extract_size, scales, device)
            print(f"[extract] {label} ({', '.join(f'{s:.4g}' for s in scales)}): {rates[label]:.2f} images/s "
                  f"({1000 / rates[label]:.0f} ms/image), {flops[label] / 1e9:.1f} GFLOP/image, "
                  f"{rates[label] * flops[label] / 1e12:.3f} TFLOP/s achieved")
    project_extraction(args, device, rates, flops)


def project_extraction(args, device: torch.device, rates: dict, flops: dict) -> None:
    """Per-GPU images/s at 1024 px (measured on a GPU at 1024 px, else FLOPs / the assumed rate), and hours."""
    full = {k: v * (1024 / args.extract_size) ** 2 for k, v in flops.items()}  # conv FLOPs scale with pixels
    measured = device.type == "cuda" and args.extract_size == 1024
    if measured:
        per_gpu, source = rates, "measured on this GPU"
    else:
        per_gpu = {k: args.assumed_gpu_tflops * 1e12 / full[k] for k in full}
        source = (f"PROJECTED: {full['multi-scale'] / 1e9:.0f} / {full['single-scale'] / 1e9:.0f} GFLOP per 1024-px "
                  f"image at an assumed {args.assumed_gpu_tflops:g} TFLOP/s per GPU, not measured")
        here = {k: rates[k] * flops[k] / full[k] for k in full}
        print(f"[extract] this {device.type.upper()} at 1024 px (pixel-count scaling): {here['multi-scale']:.3f} "
              f"images/s multi-scale, {extraction_hours(here['multi-scale'], here['single-scale'], 1):.0f} h for the "
              f"full data")
    print(f"[extract] per GPU at 1024 px: {per_gpu['multi-scale']:.1f} images/s multi-scale, "
          f"{per_gpu['single-scale']:.1f} images/s single-scale ({source})")
    hours = [extraction_hours(per_gpu["multi-scale"], per_gpu["single-scale"], n) for n in GPU_COUNTS]
    print(f"[extract] full data: {FULL_TEST_IMAGES:,} test + R1M images (3 scales) + {AUGMENTED_BACKBONES} x "
          f"{RSFM120K_TRAIN:,} rSfM120k images (1 scale): "
          + ", ".join(f"{n} GPU{'s' if n > 1 else ''} {h:.2f} h" for n, h in zip(GPU_COUNTS, hours)))


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
    p.add_argument("--skip-rerank", action="store_true")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--extract-images", type=int, default=64, help="synthetic JPEGs timed per setting")
    p.add_argument("--extract-size", type=int, default=1024, help="long side in pixels (the paper: 1024)")
    p.add_argument("--extract-workers", type=int, default=8, help="image loader processes")
    p.add_argument("--extract-arch", default="resnet101", help="cirtorch ResNet of the GeM network")
    p.add_argument("--assumed-gpu-tflops", type=float, default=50.0,
                   help="sustained TFLOP/s per GPU for the projection when no GPU ran at 1024 px")
    p.add_argument("--cpu", action="store_true", help="run the chosen sections on the CPU at the sizes given")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, to test the script")
    args = p.parse_args(argv)
    if args.dry_run:
        args.queries, args.db, args.dim, args.topk, args.anchor_len = 3, 200, 64, 32, 16
        args.embed_dim, args.heads, args.rerank_batch, args.repeats = 32, 2, 2, 1
        args.samples, args.clusters, args.train_topk, args.train_anchor_len = 120, 6, 16, 16
        args.train_batch, args.workers, args.official_steps, args.official_workers = 8, 0, 1, 0
        args.train_warmup = 1
        args.extract_images, args.extract_size, args.extract_workers, args.extract_arch = 2, 64, 0, "resnet18"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device = torch.device("cpu")
        print("device: CPU dry run (tiny sizes; the figures mean nothing)")
    elif args.cpu:
        device = torch.device("cpu")
        print(f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
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
    if not args.skip_rerank:
        bench_rerank(args, device)
    if not args.skip_train:
        bench_train(args, device)
    if not args.skip_extract:
        bench_extract(args, device)
    print(f"total benchmark time: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
