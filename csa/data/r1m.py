"""R1M distractor descriptors: simulate, save/load as memory-mapped ``.npy``, append to a database.

The revisitop 1M distractor set adds 1,001,001 images to the Oxford / Paris databases. Its
descriptors (about 1M x 2048) take 8 GB in float32 and 4 GB in float16, so they live on disk as a
``.npy`` file that is memory-mapped, and the database is extended by a *view*
(:class:`StackedDescriptors`) that reads rows from the test database and then from the distractors
without ever copying them into one array. :func:`csa.largescale.evaluate_large` reads such views
chunk by chunk.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from csa.fileio import disk_full_error, is_disk_full
from csa.arrays import as_cpu_tensor
from csa.validation import CSAInputError

__all__ = [
    "StackedDescriptors",
    "append_distractors",
    "load_distractors",
    "save_distractors",
    "simulate_distractors",
]

#: Rows generated from one random stream: the output of :func:`simulate_distractors` depends on
#: ``seed`` only, never on ``chunk``.
_BLOCK_ROWS = 4096
_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


def _storage_dtype(dtype: Any) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise CSAInputError(f"dtype must be 'float16' or 'float32', got {dtype!r}") from e
    if dt.name not in _STORAGE_DTYPES:
        raise CSAInputError(f"dtype must be 'float16' or 'float32' (descriptor storage), got {dt.name!r}")
    return dt


def simulate_distractors(n: int, d: int, seed: int = 0, dtype: Any = np.float32, chunk: int = 16384,
                         path: str | os.PathLike | None = None, progress: bool = True) -> np.ndarray:
    """Random L2-normalized rows standing in for distractor descriptors, shape ``(n, d)``.

    Rows are Gaussian directions (uniform on the sphere), generated block by block from
    ``numpy.random.SeedSequence([seed, block])`` so the result depends on ``seed`` alone.
    With ``path`` the rows are written into a ``.npy`` file chunk by chunk (``chunk`` rows at a
    time; peak memory about ``chunk * d * 8`` bytes) and a read-only memory map of it is returned;
    the file appears only once complete. Without ``path`` an in-memory array is returned.
    """
    if int(n) < 0 or int(d) < 1:
        raise CSAInputError(f"need n >= 0 rows and d >= 1 dimensions, got n={n}, d={d}")
    if int(chunk) < 1:
        raise CSAInputError(f"chunk must be a positive number of rows, got {chunk}")
    n, d = int(n), int(d)
    dt = _storage_dtype(dtype)
    chunk = max(_BLOCK_ROWS, (int(chunk) // _BLOCK_ROWS) * _BLOCK_ROWS)

    def fill(out: np.ndarray) -> None:
        bar = tqdm(total=n, desc="simulate distractors", unit="row", disable=not progress)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = np.empty((stop - start, d), dtype=np.float32)
            for b0 in range(start, stop, _BLOCK_ROWS):
                b1 = min(b0 + _BLOCK_ROWS, stop)
                rng = np.random.default_rng(np.random.SeedSequence([int(seed), b0 // _BLOCK_ROWS]))
                block[b0 - start:b1 - start] = rng.standard_normal((b1 - b0, d), dtype=np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block
            bar.update(stop - start)
        bar.close()

    if path is None:
        arr = np.empty((n, d), dtype=dt)
        fill(arr)
        return arr
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _memmap_written(path, dt, (n, d)) as mm:
        fill(mm)
    return np.load(path, mmap_mode="r")


def _reserve_blocks(path: Path) -> None:
    """Allocate every block of ``path`` now (a full disk raises ENOSPC here); a no-op where unsupported."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "rb+") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise


