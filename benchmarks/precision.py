"""Benchmark: fp32 vs bf16 re-ranking with csa.rerank on the CPU — speed at full size, and quality.

Speed: K = 1024, L = 512, C = 768, 12 heads, depth 2, 8 queries over a seeded 5,000 x 2048 random
database (same weights), fp32 and bf16 interleaved, best of ``--repeats``.

Quality: with trained demo checkpoints (``<checkpoint-dir>/<trainset>/checkpoint.pth`` and
``<data-root>/test/<dataset>/lite0-gem.pkl``; the Oxford-trained model is tested on Paris and vice
versa) the revisited Medium / Hard mAP of fp32 and bf16 re-ranking and the fraction of queries whose
top-10 is identical. Without them, a small model is trained for about a minute with
:func:`csa.training.train.run_training` on synthetic clustered descriptors and tested on a synthetic set drawn
around *other* cluster centres (each query's positives = the database items of its cluster).

The verdict line says whether ``precision='auto'`` should choose bf16 on this CPU: only when bf16
is faster and every mAP moves by at most 0.2 points.

    python benchmarks/precision.py                      # full size + demo checkpoints (or synthetic)
    python benchmarks/precision.py --quick              # tiny sizes, a few seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from csa.checkpoint import load_model
from csa.data.layout import load_gnd, load_test_features, save_clusters, save_train_features
from csa.evaluate import evaluate_revisited
from csa.model import RerankTransformer
from csa.rerank import rerank
from csa.search import first_stage
from csa.training.config import TrainConfig
from csa.training.train import run_training

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_rerank_size_args  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
#: (training set, test set): the demo trains on one landmark collection and tests on the other.
DEMO_PAIRS = (("rparis6k-mini-train", "roxford5k-mini"), ("roxford5k-mini-train", "rparis6k-mini"))
#: Noise norm around each unit cluster centre: the synthetic test's first-stage Medium mAP is about 50.
SYNTHETIC_NOISE = 2.0


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(centres: np.ndarray, per_cluster: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_cluster`` unit rows around each centre (interleaved), and their cluster ids."""
    labels = np.repeat(np.arange(len(centres)), per_cluster)
    x = centres[labels] + noise * rng.standard_normal((len(labels), centres.shape[1])) / np.sqrt(centres.shape[1])
    order = rng.permutation(len(labels))
    return unit_rows(x[order]), labels[order]


def time_precisions(model, q, db, ranks, topk, anchor_len, batch_size, repeats) -> dict[str, float]:
    """Best wall time of csa.rerank per precision, fp32 and bf16 interleaved."""
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for p in best:  # warm-up
        rerank(model, q, db, ranks, topk=topk, anchor_len=anchor_len, batch_size=batch_size, precision=p, progress=False)
    for _ in range(repeats):
        for p in best:
            t0 = time.perf_counter()
            rerank(model, q, db, ranks, topk=topk, anchor_len=anchor_len, batch_size=batch_size, precision=p,
                   progress=False)
            best[p] = min(best[p], time.perf_counter() - t0)
    return best


def compare_quality(name: str, model, q, db, gnd, topk: int) -> dict[str, float]:
    """fp32 vs bf16 re-ranking of one test set: mAPs, their deltas and identical-top-10 fraction."""
    anchor_len = model.config["anchor_len"]
    topk = min(topk, db.shape[0])
    ranks = first_stage(q, db)
    out = {}
    runs = {p: rerank(model, q, db, ranks, topk=topk, anchor_len=anchor_len, precision=p, progress=False)
            for p in ("fp32", "bf16")}
    res = {p: evaluate_revisited(r, gnd) for p, r in runs.items()}
    base = evaluate_revisited(ranks, gnd)
    same10 = float(np.mean(np.all(runs["fp32"][:10] == runs["bf16"][:10], axis=0)))
    set10 = float(np.mean(np.all(np.sort(runs["fp32"][:10], 0) == np.sort(runs["bf16"][:10], 0), axis=0)))
    sameK = float(np.mean(np.all(runs["fp32"][:topk] == runs["bf16"][:topk], axis=0)))
    for proto in ("medium", "hard"):
        out[f"{proto} first stage"] = base[proto]["map"]
        out[f"{proto} fp32"] = res["fp32"][proto]["map"]
        out[f"{proto} bf16"] = res["bf16"][proto]["map"]
        out[f"{proto} delta"] = res["bf16"][proto]["map"] - res["fp32"][proto]["map"]
    out["identical top-10"], out["same top-10 set"], out["identical top-K"] = same10, set10, sameK
    print(f"quality [{name}] K={topk} L={anchor_len}, {q.shape[0]} queries: "
          f"Medium first stage {out['medium first stage']:.2f}, fp32 {out['medium fp32']:.2f}, bf16 "
          f"{out['medium bf16']:.2f} (delta {out['medium delta']:+.2f}); Hard fp32 {out['hard fp32']:.2f}, bf16 "
          f"{out['hard bf16']:.2f} (delta {out['hard delta']:+.2f}); identical top-10 (same order) {100 * same10:.1f}% "
          f"of queries, same top-10 set {100 * set10:.1f}%, identical top-K order {100 * sameK:.1f}%")
    return out


def demo_quality(checkpoint_dir: Path, data_root: Path, feature: str, topk: int) -> list[dict[str, float]] | None:
    pairs = [(tr, te) for tr, te in DEMO_PAIRS if (checkpoint_dir / tr / "checkpoint.pth").is_file()
             and (data_root / "test" / te / f"{feature}.pkl").is_file()]
    if not pairs:
        return None
    results = []
    for trainset, dataset in pairs:
        model = load_model(checkpoint_dir / trainset / "checkpoint.pth")
        gnd = load_gnd(data_root, dataset)
        feats = load_test_features(data_root, dataset, feature, gnd=gnd)
        results.append(compare_quality(f"{trainset} -> {dataset}", model, feats.query, feats.db, gnd, topk))
    return results


