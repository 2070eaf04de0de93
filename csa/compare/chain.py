"""Chains of re-rankers, e.g. αDBA then αQE, or αQE then CSA."""
from __future__ import annotations

from typing import Any

from csa.compare.common import Ranker, as_float_cpu, baseline_inputs, search_again
from csa.compare.expansion import AugmentDatabase
from csa.validation import CSAInputError, same_kind

__all__ = ["compose"]


def compose(*steps: Ranker | AugmentDatabase) -> Ranker:
    """Chain re-rankers: ``compose(a, b)(qvecs, dbvecs, ranks) == b(qvecs, dbvecs, a(qvecs, dbvecs, ranks))``.

    A step is either a ranker ``f(qvecs, dbvecs, ranks) -> ranks`` (use ``functools.partial`` or a
    lambda to fix its parameters) or an :class:`AugmentDatabase`, which replaces the database by its
    augmented version for all following steps and ranks it again (αDBA).  Examples::

        compose(AugmentDatabase(n=50, alpha=3), alpha_qe)             # αDBA + αQE
        compose(alpha_qe, lambda q, d, r: rerank(model, q, d, r))      # αQE then CSA (GSS+CSA row)
        compose(diffusion, lambda q, d, r: rerank(model, q, d, r))     # DFS+CSA row
    """
    if not steps:
        raise CSAInputError("compose needs at least one step")
    for i, step in enumerate(steps):
        if not callable(step):
            raise CSAInputError(f"compose step {i} is not callable: {step!r}")

    def chained(qvecs: Any, dbvecs: Any, ranks: Any) -> Any:
        for step in steps:
            if isinstance(step, AugmentDatabase):
                q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
                dbvecs = step(dbvecs)
                ranks = same_kind(search_again(q, as_float_cpu(dbvecs), depth=r.shape[0]), ranks)
            else:
                ranks = step(qvecs, dbvecs, ranks)
        return ranks

    chained.__name__ = " + ".join(getattr(s, "__name__", repr(s)) for s in steps)
    chained.steps = steps  # type: ignore[attr-defined]
    return chained