@contextlib.contextmanager
def _memmap_written(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """A writable ``.npy`` memory map at ``.<name>.partial``, moved onto ``path`` when the body succeeds.

    The file's blocks are reserved before any row is written (``posix_fallocate``), so a full disk
    raises :class:`csa.fileio.DiskFullError` up front instead of a bus error inside the mapping; on
    any failure the partial file is removed and ``path`` is left untouched.
    """
    tmp = path.with_name(f".{path.name}.partial")   # a killed run's partial file is overwritten here
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        _reserve_blocks(tmp)
        yield mm
        mm.flush()
        del mm
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise


def save_distractors(vecs: Any, path: str | os.PathLike, dtype: Any = "float32", chunk: int = 65536) -> Path:
    """Write descriptors ``(n, d)`` to a ``.npy`` file atomically, converted to ``dtype`` chunk by chunk.

    ``vecs`` may be a numpy array / memmap, a torch tensor or a :class:`StackedDescriptors`.
    Returns the path written.
    """
    dt = _storage_dtype(dtype)
    shape = tuple(vecs.shape)
    if len(shape) != 2:
        raise CSAInputError(f"distractor descriptors must be 2-D (n, d), got shape {shape}")
    path = Path(path)
    if path.suffix != ".npy":
        raise CSAInputError(f"distractors are stored as .npy files (memory-mappable); got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _memmap_written(path, dt, shape) as mm:
        for start in range(0, shape[0], chunk):
            mm[start:start + chunk] = _rows_numpy(vecs, start, min(start + chunk, shape[0]))
    return path


def load_distractors(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """Load distractor descriptors from a ``.npy`` file (read-only memory map by default)."""
    path = Path(path)
    if not path.is_file():
        raise CSAInputError(f"distractor file {str(path)!r} does not exist; create it with "
                            f"csa.data.r1m.save_distractors or simulate_distractors(path=...)")
    if path.suffix != ".npy":
        raise CSAInputError(f"distractor file {str(path)!r} is not a .npy file; distractors are read from one (n, d) "
                            f".npy array (write it with csa.data.r1m.save_distractors)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise CSAInputError(f"{str(path)!r} is not a valid .npy descriptor file ({e}); "
                            f"it may be truncated: delete it and write it again") from e
    if not isinstance(arr, np.ndarray):
        raise CSAInputError(f"{str(path)!r} is not a single .npy array (it reads as {type(arr).__name__}); write the "
                            f"distractors with csa.data.r1m.save_distractors")
    if arr.ndim != 2 or arr.dtype.name not in _STORAGE_DTYPES:
        raise CSAInputError(f"{str(path)!r} holds an array of shape {arr.shape} and dtype {arr.dtype}; "
                            f"expected (n, d) float16 or float32 descriptors")
    return arr


def _rows_numpy(x: Any, start: int, stop: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x[start:stop].detach().cpu().numpy()
    return np.asarray(x[start:stop])


def _copy_rows(out: np.ndarray, rows: Any) -> None:
    """``out[:] = rows`` for a contiguous ``out``, converted by torch: about 5x faster than numpy's float16 ->
    float32 cast, which would dominate reading a memory-mapped float16 database."""
    torch.from_numpy(out).copy_(as_cpu_tensor(rows))


class StackedDescriptors:
    """Read-only row-wise concatenation of descriptor arrays (no copy).

    ``view[a:b]`` returns the rows ``a..b-1`` and ``view[rows]`` (1-D integer indices) the listed rows,
    as one numpy array of ``dtype`` (only those rows are read); :meth:`read_into` fills a caller's
    buffer instead. ``len``, ``shape`` and ``dtype`` behave like an array's. Parts may be numpy
    arrays, memory maps or torch tensors.
    """

    def __init__(self, parts: Sequence[Any], dtype: Any = np.float32):
        if not parts:
            raise CSAInputError("StackedDescriptors needs at least one descriptor array")
        dims = {tuple(p.shape)[1] if len(tuple(p.shape)) == 2 else None for p in parts}
        if None in dims:
            raise CSAInputError(f"every part must be 2-D (n, d); got shapes {[tuple(p.shape) for p in parts]}")
        if len(dims) != 1:
            raise CSAInputError(f"parts have different descriptor dimensions {sorted(dims)}; "
                                f"distractors must come from the same network as the database")
        self.parts = list(parts)
        self.dtype = _storage_dtype(dtype)
        self.offsets = np.cumsum([0] + [int(p.shape[0]) for p in parts])
        self.shape = (int(self.offsets[-1]), dims.pop())
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: Any) -> np.ndarray:
        if isinstance(item, slice):
            start, stop, step = item.indices(self.shape[0])
            if step != 1:
                raise CSAInputError("StackedDescriptors supports contiguous row slices only (step 1)")
            stop = max(stop, start)
            out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
            self.read_into(start, stop, out)
            return out
        rows = np.asarray(item)
        if rows.ndim == 1 and (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
            return self.take(rows)
        raise CSAInputError("StackedDescriptors supports row slices (view[a:b]) and 1-D integer row indices "
                            "(view[rows]) only")

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Write rows ``start..stop-1`` into ``out`` (``stop - start`` rows; any float dtype, converted on the way).

        Lets a reader reuse one buffer for every chunk instead of a fresh array per slice.
        """
        if not 0 <= start <= stop <= self.shape[0] or out.shape != (stop - start, self.shape[1]):
            raise CSAInputError(f"read_into({start}, {stop}) needs 0 <= start <= stop <= {self.shape[0]} and out of "
                                f"shape ({stop - start}, {self.shape[1]}), got {out.shape}")
        for p, (lo, hi) in zip(self.parts, zip(self.offsets[:-1], self.offsets[1:])):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                _copy_rows(out[a - start:b - start], p[a - lo:b - lo])

    def take(self, rows: Any) -> np.ndarray:
        """The rows at the integer indices ``rows`` (any order, repeats allowed) as one ``dtype`` array;
        only those rows are read (a memory map reads just their pages)."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise CSAInputError(f"row indices from {rows.min()} to {rows.max()} are outside [0, {self.shape[0] - 1}]")
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, p in enumerate(self.parts):
            sel = np.flatnonzero(part == i)
            if sel.size:
                local = rows[sel] - self.offsets[i]
                out[sel] = p[torch.from_numpy(local)].detach().cpu().numpy() if isinstance(p, torch.Tensor) else p[local]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(view)``: every row in one in-memory array (8 GB for R1M in float32)."""
        out = self[0:self.shape[0]]
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"StackedDescriptors(shape={self.shape}, dtype={self.dtype.name}, parts={len(self.parts)})"


def append_distractors(db: Any, distractors: Any, dtype: Any = "float32",
                       out: str | os.PathLike | None = None) -> StackedDescriptors | np.ndarray:
    """Database rows followed by distractor rows (indices of ``db`` are unchanged).

    ``distractors`` is an array or the path of a ``.npy`` file (memory-mapped, never loaded whole).
    Without ``out`` a :class:`StackedDescriptors` view is returned (rows read on demand, cast to
    ``dtype``). With ``out`` (a ``.npy`` path) the concatenation is written there chunk by chunk in
    ``dtype`` and returned as a read-only memory map.
    """
    if isinstance(distractors, (str, os.PathLike)):
        distractors = load_distractors(distractors, mmap=True)
    view = StackedDescriptors([db, distractors], dtype=dtype)
    if out is None:
        return view
    save_distractors(view, out, dtype=dtype)
    return np.load(out, mmap_mode="r")
