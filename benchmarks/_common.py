"""What the benchmark scripts share: command-line options, synthetic data, result comparison and memory probes."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import torch


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


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA only), so that wall times cover it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def synthetic_training_data(n: int, dim: int, n_clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows around ``n_clusters`` random centres, and their cluster ids."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = centres[labels] / np.sqrt(dim) + 1.0 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def identical(a: dict, b: dict) -> bool:
    """Whether two :func:`csa.evaluate.evaluate_revisited` results have the same APs, mAPs and mP@k."""
    return all(np.array_equal(a[p]["aps"], b[p]["aps"], equal_nan=True) and a[p]["map"] == b[p]["map"]
               and a[p]["mp@k"] == b[p]["mp@k"] for p in ("easy", "medium", "hard"))


def proc_status_bytes(field: str, default: int | None = None) -> int:
    """A kB field of /proc/self/status (``RssAnon``, ``VmHWM``...) in bytes; ``default`` when it is absent
    (KeyError without one)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    if default is None:
        raise KeyError(f"{field} not in /proc/self/status")
    return default


class PeakAnonRSS:
    """Sample this process's anonymous resident memory (RssAnon) and keep the peak above the start."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval

    @staticmethod
    def current() -> int:
        return proc_status_bytes("RssAnon", default=0)

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
