"""Files the notebooks write (result tables, figures), written atomically.

A notebook interrupted while it writes never leaves a half-written table or image under the final
name: :func:`save_table` and :func:`save_figure` render into memory and move the bytes into place
with :func:`csa.fileio.atomic_write`.  Both live in :mod:`csa.fileio` (the training and selection code
write their tables and figures with them too); this module is their home for the notebooks.
"""
from __future__ import annotations

from csa.fileio import save_figure, save_table

__all__ = ["save_table", "save_figure"]
