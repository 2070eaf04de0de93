"""First stage, re-ranking and Revisited evaluation at the 1M scale, without the full (N, Q) argsort and
without loading the database.

With the R1M distractors the database has about a million rows (4 GB as a float16 memory map); sorting
all N scores of every query (and then searching every positive in the sorted lists, as revisitop's
``compute_map`` does) costs far more than the matrix product itself. :func:`first_stage_large` streams
the database in chunks and

* keeps a running top-K per query (``torch.topk`` per chunk, then a stable merge), the short list
  re-rankers consume, and
* finds the exact position of every positive and junk image in the *full* ranking by counting, for
  each such image, the database rows that score higher (or equal with a lower index).

The ordering is the one :func:`csa.search.first_stage` defines: descending inner product, ties broken
by the lower database index. From those positions the average precision and mP@k follow the revisitop
protocol exactly (junk images are removed and the later positions shift up), so the results equal
``evaluate_revisited(full_ranks, gnd)`` (:meth:`ShortList.evaluate`, :func:`evaluate_large`).

A re-ranker such as CSA only re-orders the top of each list; everything below keeps its first-stage
position. :func:`rerank_large` runs it block by block of queries on the database rows the lists name
(read from the memory map), and :meth:`ShortList.evaluate` turns the re-ordered lists plus the counted
positions into exact results: the +R1M path never holds more than one chunk of the database.

Scores are computed in float32 chunk by chunk (float16 storage is upcast per chunk into one reused
buffer). The score of a positive / junk image is taken from the same chunk product that the counting
pass compares it with, so an image never competes with a re-rounded copy of itself.
:func:`iter_chunk_scores` yields exactly these chunk scores, for code that wants the full matrix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csa.evaluate import PROTOCOLS, protocol_gnd, protocol_summary, query_scores
from csa.search import merge_topk, stable_topk
from csa.arrays import as_cpu_tensor, as_numpy, as_tensor
from csa.validation import CSAInputError, check_gnd, check_int, check_kappas

__all__ = ["ShortList", "evaluate_large", "first_stage_large", "gather_rows", "iter_chunk_scores", "rank_positions",
           "rerank_large", "topk_and_positions"]


def _as_query_tensor(qvecs: Any) -> torch.Tensor:
    if isinstance(qvecs, (np.ndarray, torch.Tensor)):
        q = as_tensor(qvecs).detach().cpu()
    else:
        raise CSAInputError(f"qvecs must be a numpy array or torch tensor (Q, D), got {type(qvecs).__name__}")
    if q.ndim != 2 or q.shape[0] == 0 or not q.is_floating_point():
        raise CSAInputError(f"qvecs must be a non-empty floating-point (Q, D) array, got shape "
                            f"{tuple(q.shape)} and dtype {q.dtype}")
    q = q.to(torch.float32).contiguous()
    if not bool(torch.isfinite(q).all()):
        raise CSAInputError("qvecs holds NaN or inf values; fix or drop those queries")
    return q


def _db_reader(db: Any, d: int, chunk_size: int) -> tuple[int, Callable[[int, int], torch.Tensor]]:
    """Row count and ``read(start, stop)`` giving rows ``start..stop-1`` (at most ``chunk_size``) as float32.

    Float32 rows are used in place. Other floating types are converted into one float32 buffer
    allocated once and reused: a fresh ``chunk_size x D`` float32 tensor per chunk would be a new
    memory mapping each time (64 MB at 8192 x 2048) whose page faults cost more than the conversion.
    Objects with a ``read_into(start, stop, out)`` method (:class:`csa.data.r1m.StackedDescriptors`)
    write their rows into that buffer directly. The returned tensor is only valid until the next call.
    """
    shape = tuple(getattr(db, "shape", ()))
    if len(shape) != 2:
        raise CSAInputError(f"db must be a 2-D (N, D) array, memory map, tensor or StackedDescriptors, "
                            f"got {type(db).__name__} with shape {shape}")
    if shape[1] != d:
        raise CSAInputError(f"descriptor dimensions differ: qvecs has D={d}, db has D={shape[1]}; use the "
                            f"same network for both (rows are images: transpose D x N arrays with .T)")
    if shape[0] == 0:
        raise CSAInputError("db is empty; pass at least one database descriptor")
    rows_max = min(int(chunk_size), int(shape[0]))
    buffer: list[torch.Tensor] = []  # the float32 conversion buffer, created on first use
    read_into = getattr(db, "read_into", None)

    def buffered(count: int) -> torch.Tensor:
        if count > rows_max:
            raise ValueError(f"a read of {count} rows asks for more than chunk_size={rows_max} rows")
        if not buffer:
            buffer.append(torch.empty((rows_max, d), dtype=torch.float32))
        return buffer[0][:count]

    def read(start: int, stop: int) -> torch.Tensor:
        if read_into is not None:  # e.g. StackedDescriptors: rows written straight into the buffer
            out = buffered(stop - start)
            read_into(start, stop, out.numpy())
            return out
        t = as_cpu_tensor(db[start:stop])
        if not t.is_floating_point():
            raise CSAInputError(f"db must hold floating-point descriptors, got dtype {t.dtype}")
        if t.dtype == torch.float32:
            return t
        out = buffered(t.shape[0])
        out.copy_(t)  # same rounding as t.to(torch.float32); exact for float16 / bfloat16
        return out

    return int(shape[0]), read


def _chunk_scores(read: Callable[[int, int], torch.Tensor], q: torch.Tensor, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores (stop - start, Q) of one database chunk; the single place scores are computed."""
    s = torch.mm(read(start, stop), q.t(), out=out)
    if not bool(torch.isfinite(s).all()):
        raise CSAInputError(f"database rows {start}..{stop - 1} give NaN / inf scores; the descriptors "
                            f"hold non-finite values: fix or drop those rows")
    return s


