"""Benchmark: the whole +R1M path (first stage, CSA re-ranking of the top-K, Revisited evaluation), in memory
vs from the float16 memory map, side by side: time, peak memory, identical results.

Data: a ROxf-size test database (``--db`` 4,993 simulated 2048-d unit rows, ``--queries`` 70 queries built from
synthetic easy / hard positives among them, a synthetic easy / hard / junk ground truth) and ``--distractors``
(default 1,000,000) simulated 2048-d distractors in a float16 ``.npy`` memory map, as ``csa extract r1m``
writes them; a CSA model of the paper's test size (L = 512, C = 768, 12 heads, depth 2; seeded random
weights, eval mode) re-ranks the top K = 1024 of every query in fp32, 8 queries per batch.

(a) in memory: what ``csa rerank --r1m`` did before: the distractors converted to float32 and stacked
    under the test rows in one array, :func:`csa.search.first_stage` (the full (N, Q) ranking),
    :func:`csa.evaluate.evaluate_revisited`, :func:`csa.rerank.rerank`, ``evaluate_revisited``;
(b) memory map: what ``csa rerank --r1m`` and notebook 03 do now: :func:`csa.largescale.first_stage_large`
    (one streaming pass: the top max(K, L-1) of every query and the full-ranking positions of its ground
    truth), :func:`csa.largescale.rerank_large` (only the rows of the short lists, one batch of queries at
    a time, through the same ``csa.rerank.rerank``), :meth:`csa.largescale.ShortList.evaluate`.

Each path runs in a fresh process and reports its time by stage and its peak *anonymous* resident memory
(``RssAnon`` of /proc/self/status, sampled every 5 ms: everything except file pages, so the page cache of
the memory-mapped file is not counted) above the process's state just before the path starts (Python,
torch, the model and the 4,993 test rows loaded), plus that state and ``VmHWM`` (peak RSS including the
mapped file pages). The parent then checks that both paths give identical first-stage and re-ranked
APs / mAPs / mP@k and identical re-ranked top lists.

    python benchmarks/r1m_rerank.py                         # 1M distractors (4 GB file), both paths
    python benchmarks/r1m_rerank.py --distractors 200000    # smaller
    python benchmarks/r1m_rerank.py --quick                 # tiny, a few seconds (used by the tests)
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (PeakAnonRSS, add_rerank_size_args, identical, proc_status_bytes,  # noqa: E402
                     synthetic_queries)

from csa.data.r1m import append_distractors, simulate_distractors  # noqa: E402
from csa.evaluate import evaluate_revisited  # noqa: E402
from csa.largescale import first_stage_large, rerank_large  # noqa: E402
from csa.model import RerankTransformer  # noqa: E402
from csa.rerank import rerank  # noqa: E402
from csa.search import first_stage  # noqa: E402

PATHS = {"memory": "(a) in memory (float32)", "mmap": "(b) memory map (float16)"}
TARGET_GB = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_rerank_size_args(p, queries=70)
    p.set_defaults(db=4993)
    p.add_argument("--distractors", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=8, help="queries per CSA forward pass (both paths)")
    p.add_argument("--chunk", type=int, default=8192, help="database rows per streamed chunk (path b)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--paths", default="mmap,memory", help="which paths to run, in this order")
    p.add_argument("--tmpdir", default=None, help="where the temporary distractor file goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes, to test the script")
    p.add_argument("--child", choices=sorted(PATHS), help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.distractors, args.dim, args.queries, args.topk, args.anchor_len = 400, 3000, 64, 6, 32, 16
        args.embed_dim, args.heads, args.batch_size, args.chunk = 32, 2, 4, 512
    return args


def _model(args: argparse.Namespace) -> RerankTransformer:
    torch.manual_seed(args.seed)
    return RerankTransformer(anchor_len=args.anchor_len, embed_dim=args.embed_dim, depth=args.depth,
                             num_heads=args.heads).eval()


def run_path(args: argparse.Namespace) -> None:
    """One path in this (fresh) process; results pickled to ``<work>/<path>.pkl``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # memory maps are only read
    data = np.load(args.work / "test.npz")
    db, q = data["db"], data["queries"]
    gnd = pickle.loads((args.work / "gnd.pkl").read_bytes())
    model = _model(args)
    distractors = args.work / "distractors.npy"
    depth = max(args.topk, args.anchor_len - 1)
    run = partial(rerank, model, topk=args.topk, anchor_len=args.anchor_len, batch_size=args.batch_size,
                  progress=False)
    times: dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        times[name] = now - clock[0]
        clock[0] = now

    with PeakAnonRSS(interval=0.005) as mem:
        clock[0] = time.perf_counter()
        if args.child == "memory":
            dbvecs = np.asarray(append_distractors(db, distractors, dtype="float32"))
            lap("load")
            ranks = first_stage(q, dbvecs)
            lap("first stage")
            first = evaluate_revisited(ranks, gnd)
            lap("evaluate")
            reranked = run(q, dbvecs, ranks)
            lap("re-rank")
            after = evaluate_revisited(reranked, gnd)
            lap("evaluate again")
            top = reranked[:depth].copy()
        else:
            view = append_distractors(db, distractors, dtype="float32")
            lap("load")
            shortlist = first_stage_large(q, view, gnd, depth=depth, chunk_size=args.chunk, progress=False)
            lap("first stage")
            first = shortlist.evaluate()
            lap("evaluate")
            top = rerank_large(run, q, view, shortlist.ranks, batch_size=args.batch_size, progress=False)
            lap("re-rank")
            after = shortlist.evaluate(top)
            lap("evaluate again")
    out = {"times": times, "peak_above_start": mem.peak - mem.start, "start": mem.start,
           "vm_hwm": proc_status_bytes("VmHWM"), "first": first, "after": after, "top": top}
    (args.work / f"{args.child}.pkl").write_bytes(pickle.dumps(out))


