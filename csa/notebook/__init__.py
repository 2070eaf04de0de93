"""Tooling for the notebooks and the book: the parameter guard, the papermill batch runner, figures."""
from csa.notebook.guard import ParameterGuard, parse_pairs

__all__ = ["ParameterGuard", "parse_pairs"]
