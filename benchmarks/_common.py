"""Command-line options shared by the benchmark scripts."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np


def add_rerank_size_args(parser: argparse.ArgumentParser, queries: int) -> None:
    """The re-ranking problem size: queries, database, descriptor dimension, K, L and the model shape
    (defaults: the paper's test recipe over a ~5k x 2048 database)."""
    parser.add_argument("--queries", type=int, default=queries)
    parser.add_argument("--db", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=1024)
    parser.add_argument("--anchor-len", type=int, default=512)
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=12)


def synthetic_queries(db, n_test: int, n_queries: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Queries and a Revisited ground truth over the first ``n_test`` rows of ``db``: each query has 5-59 easy,
    5-59 hard and 5-39 junk images drawn from those rows, and is the normalized sum of its easy rows plus
    0.3 x its hard rows plus a little noise. Returns ``(queries (Q, D) float32, gnd)``."""
    d = db.shape[1]
    gnd, queries = [], []
    for _ in range(n_queries):
        ne, nh, nj = rng.integers(5, 60), rng.integers(5, 60), rng.integers(5, 40)
        idx = rng.permutation(n_test)[: ne + nh + nj]
        easy, hard, junk = np.sort(idx[:ne]), np.sort(idx[ne:ne + nh]), np.sort(idx[ne + nh:])
        v = (np.asarray(db[easy], np.float64).sum(0) + 0.3 * np.asarray(db[hard], np.float64).sum(0)
             + 0.02 * rng.standard_normal(d))
        queries.append(v / np.linalg.norm(v))
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    return np.stack(queries).astype(np.float32), gnd


class PeakAnonRSS:
    """Sample this process's anonymous resident memory (RssAnon) and keep the peak above the start."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def above_start_gb(self) -> float:
        return (self.peak - self.start) / 2**30