def fmt_map(res: dict) -> str:
    return " / ".join(f"{res[p]['map']:.2f}" for p in ("easy", "medium", "hard"))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_path(args)
        return 0
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise SystemExit(f"--paths must list some of {sorted(PATHS)}, got {args.paths!r}")
    print(f"config: database {args.db:,} + {args.distractors:,} distractors x {args.dim} (float16 memory map), "
          f"{args.queries} queries, K={args.topk}, L={args.anchor_len}, C={args.embed_dim}, heads={args.heads}, "
          f"depth={args.depth}, fp32, batch {args.batch_size}, chunk {args.chunk}, "
          f"torch threads={args.threads or torch.get_num_threads()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="csa-r1m-rerank-", dir=args.tmpdir))
    try:
        t0 = time.perf_counter()
        test_rows = simulate_distractors(args.db, args.dim, seed=args.seed + 1, progress=False)
        q, gnd = synthetic_queries(test_rows, args.db, args.queries, np.random.default_rng(args.seed + 2))
        np.savez(work / "test.npz", db=test_rows, queries=q)
        (work / "gnd.pkl").write_bytes(pickle.dumps(gnd))
        simulate_distractors(args.distractors, args.dim, seed=args.seed, dtype="float16",
                             path=work / "distractors.npy", progress=False)
        size_gb = os.path.getsize(work / "distractors.npy") / 2**30
        print(f"simulated the data in {time.perf_counter() - t0:.1f} s (distractor file {size_gb:.2f} GB)", flush=True)

        results = {}
        for name in paths:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--work", str(work)]
            cmd += sys.argv[1:] if argv is None else list(argv)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            results[name] = pickle.loads((work / f"{name}.pkl").read_bytes())
            results[name]["wall"] = time.perf_counter() - t0

        stages = list(next(iter(results.values()))["times"])
        print(f"{'path':26s} " + " ".join(f"{s:>14s}" for s in stages) + f" {'total':>8s} "
              f"{'peak RssAnon above start':>25s} {'state at start':>15s} {'VmHWM':>8s}")
        for name, r in results.items():
            print(f"{PATHS[name]:26s} " + " ".join(f"{r['times'][s]:13.2f}s" for s in stages)
                  + f" {sum(r['times'].values()):7.2f}s {r['peak_above_start'] / 2**30:24.3f}G "
                    f"{r['start'] / 2**30:14.3f}G {r['vm_hwm'] / 2**30:7.2f}G")
        for name, r in results.items():
            print(f"{PATHS[name]}: mAP E/M/H first stage {fmt_map(r['first'])}, CSA top-{args.topk} {fmt_map(r['after'])}")
        if len(results) == 2:
            a, b = results["memory"], results["mmap"]
            print(f"identical first-stage APs, mAPs and mP@k: {identical(a['first'], b['first'])}; re-ranked: "
                  f"{identical(a['after'], b['after'])}; identical re-ranked top-{a['top'].shape[0]} lists: "
                  f"{np.array_equal(a['top'], b['top'])}")
            print(f"time (a) / (b): {sum(a['times'].values()) / sum(b['times'].values()):.2f}x; peak memory above "
                  f"start (a) / (b): {a['peak_above_start'] / max(b['peak_above_start'], 1):.1f}x")
        if "mmap" in results:
            peak = results["mmap"]["peak_above_start"] / 2**30
            print(f"memory-map path peak beyond the memory map: {peak:.3f} GB above start, "
                  f"{peak + results['mmap']['start'] / 2**30:.3f} GB with the process's own state "
                  f"(target <= {TARGET_GB} GB: {'met' if peak + results['mmap']['start'] / 2**30 <= TARGET_GB else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
