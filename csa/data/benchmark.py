"""A benchmark loaded once: ground truth, query and database descriptors, optionally +R1M distractors.

:class:`Benchmark` reads a test dataset of the data layout (its ground truth once, its descriptors checked
once) and, with ``r1m``, appends distractor descriptors as a view of their memory map.  It offers the
first stage, Revisited evaluation and re-ranking, and hides where the database lives: in memory the whole
(N, Q) ranking is computed (:func:`csa.search.first_stage`); over distractors the database is streamed
(:func:`csa.largescale.first_stage_large`) and a re-ranker reads only the rows its short lists name
(:func:`csa.largescale.rerank_large`).  Both give the same numbers: what :meth:`Benchmark.first_stage`
returns is evaluated exactly either way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch.nn as nn

from csa.data.demo import group_queries
from csa.data.layout import load_gnd, load_test_features
from csa.data.r1m import append_distractors
from csa.evaluate import evaluate_revisited
from csa.largescale import ShortList, first_stage_large, rerank_large
from csa.model import unwrap
from csa.rerank import _rerank, check_rerank_settings
from csa.search import _first_stage
from csa.validation import CSAInputError, check_descriptors, check_gnd, check_ranks

__all__ = ["Benchmark", "FullRanking", "FirstStage"]

#: A re-ranker: ``f(qvecs, dbvecs, ranks) -> ranks`` (see :mod:`csa.compare.inputs`).
Ranker = Callable[[Any, Any, Any], Any]


@dataclass(frozen=True, eq=False)
class FullRanking:
    """A first stage held in memory: ``ranks`` (N or K, Q) of a database of ``n_db`` images.

    Same interface as :class:`csa.largescale.ShortList`: :meth:`evaluate` scores the first stage itself or
    a re-ranking of it.
    """

    ranks: np.ndarray
    gnd: list
    n_db: int

    def evaluate(self, ranks: Any = None, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
        """Revisited Easy / Medium / Hard results of the first stage, or of ``ranks`` (a re-ranking of it);
        a ranking shorter than the database is scored as a short list."""
        return evaluate_revisited(self.ranks if ranks is None else ranks, self.gnd, kappas=kappas, n_db=self.n_db,
                                  short_list=True)


#: What :meth:`Benchmark.first_stage` returns: the whole ranking in memory, or a streamed short list.
FirstStage = FullRanking | ShortList


@dataclass(frozen=True, eq=False)
class Benchmark:
    """One test benchmark: checked descriptors and raw revisitop ground truth, in memory or streamed.

    Build it with :meth:`load` (the data layout) or :meth:`from_arrays`.  ``qvecs`` (Q, D); ``dbvecs``
    (N, D): an array, or with ``streamed`` a view over the test database and memory-mapped distractors
    (:class:`csa.data.r1m.StackedDescriptors`); ``gnd`` the per-query list of the raw ground truth.
    """

    name: str
    qvecs: Any
    dbvecs: Any
    gnd: list
    streamed: bool = False

    @classmethod
    def load(cls, data_root: str | os.PathLike, dataset: str, feature_name: str,
             r1m: str | os.PathLike | None = None) -> Benchmark:
        """Read ``dataset``'s ground truth once and its ``feature_name`` descriptors (checked against it);
        with ``r1m`` (a ``.npy`` of distractor descriptors) the database is extended by a view of its memory
        map, read chunk by chunk and never loaded whole."""
        gt = load_gnd(data_root, dataset)
        feats = load_test_features(data_root, dataset, feature_name, gnd=gt)
        if r1m is None:
            return cls.from_arrays(feats.query, feats.db, gt, name=dataset)
        return cls.from_arrays(feats.query, append_distractors(feats.db, r1m, dtype="float32"), gt, name=dataset,
                               streamed=True)

    @classmethod
    def from_arrays(cls, qvecs: Any, dbvecs: Any, gnd: Any, name: str = "", streamed: bool = False) -> Benchmark:
        """A benchmark of given descriptors and ground truth (the revisitop dict or its ``'gnd'`` list).

        In memory the descriptors are checked once (:func:`csa.validation.check_descriptors`, rows that are
        not unit-norm renormalized with a warning); ``streamed`` leaves the database as stored (rows are read
        chunk by chunk and not re-normalized at this scale) and checks the queries as the streamed search does.
        """
        if streamed:
            n_q, n_db = _streamed_shapes(qvecs, dbvecs)
        else:
            qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")
            n_q, n_db = qvecs.shape[0], dbvecs.shape[0]
        return cls(name=name, qvecs=qvecs, dbvecs=dbvecs, gnd=list(check_gnd(gnd, n_db=n_db, n_q=n_q)),
                   streamed=bool(streamed))

    @property
    def n_queries(self) -> int:
        return int(self.qvecs.shape[0])

    @property
    def n_db(self) -> int:
        return int(self.dbvecs.shape[0])

    def landmarks(self) -> np.ndarray:
        """Landmark id of every query (:func:`csa.data.demo.group_queries`), the unit of landmark intervals."""
        return group_queries(self.gnd)

    def first_stage(self, depth: int | None = None, chunk_size: int = 8192, progress: bool = False) -> FirstStage:
        """The exact cosine first stage (ties by the lower database index).

        In memory: the whole (N, Q) ranking (:class:`FullRanking`).  Streamed: the top ``depth`` rows of every
        list plus the full-ranking positions of the ground truth (:class:`csa.largescale.ShortList`, database
        chunks of ``chunk_size`` rows); ``depth`` must cover what the re-rankers read (CSA: max(K, L-1)).
        """
        if not self.streamed:
            return FullRanking(_first_stage(self.qvecs, self.dbvecs), self.gnd, self.n_db)
        if depth is None:
            raise CSAInputError("a streamed benchmark (+R1M) keeps the top `depth` rows of every list: give the "
                                "depth the re-rankers read (CSA: max(K, L-1))")
        return first_stage_large(self.qvecs, self.dbvecs, self.gnd, depth=depth, chunk_size=chunk_size,
                                 progress=progress)

    def first_stage_from(self, ranks: Any) -> FullRanking:
        """A given first-stage ranking (N or K, Q) of this in-memory benchmark, checked once."""
        if self.streamed:
            raise CSAInputError("a streamed benchmark computes its own first stage; call first_stage(depth)")
        check_ranks(ranks, self.n_db, self.n_queries)
        return FullRanking(ranks, self.gnd, self.n_db)

    def evaluate(self, ranks: Any = None, progress: bool = False) -> dict[str, dict]:
        """Revisited results of ``ranks`` (default: the first stage): a full (N, Q) ranking, or, streamed,
        the re-ordered top rows of the first stage (as ``csa rerank --r1m --output`` saves them)."""
        rows = np.shape(ranks)[0] if ranks is not None and np.ndim(ranks) else 0
        if ranks is not None and (not self.streamed or rows == self.n_db):
            return evaluate_revisited(ranks, self.gnd, n_db=self.n_db)
        return self.first_stage(depth=1 if ranks is None else rows, progress=progress).evaluate(ranks)

    def rerank(self, method: Ranker, first: FirstStage, batch_size: int = 8) -> Any:
        """``method(qvecs, dbvecs, ranks) -> ranks`` applied to the first stage ``first``; streamed, it runs on
        blocks of ``batch_size`` queries over the rows their short lists name."""
        if not self.streamed:
            return method(self.qvecs, self.dbvecs, first.ranks)
        return rerank_large(method, self.qvecs, self.dbvecs, first.ranks, batch_size, False)

    def rerank_csa(self, model: nn.Module, first: FirstStage, topk: int, batch_size: int = 8, device: Any = None,
                   precision: str = "fp32", progress: bool = True) -> Any:
        """CSA's re-ranking of each top-``topk`` of ``first`` (:func:`csa.rerank.rerank`, L from the model).

        Settings (K, L, batch size, device, precision) are checked and resolved once; in memory the checked
        descriptors go straight to the re-ranking kernel, streamed each block's rows are checked as they are read.
        """
        anchor_len = int(unwrap(model).anchor_len)
        run = check_rerank_settings(model, self.n_queries, self.n_db, first.ranks, topk, anchor_len, batch_size,
                                    device, precision)
        if not self.streamed:
            return _rerank(model, self.qvecs, self.dbvecs, first.ranks, topk, anchor_len, run, progress)

        def block(qvecs: Any, dbvecs: Any, ranks: Any) -> Any:
            qvecs, dbvecs = check_descriptors(qvecs, dbvecs, normalize="warn")  # rows just read from the map
            return _rerank(model, qvecs, dbvecs, ranks, topk, anchor_len, run, False)

        return rerank_large(block, self.qvecs, self.dbvecs, first.ranks, run.batch_size, progress)


def _streamed_shapes(qvecs: Any, dbvecs: Any) -> tuple[int, int]:
    for name, x in (("qvecs", qvecs), ("dbvecs", dbvecs)):
        if len(tuple(getattr(x, "shape", ()))) != 2:
            raise CSAInputError(f"{name} must be a 2-D (n, D) array, memory map, tensor or StackedDescriptors, "
                                f"got {type(x).__name__}")
    return int(qvecs.shape[0]), int(dbvecs.shape[0])
