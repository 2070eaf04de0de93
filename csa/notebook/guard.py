"""Parameter checking for the papermill notebooks.

Papermill injects ``-p name value`` pairs as a cell after the one tagged ``parameters`` and only warns
about names the notebook does not know. The notebooks here fail fast instead::

    guard = ParameterGuard(globals())          # first code cell, before the parameters cell
    ...                                        # the `parameters` cell (papermill injects after it)
    guard.check(globals(), epochs=int, device=("auto", "cpu", "cuda"))

``check`` raises :class:`csa.validation.CSAInputError` naming every unknown parameter (with the closest
known name) and every value of the wrong type or outside its choices.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Mapping
from typing import Any

from csa.validation import CSAInputError

Rule = type | tuple | Callable[[Any], bool] | None

__all__ = ["ParameterGuard", "parse_pairs", "parse_names", "positive_int", "at_least", "MIN_BOOTSTRAP",
           "check_training_parameters"]


class ParameterGuard:
    """Remembers the names that existed before the parameters cell ran."""

    def __init__(self, namespace: Mapping[str, Any]):
        self._before = set(namespace) | {"guard"}

    def check(self, namespace: Mapping[str, Any], **rules: Rule) -> dict[str, Any]:
        """Validate the parameters; returns ``{name: value}`` of the known ones.

        A rule is a type (``int`` accepts ints; ``float`` accepts ints too; a tuple of types is
        ``isinstance``), a tuple of allowed values, a predicate, or ``None`` (any value).
        """
        new = {
            name
            for name, value in namespace.items()
            if name not in self._before and not name.startswith("_") and not isinstance(value, types.ModuleType)
        }
        problems = []
        for name in sorted(new - set(rules)):
            close = difflib.get_close_matches(name, list(rules), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown parameter {name!r}{hint}")
        for name, rule in rules.items():
            if name not in namespace:
                problems.append(f"parameter {name!r} is missing from the parameters cell")
                continue
            value = namespace[name]
            if not _accepts(rule, value):
                problems.append(f"parameter {name}={value!r} is invalid: expected {_describe(rule)}")
        if problems:
            known = ", ".join(sorted(rules))
            raise CSAInputError(
                "bad notebook parameters: " + "; ".join(problems) + f". Known parameters: {known}. "
                "Fix the `-p name value` arguments given to papermill (or the parameters cell)."
            )
        return {name: namespace[name] for name in rules}


def _accepts(rule: Rule, value: Any) -> bool:
    if rule is None:
        return True
    if rule is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(rule, type):
        return isinstance(value, rule)
    if isinstance(rule, tuple):
        if all(isinstance(r, type) for r in rule):
            return isinstance(value, rule)
        return value in rule
    return bool(rule(value))


def _describe(rule: Rule) -> str:
    if isinstance(rule, type):
        return rule.__name__
    if isinstance(rule, tuple):
        if all(isinstance(r, type) for r in rule):
            return " or ".join(r.__name__ for r in rule)
        return "one of " + ", ".join(repr(r) for r in rule)
    return getattr(rule, "__doc__", None) or getattr(rule, "__name__", "a valid value")


def parse_pairs(text: str) -> dict[str, str]:
    """``"a:x,b:y"`` -> ``{'a': 'x', 'b': 'y'}`` (the notebooks' ``dataset:checkpoint`` parameter).

    Only the first ``:`` of an item separates, so values may contain ``:``; empty items are skipped.
    """
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition(":")
        if not sep or not key or not value:
            raise CSAInputError(f"bad item {item!r} in {text!r}: write dataset:path pairs separated by commas, "
                                "e.g. 'roxford5k-mini:../runs/demo/rparis6k-mini-train/checkpoint.pth'")
        pairs[key] = value
    return pairs


def parse_names(text: str, parameter: str) -> list[str]:
    """``"a, b"`` -> ``['a', 'b']`` (a comma-separated list parameter); an empty list is refused,
    since a notebook asked to process nothing would finish without doing anything."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise CSAInputError(f"parameter {parameter}={text!r} names nothing: give at least one name "
                            f"(comma-separated)")
    return names


def positive_int(value: Any) -> bool:
    """a positive integer"""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def at_least(low: int, why: str = "") -> Callable[[Any], bool]:
    """A rule accepting integers >= ``low`` (``why`` is added to the error's description)."""
    def rule(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    rule.__doc__ = f"an integer >= {low}" + (f" ({why})" if why else "")
    return rule


#: Fewest bootstrap resamples a notebook accepts: below it a 95% percentile interval rests on a handful of
#: draws and may not even contain its own estimate.
MIN_BOOTSTRAP = 100


def check_training_parameters(data_root: str, trainsets: str, recipe: str, overrides: str) -> None:
    """Notebook 2's parameters, checked the way ``csa train`` checks its flags, before any training.

    Every name in ``trainsets`` must have its annotation under ``data_root``; ``overrides`` must be
    ``name=value`` pairs of training options other than the recipe (set with ``recipe``), and the
    resulting configuration must pass :meth:`csa.training.config.TrainConfig.check`.
    """
    from csa.data.layout import clusters_path
    from csa.training.config import TrainConfig, parse_overrides
    from csa.training.recipes import DEMO_SELECTED

    names = parse_names(trainsets, "trainsets")
    missing = [n for n in names if not clusters_path(data_root, n).is_file()]
    if missing:
        folder = clusters_path(data_root, "x").parent
        known = sorted(p.stem for p in folder.glob("*.pkl")) if folder.is_dir() else []
        raise CSAInputError(f"parameter trainsets names {missing}, which have no annotation in {folder}; known "
                            f"training sets there: {known or 'none (build or download the data first)'}")
    changed = parse_overrides(overrides)
    if "recipe" in changed:
        raise CSAInputError(f"overrides={overrides!r} sets the recipe, which overrides cannot change; set the "
                            f"recipe parameter instead (e.g. recipe=\"{changed['recipe']}\")")
    for name in names:
        chosen = DEMO_SELECTED[name]["recipe"] if recipe == "selected" and name in DEMO_SELECTED else recipe
        if chosen == "selected":
            raise CSAInputError(f"recipe='selected' has no chosen recipe for {name!r} (only for "
                                f"{sorted(DEMO_SELECTED)}); name a recipe")
        TrainConfig.from_recipe(chosen, **changed, data_root=data_root, trainset=name).check()