def iter_chunk_scores(qvecs: Any, db: Any, chunk_size: int = 8192,
                      out: torch.Tensor | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, scores)`` for consecutive database chunks, ``scores`` (stop - start, Q) float32.

    These are exactly the scores :func:`evaluate_large` ranks (same reads, conversion and ``torch.mm``),
    so a full-matrix ranking built from them ties and orders identically. With ``out`` (a contiguous
    float32 (N, Q) tensor) each chunk is written into ``out[start:stop]`` and that view is yielded.
    """
    q = _as_query_tensor(qvecs)
    n, read = _db_reader(db, q.shape[1], _check_chunk_size(chunk_size))
    if out is not None and (tuple(out.shape) != (n, q.shape[0]) or out.dtype != torch.float32
                            or not out.is_contiguous()):
        raise CSAInputError(f"out must be a contiguous float32 tensor of shape ({n}, {q.shape[0]}), got "
                            f"{out.dtype} {tuple(out.shape)}")
    for start in range(0, n, int(chunk_size)):
        stop = min(start + int(chunk_size), n)
        yield start, stop, _chunk_scores(read, q, start, stop, None if out is None else out[start:stop])


def _count_below(tpad: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``searchsorted(tpad, values)`` (strictly-below counts) for rows ``tpad`` sorted ascending whose
    width is a power of two ending in +inf; branch-free binary search, several times faster than
    ``torch.searchsorted`` on scores in random order."""
    pos = torch.zeros(values.shape, dtype=torch.int64)
    step = tpad.shape[1] // 2
    while step:
        pos += (tpad.gather(1, pos + (step - 1)) < values).long() * step
        step //= 2
    return pos


