"""The compared re-rankers with their authors' default parameters, ready for :func:`csa.compare.runner.run_comparison`."""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

from csa.compare.affinity_baseline import affinity_cosine
from csa.compare.chain import compose
from csa.compare.inputs import Ranker, describe
from csa.compare.diffusion import diffusion
from csa.compare.expansion import AugmentDatabase, alpha_qe, aqe
from csa.compare.k_reciprocal import k_reciprocal
from csa.validation import CSAInputError

__all__ = ["default_methods", "select_methods", "describe", "SOURCES"]

#: Where each default comes from (shown next to the comparison table).
SOURCES = {
    "AQE": "average query expansion over the top n = 2 (Chum et al. 2007; global-descriptor form of Radenović et al. 2018)",
    "αQE": "n = 50, α = 3: the αQE setting of Radenović, Tolias & Chum (TPAMI 2018)",
    "αDBA": "n = 50, α = 3, as αQE (Radenović, Tolias & Chum, TPAMI 2018)",
    "diffusion": "k = 50 (the node itself included), α = 0.99, γ = 3, 20 CG steps, query k = 10, no truncation: "
                 "the global-descriptor setting of the authors' code (Iscen et al. 2017)",
    "k-reciprocal": "k1 = 20, k2 = 6, λ = 0.3 (Zhong et al. 2017), on each query's own top-K",
    "affinity cosine": "the CSA paper's untrained baseline (L = 512 in the paper); default_methods gives it the CSA "
                       "model's K and L",
}


def default_methods(model: Any = None, *, topk: int = 1024, anchor_len: int = 512, n_db: int | None = None,
                    device: Any = None, batch_size: int = 8, sensitivity: bool = False) -> dict[str, Ranker]:
    """The compared methods with their authors' default parameters (:data:`SOURCES`, each docstring).

    Keys: 'AQE', 'αQE', 'αDBA', 'αDBA+αQE', 'diffusion', 'k-reciprocal', 'affinity cosine',
    'affinity cosine (centred)', and with a CSA ``model``: 'CSA', 'αQE+CSA' (the paper's GSS+CSA
    style row: αQE re-query, then CSA on its top-K) and 'diffusion+CSA'.  CSA runs through
    :func:`csa.rerank.rerank` with ``topk`` and the model's own anchor length.  ``sensitivity`` adds
    αQE and αDBA at n = 2 and n = 10, labelled as sensitivity rows (not tuned choices).
    ``n_db`` (the database size) caps every depth parameter (n, k, topk, k1) so that the defaults
    also run on small databases; without it the published values are used as they are.
    """
    def cap(value: int, limit: int | None) -> int:
        return value if limit is None else max(1, min(value, limit))

    k_topk = cap(topk, n_db)
    n_qe = cap(50, n_db)
    n_dba = cap(50, None if n_db is None else n_db - 1)
    affinity_len = cap(anchor_len, None if n_db is None else n_db + 1)
    qe = partial(alpha_qe, n=n_qe, alpha=3.0)
    methods: dict[str, Ranker] = {
        "AQE": partial(aqe, n=cap(2, n_db)),
        "αQE": qe,
        "αDBA": compose(AugmentDatabase(n=n_dba, alpha=3.0)),
        "αDBA+αQE": compose(AugmentDatabase(n=n_dba, alpha=3.0), qe),
        "diffusion": partial(diffusion, k=cap(50, n_db), truncation=None, alpha=0.99, gamma=3.0, iterations=20,
                             query_k=cap(10, n_db)),
        "k-reciprocal": partial(k_reciprocal, k1=cap(20, k_topk), k2=6, lambda_value=0.3, topk=k_topk),
        "affinity cosine": partial(affinity_cosine, topk=k_topk, anchor_len=affinity_len),
        "affinity cosine (centred)": partial(affinity_cosine, topk=k_topk, centred=True, anchor_len=affinity_len),
    }
    if sensitivity:
        for n in (2, 10):
            methods[f"αQE, n={n} (sensitivity)"] = partial(alpha_qe, n=cap(n, n_db), alpha=3.0)
            methods[f"αDBA, n={n} (sensitivity)"] = compose(AugmentDatabase(n=cap(n, n_dba), alpha=3.0))
    if model is not None:
        from csa.rerank import rerank

        model_anchor_len = int(getattr(model, "config", {}).get("anchor_len", anchor_len))
        csa_step = partial(_csa, rerank, model, topk=k_topk, anchor_len=model_anchor_len, device=device,
                           batch_size=batch_size)
        methods["CSA"] = csa_step
        methods["αQE+CSA"] = compose(qe, csa_step)
        methods["diffusion+CSA"] = compose(methods["diffusion"], csa_step)
    return methods


def select_methods(methods: Mapping[str, Ranker], names: Sequence[str]) -> dict[str, Ranker]:
    """The methods called ``names``, in that order; an unknown name is refused with the valid ones listed."""
    unknown = [name for name in names if name not in methods]
    if unknown:
        raise CSAInputError(f"unknown method(s) {unknown}: choose from {sorted(methods)}")
    return {name: methods[name] for name in names}


def _csa(rerank: Callable, model: Any, qvecs: Any, dbvecs: Any, ranks: Any, **kwargs: Any) -> Any:
    return rerank(model, qvecs, dbvecs, ranks, progress=False, **kwargs)


_csa.display_name = "CSA"  # type: ignore[attr-defined]  # how csa.compare.inputs.describe names it
