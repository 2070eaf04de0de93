"""Tooling for the notebooks and the book: the parameter guard, the papermill batch runner, figures.

``save_table`` and ``save_figure`` (atomic result tables and figures) are :mod:`csa.fileio`'s, offered
here so a notebook imports its tools from one place.
"""
from csa.fileio import save_figure, save_table
from csa.notebook.guard import ParameterGuard, parse_names, parse_pairs, positive_int

__all__ = ["ParameterGuard", "parse_pairs", "parse_names", "positive_int", "save_table", "save_figure"]
