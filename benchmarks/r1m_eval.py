"""Benchmark: Revisited evaluation over ~1M distractor-sized databases, full argsort vs evaluate_large.

Simulates ``--n`` database descriptors (default 1,004,993 = 4,993 ROxf + 1,000,000 R1M, 2048-d) in a
temporary memory-mapped ``.npy`` (float32, then float16 storage of the same values), 70 queries built
from synthetic positives among the first 4,993 rows, and a synthetic easy / hard / junk ground truth.
For each storage type it times

(a) the full-argsort path: the (N, Q) score matrix from ``csa.largescale.iter_chunk_scores`` (the
    very reads, float32 conversion and chunked ``torch.mm`` that (b) uses, written in place), stable
    ``argsort`` of all N rows per query, and ``csa.evaluate.evaluate_revisited`` (revisitop
    ``compute_map``) on the full (N, Q) ranks;
(b) ``csa.largescale.evaluate_large``: running top-K and counted positions, no (N, Q) matrices,

and prints both times, the ratio, whether every AP / mAP / mP@k is identical, and each path's peak
anonymous RSS above its start (the descriptors themselves are file-backed memory maps, so this is
the memory *beyond* the descriptors). 1M x 2048 float32 is 8 GB on disk; the files are deleted at the end.

    python benchmarks/r1m_eval.py            # full scale
    python benchmarks/r1m_eval.py --n 300000 # smaller
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakAnonRSS, identical, synthetic_queries  # noqa: E402

from csa.evaluate import evaluate_revisited  # noqa: E402
from csa.largescale import evaluate_large, iter_chunk_scores  # noqa: E402
from csa.data.r1m import save_distractors, simulate_distractors  # noqa: E402


def make_problem(path: Path, n: int, d: int, nq: int, n_test: int, seed: int, chunk: int):
    db = simulate_distractors(n, d, seed=seed, dtype="float32", path=path, chunk=chunk, progress=False)
    q, gnd = synthetic_queries(db, min(n_test, n), nq, np.random.default_rng(seed + 1))
    return db, q, gnd


def full_argsort_path(q: np.ndarray, db: np.ndarray, gnd, chunk: int):
    t0 = time.perf_counter()
    scores = torch.empty((db.shape[0], q.shape[0]), dtype=torch.float32)
    for _ in iter_chunk_scores(q, db, chunk, out=scores):  # the same reads and products as (b)
        pass
    t1 = time.perf_counter()
    ranks = torch.argsort(scores, dim=0, descending=True, stable=True)
    del scores
    t2 = time.perf_counter()
    ranks_np = ranks.numpy()
    res = evaluate_revisited(ranks_np, gnd)
    t3 = time.perf_counter()
    return res, ranks_np, {"matmul": t1 - t0, "argsort": t2 - t1, "compute_map": t3 - t2, "total": t3 - t0}


def fmt(res: dict) -> str:
    return " / ".join(f"{res[p]['map']:.4f}" for p in ("easy", "medium", "hard"))


def run_one(label: str, db, q, gnd, args) -> None:
    with PeakAnonRSS() as mem_a:
        res_a, ranks_a, t_a = full_argsort_path(q, db, gnd, args.chunk)
    top_a = ranks_a[: args.topk].copy()
    del ranks_a
    with PeakAnonRSS() as mem_b:
        t0 = time.perf_counter()
        res_b, top_b = evaluate_large(q, db, gnd, topk=args.topk, chunk_size=args.chunk, progress=False)
        t_b = time.perf_counter() - t0
    print(f"[{label}] (a) full argsort + compute_map: {t_a['total']:.2f} s (matmul {t_a['matmul']:.2f}, argsort "
          f"{t_a['argsort']:.2f}, compute_map {t_a['compute_map']:.2f}); peak RSS beyond descriptors "
          f"{mem_a.above_start_gb:.3f} GB")
    print(f"[{label}] (b) evaluate_large:               {t_b:.2f} s; peak RSS beyond descriptors "
          f"{mem_b.above_start_gb:.3f} GB")
    print(f"[{label}] speed-up (a)/(b): {t_a['total'] / t_b:.2f}x")
    print(f"[{label}] mAP E/M/H (a): {fmt(res_a)}   (b): {fmt(res_b)}")
    print(f"[{label}] identical APs, mAPs and mP@k: {identical(res_a, res_b)}; "
          f"top-{args.topk} ranking identical: {np.array_equal(top_a, top_b)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_004_993, help="database rows (default 1,004,993)")
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--chunk", type=int, default=8192, help="database rows per chunk (both paths)")
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--tmpdir", default=None, help="where the temporary memmaps go")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # memmaps are only read
    torch.set_num_threads(args.threads)
    print(f"R1M evaluation benchmark: N={args.n:,} D={args.d} Q={args.queries} chunk={args.chunk} "
          f"topk={args.topk} torch threads={args.threads}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="csa-r1m-bench-", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        db32, q, gnd = make_problem(work / "db32.npy", args.n, args.d, args.queries, 4993, args.seed, 16384)
        print(f"generated {args.n:,} x {args.d} float32 descriptors + synthetic gnd in "
              f"{time.perf_counter() - t0:.1f} s ({os.path.getsize(work / 'db32.npy') / 2**30:.2f} GB)", flush=True)
        dtypes = args.dtypes.split(",")
        if "float32" in dtypes:
            run_one("float32", db32, q, gnd, args)
        if "float16" in dtypes:
            t0 = time.perf_counter()
            db16 = np.load(save_distractors(db32, work / "db16.npy", dtype="float16"), mmap_mode="r")
            del db32
            (work / "db32.npy").unlink()
            print(f"converted to float16 storage in {time.perf_counter() - t0:.1f} s", flush=True)
            run_one("float16", db16, q, gnd, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
