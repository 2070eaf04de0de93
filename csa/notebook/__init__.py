"""Tooling for the notebooks and the book: the parameter guard, the papermill batch runner, figures."""
from csa.notebook.guard import ParameterGuard, parse_names, parse_pairs, positive_int
from csa.notebook.outputs import save_figure, save_table

__all__ = ["ParameterGuard", "parse_pairs", "parse_names", "positive_int", "save_table", "save_figure"]
