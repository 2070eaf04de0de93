"""Query expansion (AQE, αQE) and database-side augmentation (DBA, αDBA) for global descriptors.

Both build new descriptors (of the query, or of every database image) as weighted sums of
neighbours and search the *whole database* again by exact cosine similarity; the result keeps as
many rows as ``ranks`` had (the top of the new full ranking).  Nothing materializes an N x N matrix:
database-side work is chunked.  The database side itself (:func:`augment_database`,
:class:`AugmentDatabase`) lives in :mod:`csa.compare.augmentation`, below :mod:`csa.compare.chain`;
αDBA and DBA here are chains of one augmentation step.
"""
from __future__ import annotations

from typing import Any

import torch

from csa.compare.augmentation import AugmentDatabase, augment_database
from csa.compare.chain import compose
from csa.compare.inputs import baseline_inputs, normalize_rows, search_again
from csa.arrays import same_kind
from csa.validation import check_float, check_int

__all__ = ["aqe", "alpha_qe", "dba", "alpha_dba", "augment_database", "AugmentDatabase"]


def alpha_qe(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 50, alpha: float = 3.0) -> Any:
    """α-weighted query expansion (αQE), Radenović, Tolias & Chum, TPAMI 2018.

    The new query is ``normalize(q + sum_{i=1..n} max(q·d_i, 0)^alpha d_i)`` over the top ``n``
    database images of ``ranks[:, q]`` (the query itself has weight 1, as its similarity to
    itself is 1); the whole database is then searched again with it.  ``alpha = 0`` gives average
    query expansion (:func:`aqe`).  Similarities are clipped at 0 before the power so that a
    non-integer ``alpha`` is defined (for ``alpha = 0`` every weight stays 1).
    ``n = 0`` means no expansion: ``ranks`` is returned unchanged.

    Defaults ``n = 50, alpha = 3`` as used with GeM descriptors by Radenović et al. (2018).
    Re-queries the whole database: time O(Q N D + Q N log N), memory O(Q n D + N · chunk).
    Returns as many rows as ``ranks`` has.
    """
    q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
    n = check_int("n", n, 0, r.shape[0],
                   hint=" (the number of rows of ranks; pass a deeper ranking or a smaller n)")
    alpha = check_float("alpha", alpha, 0.0)
    if n == 0:
        return same_kind(r.copy(), ranks)
    neighbours = db[torch.from_numpy(r[:n].T.copy())]               # (Q, n, D)
    sims = torch.einsum("qnd,qd->qn", neighbours, q)
    weights = sims.clamp_min(0.0).pow(alpha)                         # 0 ** 0 == 1
    expanded = normalize_rows(q + torch.einsum("qn,qnd->qd", weights, neighbours))
    return same_kind(search_again(expanded, db, depth=r.shape[0]), ranks)


def aqe(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 2) -> Any:
    """Average query expansion (AQE), Chum et al. ICCV 2007, in the global-descriptor form used by
    Radenović et al. (TPAMI 2018): the new query is ``normalize(q + sum_{i=1..n} d_i)`` over the
    top ``n`` images of ``ranks[:, q]``, and the whole database is searched again.

    Default ``n = 2``.  ``n = 0`` returns ``ranks`` unchanged.  Same cost as :func:`alpha_qe`.
    """
    return alpha_qe(qvecs, dbvecs, ranks, n=n, alpha=0.0)


def alpha_dba(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 50, alpha: float = 3.0,
              chunk_size: int = 1024, progress: bool = False) -> Any:
    """αDBA (Radenović et al. TPAMI 2018): augment the database with :func:`augment_database`
    (weights ``sim^alpha``, the image itself weight 1) and rank it again with the original queries.

    Defaults ``n = 50, alpha = 3`` (mirroring αQE).  ``ranks`` only fixes the number of output rows.
    Time O(N² D) for the augmentation (offline in practice) + O(Q N D) for the search; memory
    O(chunk_size · N).  It is ``compose(AugmentDatabase(...))``; follow it by αQE with
    ``compose(AugmentDatabase(...), alpha_qe)``.
    """
    return compose(AugmentDatabase(n, alpha, chunk_size, progress))(qvecs, dbvecs, ranks)


def dba(qvecs: Any, dbvecs: Any, ranks: Any, n: int = 2, chunk_size: int = 1024,
        progress: bool = False) -> Any:
    """Database-side augmentation with equal weights (DBA; Arandjelović & Zisserman CVPR 2012,
    Gordo et al. IJCV 2017): each database vector becomes ``normalize(d_j + sum of its n nearest
    other database vectors)``, then the database is ranked again.  Default ``n = 2``.
    Cost as :func:`alpha_dba`.
    """
    return alpha_dba(qvecs, dbvecs, ranks, n=n, alpha=0.0, chunk_size=chunk_size, progress=progress)
