"""Files the notebooks write (result tables, figures), written atomically.

A notebook interrupted while it writes never leaves a half-written table or image under the final
name: :func:`save_table` and :func:`save_figure` render into memory and move the bytes into place
with :func:`csa.fileio.atomic_write`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from csa.fileio import atomic_write

__all__ = ["save_table", "save_figure"]


def save_table(table: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame to ``path`` as CSV (no index) atomically; return the path."""
    path = Path(path)
    with atomic_write(path, "w") as f:
        table.to_csv(f, index=False)
    return path


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure to ``path`` (format from the suffix) atomically; return the path."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=savefig_kwargs.pop("format", path.suffix.lstrip(".") or "png"), **savefig_kwargs)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())
    return path