def topk_and_positions(qvecs: Any, db: Any, targets: Sequence[Sequence[int]], topk: int = 1024,
                       chunk_size: int = 8192, progress: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """Top-``topk`` ranking ``(topk, Q)`` and the 0-based full-ranking positions of ``targets[q]``.

    ``targets[q]`` are database indices of query ``q`` (any order, duplicates allowed); the returned
    ``positions[q][i]`` is where ``targets[q][i]`` sits in the complete ranking of query ``q``
    (descending score, ties by lower index), found without sorting the database.
    """
    q = _as_query_tensor(qvecs)
    chunk = _check_chunk_size(chunk_size)
    n, read = _db_reader(db, q.shape[1], chunk)
    if len(targets) != q.shape[0]:
        raise CSAInputError(f"targets has {len(targets)} entries but there are {q.shape[0]} queries")
    if int(topk) < 1:
        raise CSAInputError(f"topk must be >= 1, got {topk}")
    return _topk_and_positions(q, n, read, targets, min(int(topk), n), chunk, progress)


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise CSAInputError(f"chunk_size must be >= 1 row, got {chunk_size}")
    return int(chunk_size)


def _topk_and_positions(q: torch.Tensor, n: int, read: Callable[[int, int], torch.Tensor],
                        targets: Sequence[Sequence[int]], k: int, chunk: int,
                        progress: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`topk_and_positions` on checked queries, a database reader of ``n`` rows and ``k <= n``.

    Pass 1 scores the targets (:func:`_target_table`); pass 2 streams the database once, keeping the
    running top-k and counting, per target, the rows ranked above it (:func:`_stream_database`).
    """
    uniq = _unique_targets(targets, n)
    table = _target_table(read, q, uniq, n, chunk)
    top_idx, higher, tied_before = _stream_database(read, q, n, k, chunk, table, progress)
    pos_sorted = higher + tied_before[:, :table.m]
    pos = torch.empty_like(pos_sorted).scatter_(1, table.perm, pos_sorted)
    return _positions_of_targets(top_idx.numpy(), pos, targets, uniq, k)


def _unique_targets(targets: Sequence[Sequence[int]], n: int) -> list[np.ndarray]:
    """Each query's distinct target indices, ascending, checked against the database size ``n``."""
    uniq = [np.unique(np.asarray(t, dtype=np.int64)) for t in targets]
    for qi, u in enumerate(uniq):
        if u.size and (u[0] < 0 or u[-1] >= n):
            raise CSAInputError(f"targets of query {qi} hold indices outside [0, {n - 1}]; does the ground "
                                f"truth belong to this database (were distractors prepended instead of appended)?")
    return uniq


class _TargetTable(NamedTuple):
    """Every query's target scores sorted ascending (``tpad``: padded with +inf to a power-of-two width),
    their database indices in that order (``sorted_idx``, padded with ``n``), the sorting permutation
    ``perm`` and the widest target count ``m``."""

    tpad: torch.Tensor
    sorted_idx: torch.Tensor
    perm: torch.Tensor
    m: int


def _target_table(read: Callable[[int, int], torch.Tensor], q: torch.Tensor, uniq: list[np.ndarray], n: int,
                  chunk: int) -> _TargetTable:
    """Pass 1: the target scores, from the very chunk products the counting pass recomputes."""
    nq = q.shape[0]
    m = max([u.size for u in uniq] + [1])
    tidx = torch.full((nq, m), -1, dtype=torch.int64)
    for qi, u in enumerate(uniq):
        tidx[qi, :u.size] = torch.from_numpy(u)
    valid = tidx >= 0
    tscore = torch.full((nq, m), float("inf"), dtype=torch.float32)
    for start in sorted({int(i) // chunk * chunk for u in uniq for i in u}):
        stop = min(start + chunk, n)
        s = _chunk_scores(read, q, start, stop)
        inside = valid & (tidx >= start) & (tidx < stop)
        rows, cols = torch.nonzero(inside, as_tuple=True)
        tscore[rows, cols] = s[tidx[rows, cols] - start, rows]
    tsorted, perm = torch.sort(tscore, dim=1, stable=True)  # padding (+inf) stays last
    width = 1 << m.bit_length()                             # a power of two > m: room for +inf sentinels
    tpad = torch.full((nq, width), float("inf"), dtype=torch.float32)
    tpad[:, :m] = tsorted
    sorted_idx = torch.full((nq, width), n, dtype=torch.int64)  # sentinel index: never 'lower'
    sorted_idx[:, :m] = tidx.gather(1, perm)
    return _TargetTable(tpad, sorted_idx, perm, m)


def _stream_database(read: Callable[[int, int], torch.Tensor], q: torch.Tensor, n: int, k: int, chunk: int,
                     table: _TargetTable, progress: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 2: one streaming pass; returns the running top-k indices (k, Q) and, per sorted target, the
    number of rows scoring higher and of rows tied with it at a lower index."""
    nq, width = q.shape[0], table.tpad.shape[1]
    below_hist = torch.zeros((nq, width), dtype=torch.int64)
    tied_before = torch.zeros((nq, width), dtype=torch.int64)
    top_vals = torch.empty((0, nq), dtype=torch.float32)
    top_idx = torch.empty((0, nq), dtype=torch.int64)
    for start in tqdm(range(0, n, chunk), desc="large-scale search", unit="chunk", disable=not progress):
        stop = min(start + chunk, n)
        s = _chunk_scores(read, q, start, stop)
        # Only rows scoring above the current k-th best can enter (equal scores lose: higher index).
        take = min(k, stop - start)
        if top_vals.shape[0] == k:
            take = min(take, int((s > top_vals[-1]).sum(0).max()))
        if take:
            cv, ci = stable_topk(s, take, dim=0)
            top_vals, top_idx = merge_topk(top_vals, top_idx, cv, ci + start, k)
        _count_chunk(s.t().contiguous(), start, table, below_hist, tied_before)
    # #scores above target k = #rows whose 'left' exceeds k.
    higher = below_hist.flip(1).cumsum(1).flip(1)[:, 1:table.m + 1]
    return top_idx, higher, tied_before


def _count_chunk(st: torch.Tensor, start: int, table: _TargetTable, below_hist: torch.Tensor,
                 tied_before: torch.Tensor) -> None:
    """Add one chunk's scores ``st`` (Q, c) to the counts: a histogram of how many targets lie strictly below
    each score, and for scores equal to a target's, whether their row index is lower than the target's."""
    tpad, sorted_idx = table.tpad, table.sorted_idx
    left = _count_below(tpad, st)                                # targets strictly below each score
    below_hist.scatter_add_(1, left, torch.ones_like(left))
    qq, jj = torch.nonzero(tpad.gather(1, left) == st, as_tuple=True)  # scores equal to a target's
    if not qq.numel():
        return
    kk, jglob = left[qq, jj], jj + start
    while qq.numel():  # walk each run of equal target scores upwards
        use = jglob < sorted_idx[qq, kk]
        tied_before.index_put_((qq[use], kk[use]), torch.ones(int(use.sum()), dtype=torch.int64), accumulate=True)
        kk = kk + 1
        more = tpad[qq, kk] == st[qq, jj]
        qq, jj, kk, jglob = qq[more], jj[more], kk[more], jglob[more]


def _positions_of_targets(top_np: np.ndarray, pos: torch.Tensor, targets: Sequence[Sequence[int]],
                          uniq: list[np.ndarray], k: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The top-k lists and each query's target positions in the order of ``targets`` (duplicates repeated),
    after a self-check: a target inside the top-k must be listed exactly at its counted position."""
    positions = []
    for qi, (t, u) in enumerate(zip(targets, uniq)):
        pu = pos[qi, :u.size].numpy()
        inside = pu < k
        if not np.array_equal(top_np[pu[inside], qi], u[inside]):
            raise RuntimeError("top-k list and counted positions disagree: the chunk products were not "
                               "reproducible (non-deterministic matmul?)")
        t = np.asarray(t, dtype=np.int64)
        positions.append(pu[np.searchsorted(u, t)] if t.size else np.empty(0, dtype=np.int64))
    return top_np, positions


def rank_positions(qvecs: Any, db: Any, targets: Sequence[Sequence[int]], chunk_size: int = 8192,
                   progress: bool = True) -> list[np.ndarray]:
    """0-based positions of ``targets[q]`` in query ``q``'s full ranking (see :func:`topk_and_positions`)."""
    return topk_and_positions(qvecs, db, targets, topk=1, chunk_size=chunk_size, progress=progress)[1]


def _protocol_scores(pos_of: dict[int, int], ok: np.ndarray, junk: np.ndarray,
                     kappas: Sequence[int]) -> tuple[float, np.ndarray]:
    """AP and P@k of one query from full-ranking positions (revisitop rules, as compute_map)."""
    if ok.size == 0:
        return float("nan"), np.full(len(kappas), np.nan)
    pos = np.sort(np.array([pos_of[i] for i in np.unique(ok)], dtype=np.int64))
    jpos = np.sort(np.array([pos_of[i] for i in np.unique(junk)], dtype=np.int64))
    pos = pos - np.searchsorted(jpos, pos, side="left")  # junk ranked above a positive is removed
    return query_scores(pos, ok.size, kappas)


def _raw_gnd(gnd: Any, n_queries: int) -> list[dict]:
    gnd = check_gnd(gnd, n_q=n_queries)
    if any(not all(key in g for key in ("easy", "hard", "junk")) for g in gnd):
        raise CSAInputError("large-scale evaluation needs the raw revisitop ground truth (every query with 'easy', "
                            "'hard' and 'junk'), not a single-protocol 'ok' list")
    return list(gnd)


@dataclass
class ShortList:
    """A first-stage search over a huge database, kept small enough to hold in memory.

    ``ranks`` (depth, Q) int64: the top ``depth`` of each query's ranking (descending score, ties by
    lower index); ``targets[q]``: the ground-truth images of query ``q`` (easy, hard and junk, unique,
    ascending); ``positions[q]``: their 0-based positions in the query's *full* ranking of all N rows.
    A re-ranker that re-orders the top of each list leaves every position below it unchanged, so
    :meth:`evaluate` scores the first stage and any such re-ranking exactly, as
    :func:`csa.evaluate.evaluate_revisited` would on the full (N, Q) ranking.
    """

    ranks: np.ndarray
    targets: list[np.ndarray]
    positions: list[np.ndarray]
    gnd: list[dict]

    @property
    def depth(self) -> int:
        return int(self.ranks.shape[0])

    def positions_after(self, ranks: Any = None) -> list[np.ndarray]:
        """Full-ranking positions of ``targets`` once the top ``len(ranks)`` rows of every list are
        replaced by ``ranks`` (a re-ordering of those rows; ``None``: the first stage itself)."""
        if ranks is None:
            return [p.copy() for p in self.positions]
        r = as_numpy(ranks)
        if r.ndim != 2 or r.shape[1] != self.ranks.shape[1] or not 1 <= r.shape[0] <= self.depth \
                or not np.issubdtype(r.dtype, np.integer):
            raise CSAInputError(f"ranks must be integer (M, Q) with 1 <= M <= {self.depth} rows and Q = "
                                f"{self.ranks.shape[1]} columns (the re-ordered top of the short list), got "
                                f"{r.dtype} {r.shape}")
        m = r.shape[0]
        if not np.array_equal(np.sort(r, axis=0), np.sort(self.ranks[:m], axis=0)):
            raise CSAInputError(f"ranks must re-order the first-stage top-{m} of every query (the same images, "
                                f"another order): below it the first-stage order is assumed; this ranking brings "
                                f"in other images, so evaluate it on the full (N, Q) ranking instead")
        out = []
        for qi, (t, p) in enumerate(zip(self.targets, self.positions)):
            p = p.copy()
            inside = p < m
            if inside.any():
                col = r[:, qi]
                order = np.argsort(col, kind="stable")
                p[inside] = order[np.searchsorted(col[order], t[inside])]
            out.append(p)
        return out

    def evaluate(self, ranks: Any = None, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
        """Revisited Easy / Medium / Hard results (layout and values of
        :func:`csa.evaluate.evaluate_revisited`) of the first stage, or of ``ranks``: the top of every
        list re-ordered (see :meth:`positions_after`)."""
        kappas = check_kappas(kappas)
        pos_of = [dict(zip(t.tolist(), p.tolist())) for t, p in zip(self.targets, self.positions_after(ranks))]
        results = {}
        nq = len(self.gnd)
        for proto in PROTOCOLS:
            aps = np.zeros(nq)
            prs = np.zeros((nq, len(kappas)))
            for qi, g in enumerate(protocol_gnd(self.gnd, proto)):
                ok = np.asarray(g["ok"], dtype=np.int64).ravel()
                junk = np.asarray(g["junk"], dtype=np.int64).ravel()
                aps[qi], prs[qi] = _protocol_scores(pos_of[qi], ok, junk, kappas)
            results[proto] = protocol_summary(aps, prs, kappas)  # the reductions of evaluate_revisited
        return results


def first_stage_large(qvecs: Any, db: Any, gnd: Any, depth: int = 1024, chunk_size: int = 8192,
                      progress: bool = True) -> ShortList:
    """First stage over a huge database in one streaming pass: a :class:`ShortList` of depth ``depth``.

    ``qvecs`` (Q, D); ``db`` (N, D) numpy array / memory map (float32 or float16), torch tensor or
    :class:`csa.data.r1m.StackedDescriptors`, used as stored (rows are not re-normalized at this
    scale); ``gnd`` the raw revisitop ground truth. Memory beyond the descriptors: one chunk of
    ``chunk_size`` rows in float32 plus ``O(Q * (depth + positives))``.
    """
    q = _as_query_tensor(qvecs)
    gnd = _raw_gnd(gnd, q.shape[0])
    targets = [np.unique(np.concatenate([np.asarray(g[key], dtype=np.int64).ravel()
                                         for key in ("easy", "hard", "junk")])) for g in gnd]
    chunk = _check_chunk_size(chunk_size)
    n, read = _db_reader(db, q.shape[1], chunk)
    if int(depth) < 1:
        raise CSAInputError(f"topk must be >= 1, got {depth}")
    ranks, positions = _topk_and_positions(q, n, read, targets, min(int(depth), n), chunk, progress)
    return ShortList(ranks=ranks, targets=targets, positions=positions, gnd=gnd)


def evaluate_large(qvecs: Any, db: Any, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10),
                   topk: int = 1024, chunk_size: int = 8192, progress: bool = True) -> tuple[dict, np.ndarray]:
    """Revisited Easy / Medium / Hard evaluation of the first-stage ranking over a huge database.

    Arguments as :func:`first_stage_large` (``topk`` = its ``depth``). Returns ``(results, ranks)``:
    ``results`` has the layout of :func:`csa.evaluate.evaluate_revisited`
    (``{'easy'|'medium'|'hard': {'map', 'mp@k', 'aps'}}``, percent) and equals it on the full argsort;
    ``ranks`` is the top-``topk`` first-stage ranking ``(topk, Q)`` (ties by lower index).
    """
    kappas = check_kappas(kappas)  # fail before the long search
    shortlist = first_stage_large(qvecs, db, gnd, depth=topk, chunk_size=chunk_size, progress=progress)
    return shortlist.evaluate(kappas=kappas), shortlist.ranks


def gather_rows(db: Any, rows: Any) -> torch.Tensor:
    """The database rows at the 1-D indices ``rows`` as a float32 CPU tensor (len(rows), D), reading only
    those rows (a memory map touches just their pages)."""
    idx = np.asarray(rows, dtype=np.int64).ravel()
    if isinstance(db, torch.Tensor):
        return db.index_select(0, torch.from_numpy(idx).to(db.device)).detach().to("cpu", torch.float32)
    got = np.asarray(db[idx])
    if not np.issubdtype(got.dtype, np.floating):
        raise CSAInputError(f"db must hold floating-point descriptors, got dtype {got.dtype}")
    return torch.from_numpy(got.astype(np.float32, copy=False))


def rerank_large(method: Callable[[Any, Any, Any], Any], qvecs: Any, db: Any, ranks: Any, batch_size: int = 8,
                 progress: bool = True) -> np.ndarray:
    """Apply a re-ranker of the top of each list to a huge database, reading only the listed rows.

    ``method(qvecs, dbvecs, ranks) -> ranks`` re-orders the top rows of ``ranks`` using only the
    database rows they list, e.g. ``functools.partial(csa.rerank.rerank, model, topk=K, anchor_len=L,
    batch_size=8)`` or a baseline of :mod:`csa.compare`. ``ranks`` (M, Q): the short list (e.g.
    :attr:`ShortList.ranks`, M >= what the method needs). For every block of ``batch_size`` queries
    the rows its lists name are read (:func:`gather_rows`) into a small database, the lists are
    re-indexed into it, ``method`` runs on that and its result is mapped back to database indices.
    Returns the re-ranked (M, Q) int64 list; evaluate it with :meth:`ShortList.evaluate`.

    The result equals ``method(qvecs, full_db, ranks)`` when the method handles queries in
    independent batches of ``batch_size`` (``csa.rerank.rerank`` with the same ``batch_size``, the
    affinity baselines). Memory: ``batch_size * M`` database rows in float32 (8 x 1024 x 2048: 64 MB)
    plus what the method needs for one block.
    """
    q = _as_query_tensor(qvecs)
    r = as_numpy(ranks)
    if r.ndim != 2 or r.shape[1] != q.shape[0] or r.shape[0] < 1 or not np.issubdtype(r.dtype, np.integer):
        raise CSAInputError(f"ranks must be an integer (M, Q) short list with Q = {q.shape[0]} columns, got "
                            f"{r.dtype} {r.shape}")
    batch_size = check_int("batch_size", batch_size, 1)
    n = int(tuple(getattr(db, "shape", (0,)))[0])
    if r.size and (r.min() < 0 or r.max() >= n):
        raise CSAInputError(f"ranks holds indices from {r.min()} to {r.max()}, outside the database [0, {n - 1}]")
    out = np.empty(r.shape, dtype=np.int64)
    for s in tqdm(range(0, r.shape[1], batch_size), desc="re-ranking the short lists", unit="block",
                  disable=not progress):
        e = min(s + batch_size, r.shape[1])
        used, local = np.unique(r[:, s:e], return_inverse=True)
        local = local.reshape(r.shape[0], e - s)
        new_local = np.asarray(method(q[s:e].numpy(), gather_rows(db, used).numpy(), local))
        if new_local.shape != local.shape:
            raise CSAInputError(f"the re-ranker returned shape {new_local.shape} for a short list of shape "
                                f"{local.shape}; it must return the re-ordered list")
        out[:, s:e] = used[new_local]
    return out
