"""Chains of re-rankers, e.g. αDBA then αQE, or αQE then CSA."""
from __future__ import annotations

from typing import Any, Callable

import torch

from csa.compare.inputs import Ranker, baseline_inputs, describe, search_again
from csa.compare.augmentation import AugmentDatabase
from csa.arrays import same_kind
from csa.validation import CSAInputError, check_rows

__all__ = ["compose", "Chain"]


class Chain:
    """Re-rankers applied in order; :class:`AugmentDatabase` steps replace the database for what follows.

    :meth:`offline` runs the leading database augmentation once (the part αDBA does before any query
    arrives) and returns the per-query remainder, so its cost can be reported apart.
    """

    def __init__(self, steps: tuple[Ranker | AugmentDatabase, ...], database: Any = None) -> None:
        self.steps, self.database = steps, database
        self.__name__ = " + ".join(describe(s) for s in steps)

    def __call__(self, qvecs: Any, dbvecs: Any, ranks: Any) -> Any:
        if self.database is not None:
            dbvecs = self.database
            q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
            ranks = same_kind(search_again(q, db, depth=r.shape[0]), ranks)
        for step in self.steps:
            if isinstance(step, AugmentDatabase):
                q, db, r = baseline_inputs(qvecs, dbvecs, ranks)
                augmented = step(db)  # the checked (renormalized if needed) rows, float32 on the CPU
                ranks = same_kind(search_again(q, augmented, depth=r.shape[0]), ranks)
                dbvecs = augmented if isinstance(dbvecs, torch.Tensor) else augmented.numpy()
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
        dbvecs = check_rows(dbvecs, "dbvecs")
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