def synthetic_quality(workdir: Path, quick: bool, seed: int = 0) -> list[dict[str, float]]:
    """Train a small model on synthetic clusters, test fp32 vs bf16 on held-out synthetic clusters."""
    rng = np.random.default_rng(seed)
    dim = 64 if quick else 128
    n_train_clusters, per_train = (12, 10) if quick else (100, 20)
    centres = unit_rows(rng.standard_normal((n_train_clusters, dim)))
    x, labels = clustered(centres, per_train, noise=SYNTHETIC_NOISE, rng=rng)
    save_train_features(workdir, "synthetic-train", "synth", train=x, val=x[:10])
    save_clusters(workdir, "synthetic-train", {"train": {"cluster": labels.tolist()},
                                               "val": {"cluster": labels[:10].tolist()}})
    size = dict(topk=16, anchor_len=16, embed_dim=32, depth=1, num_heads=2, batch_size=16, num_epochs=1) if quick \
        else dict(topk=64, anchor_len=64, embed_dim=128, depth=2, num_heads=4, batch_size=64, num_epochs=10)
    config = TrainConfig(data_root=str(workdir), trainset="synthetic-train", feature_names=["synth"],
                         warmup_epochs=1, warmup_lr=0.05, base_lr=0.5, lr_scaling="none", num_workers=0,
                         progress=False, output_dir=str(workdir / "run"), device="cpu", **size)
    t0 = time.perf_counter()
    model = run_training(config)["model"].eval()
    print(f"trained a synthetic model in {time.perf_counter() - t0:.0f} s: {size}")
    # test set: other centres, each cluster's first item is the query, the rest the database
    n_test_clusters, per_test = (8, 12) if quick else (50, 21)
    test_centres = unit_rows(rng.standard_normal((n_test_clusters, dim)))
    tx, tl = clustered(test_centres, per_test, noise=SYNTHETIC_NOISE, rng=rng)
    q_rows = np.array([np.flatnonzero(tl == c)[0] for c in range(n_test_clusters)])
    db_rows = np.setdiff1d(np.arange(len(tl)), q_rows)
    gnd = [{"easy": np.flatnonzero(tl[db_rows] == c).tolist(), "hard": [], "junk": [], "bbx": None}
           for c in range(n_test_clusters)]
    # Hard mAP is undefined here (no hard positives); Medium = Easy = every same-cluster item.
    topk = 48 if quick else 256
    return [compare_quality("synthetic", model, tx[q_rows], tx[db_rows], gnd, topk)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint-dir", type=Path, default=REPO_ROOT / "runs" / "demo")
    p.add_argument("--data-root", type=Path, default=REPO_ROOT / "data" / "demo")
    p.add_argument("--feature", default="lite0-gem")
    p.add_argument("--quality-topk", type=int, default=256, help="K for the quality comparison (clamped to N)")
    p.add_argument("--synthetic", action="store_true", help="use the synthetic model even if checkpoints exist")
    add_rerank_size_args(p, queries=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and a tiny synthetic model (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.db, args.dim, args.topk, args.anchor_len = 4, 300, 128, 64, 32
        args.embed_dim, args.heads, args.batch_size, args.repeats, args.synthetic = 64, 4, 4, 1, True
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    db = torch.randn(args.db, args.dim, generator=g)
    q = torch.randn(args.queries, args.dim, generator=g)
    db, q = db / db.norm(dim=1, keepdim=True), q / q.norm(dim=1, keepdim=True)
    ranks = first_stage(q, db)
    torch.manual_seed(args.seed)
    model = RerankTransformer(anchor_len=args.anchor_len, embed_dim=args.embed_dim, depth=args.depth,
                              num_heads=args.heads).eval()
    print(f"speed config: {args.queries} queries, database {args.db} x {args.dim}, K={args.topk}, "
          f"L={args.anchor_len}, C={args.embed_dim}, heads={args.heads}, depth={args.depth}, "
          f"batch_size={args.batch_size}, threads={torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    times = time_precisions(model, q, db, ranks, args.topk, args.anchor_len, args.batch_size, args.repeats)
    speedup = times["fp32"] / times["bf16"]
    print(f"fp32: {times['fp32']:.3f} s   bf16: {times['bf16']:.3f} s   bf16 speed-up: {speedup:.2f}x")

    quality = None
    if not args.synthetic:
        quality = demo_quality(args.checkpoint_dir, args.data_root, args.feature, args.quality_topk)
        if quality is None:
            print(f"no demo checkpoints under {args.checkpoint_dir} (or no test features under {args.data_root}); "
                  f"using a synthetic model")
    if quality is None:
        with tempfile.TemporaryDirectory(prefix="csa-precision-") as tmp:
            quality = synthetic_quality(Path(tmp), args.quick, args.seed)
    worst = max(abs(r[k]) for r in quality for k in r if k.endswith("delta") and np.isfinite(r[k]))
    pick_bf16 = speedup > 1.0 and worst <= 0.2
    print(f"largest |mAP delta| bf16 vs fp32: {worst:.2f} points")
    print(f"verdict: 'auto' should pick {'bf16' if pick_bf16 else 'fp32'} on this CPU "
          f"(bf16 {'faster' if speedup > 1 else 'not faster'}: {speedup:.2f}x; quality "
          f"{'within' if worst <= 0.2 else 'outside'} 0.2 mAP)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
