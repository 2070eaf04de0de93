"""File helpers: atomic writes, pickles and content fingerprints.

Every file the project writes goes through :func:`atomic_write`: the data is written to a temporary
file in the destination folder and moved into place with :func:`os.replace`, so a crash or an
interrupted run never leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

__all__ = ["atomic_write", "load_pickle", "save_pickle", "fingerprint"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success move it onto ``path`` atomically.

    If the body raises, the temporary file is removed and ``path`` is left untouched.
    ``mode`` must be a write mode ('w', 'wb', 'wt').
    """
    if "w" not in mode or any(c in mode for c in "ra+x"):
        raise ValueError(f"atomic_write needs a plain write mode ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding or "utf-8")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """Pickle ``obj`` to ``path`` atomically (highest protocol)."""
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle file (only open files you trust: pickles can run code)."""
    with open(path, "rb") as f:
        return pickle.load(f)


def fingerprint(*parts: Any) -> str:
    """sha256 hex digest of ``parts``: JSON-able values (dicts, lists, numbers, strings) and numpy arrays.

    An array contributes its shape, dtype, 64 evenly spaced rows and its float64 sum, which tells
    apart the descriptor files this project writes without hashing gigabytes.
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"array{part.shape}{part.dtype}".encode())
            h.update(np.ascontiguousarray(part[:: max(1, len(part) // 64)]).tobytes())
            h.update(np.float64(np.sum(part, dtype=np.float64)).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()
