"""Chains of re-rankers, e.g. αDBA then αQE, or αQE then CSA."""
from __future__ import annotations

from typing import Any, Callable

from csa.compare.common import Ranker, as_float_cpu, baseline_inputs, search_again
from csa.compare.expansion import AugmentDatabase
from csa.validation import CSAInputError, same_kind

__all__ = ["compose", "Chain"]


def _name(step: Any) -> str:
    if isinstance(step, AugmentDatabase):
        return repr(step)
    func = getattr(step, "func", step)
    keywords = getattr(step, "keywords", None)
    name = getattr(func, "__name__", None) or repr(func)
    return f"{name}({', '.join(f'{k}={v}' for k, v in keywords.items())})" if keywords else name


class Chain:
    """Re-rankers applied in order; :class:`AugmentDatabase` steps replace the database for what follows.

    :meth:`offline` runs the leading database augmentation once (the part αDBA does before any query
    arrives) and returns the per-query remainder, so its cost can be reported apart.
    """

    def __init__(self, steps: tuple[Ranker | AugmentDatabase, ...], database: Any = None) -> None:
        self.steps, self.database = steps, database
        self.__name__ = " + ".join(_name(s) for s in steps)

    def __call__(self, qvecs: Any, dbvecs: Any, ranks: Any) -> Any:
        if self.database is not None:
            dbvecs = self.database
            q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
            ranks = same_kind(search_again(q, db, depth=r.shape[0]), ranks)
        for step in self.steps:
            if isinstance(step, AugmentDatabase):
                q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
                dbvecs = step(dbvecs)
                ranks = same_kind(search_again(q, as_float_cpu(dbvecs), depth=r.shape[0]), ranks)
            else:
                ranks = step(qvecs, dbvecs, ranks)
        return ranks

    def offline(self, dbvecs: Any) -> Callable[[Any, Any, Any], Any] | None:
        """The leading augmentation steps applied to ``dbvecs`` now; ``None`` when the chain has none."""
        lead = 0
        while lead < len(self.steps) and isinstance(self.steps[lead], AugmentDatabase):
            lead += 1
        if lead == 0:
            return None
        for step in self.steps[:lead]:
            dbvecs = step(dbvecs)
        return Chain(self.steps[lead:], database=dbvecs)

    def __repr__(self) -> str:
        return self.__name__


def compose(*steps: Ranker | AugmentDatabase) -> Chain:
    """Chain re-rankers: ``compose(a, b)(qvecs, dbvecs, ranks) == b(qvecs, dbvecs, a(qvecs, dbvecs, ranks))``.

    A step is either a ranker ``f(qvecs, dbvecs, ranks) -> ranks`` (use ``functools.partial`` or a
    lambda to fix its parameters) or an :class:`AugmentDatabase`, which replaces the database by its
    augmented version for all following steps and ranks it again (αDBA).  Examples::

        compose(AugmentDatabase(n=50, alpha=3))                        # αDBA
        compose(AugmentDatabase(n=50, alpha=3), alpha_qe)              # αDBA + αQE
        compose(alpha_qe, lambda q, d, r: rerank(model, q, d, r))      # αQE then CSA (GSS+CSA row)
    """
    if not steps:
        raise CSAInputError("compose needs at least one step")
    for i, step in enumerate(steps):
        if not callable(step):
            raise CSAInputError(f"compose step {i} is not callable: {step!r}")
    return Chain(tuple(steps))
