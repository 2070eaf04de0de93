"""Command-line options shared by the benchmark scripts."""

from __future__ import annotations

import argparse


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
