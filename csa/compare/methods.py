"""The compared re-rankers with their authors' default parameters, ready for :func:`csa.compare.runner.run_comparison`."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.chain import compose
from csa.compare.common import Ranker
from csa.compare.diffusion import diffusion
from csa.compare.expansion import AugmentDatabase, alpha_dba, alpha_qe, aqe
from csa.compare.k_reciprocal import k_reciprocal

__all__ = ["default_methods"]


def default_methods(model: Any = None, *, topk: int = 1024, anchor_len: int = 512, n_db: int | None = None,
                    device: Any = None, batch_size: int = 8) -> dict[str, Ranker]:
    """The compared methods with the papers' default parameters (see each function's docstring).

    Keys: 'AQE', 'αQE', 'αDBA', 'αDBA+αQE', 'diffusion', 'k-reciprocal', 'affinity cosine',
    'affinity cosine (centred)', and with a CSA ``model``: 'CSA', 'αQE+CSA' (the paper's GSS+CSA
    style row: αQE re-query, then CSA on its top-K) and 'diffusion+CSA'.  CSA runs through
    :func:`csa.rerank.rerank` with ``topk`` and the model's own anchor length.
    ``n_db`` (the database size) caps every depth parameter (n, truncation, k, topk, k1) so that
    the defaults also run on small databases; without it the paper values are used as they are.
    """
    def cap(value: int, limit: int | None) -> int:
        return value if limit is None else max(1, min(value, limit))

    k_topk = cap(topk, n_db)
    n_qe = cap(50, n_db)
    n_dba = cap(50, None if n_db is None else n_db - 1)
    truncation = cap(1000, n_db)
    methods: dict[str, Ranker] = {
        "AQE": partial(aqe, n=cap(2, n_db)),
        "αQE": partial(alpha_qe, n=n_qe, alpha=3.0),
        "αDBA": partial(alpha_dba, n=n_dba, alpha=3.0),
        "αDBA+αQE": compose(AugmentDatabase(n=n_dba, alpha=3.0),
                                      partial(alpha_qe, n=n_qe, alpha=3.0)),
        "diffusion": partial(diffusion, k=cap(50, truncation - 1), truncation=truncation,
                             alpha=0.99, gamma=3.0, iterations=20, query_k=cap(10, truncation)),
        "k-reciprocal": partial(k_reciprocal, k1=cap(20, k_topk), k2=6, lambda_value=0.3,
                                topk=k_topk),
        "affinity cosine": partial(affinity_cosine, topk=k_topk,
                                   anchor_len=cap(anchor_len, None if n_db is None else n_db + 1)),
        "affinity cosine (centred)": partial(affinity_cosine, topk=k_topk, centred=True,
                                             anchor_len=cap(anchor_len, None if n_db is None else n_db + 1)),
    }
    if model is not None:
        from csa.rerank import rerank

        model_anchor_len = int(getattr(model, "config", {}).get("anchor_len", anchor_len))
        csa_step = partial(_csa, rerank, model, topk=k_topk, anchor_len=model_anchor_len, device=device,
                           batch_size=batch_size)
        methods["CSA"] = csa_step
        methods["αQE+CSA"] = compose(methods["αQE"], csa_step)
        methods["diffusion+CSA"] = compose(methods["diffusion"], csa_step)
    return methods


def _csa(rerank: Callable, model: Any, qvecs: Any, dbvecs: Any, ranks: Any, **kwargs: Any) -> Any:
    return rerank(model, qvecs, dbvecs, ranks, progress=False, **kwargs)
