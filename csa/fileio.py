"""File helpers: atomic writes, output-location checks, safe pickles and content fingerprints.

Every file the project writes goes through :func:`atomic_write`: the data is written to a temporary
file in the destination folder and moved into place with :func:`os.replace`, so a crash or an
interrupted run never leaves a half-written file behind (a killed process may leave its temporary
``.<name>.<random>.tmp``; :func:`remove_stale_temporaries` clears them when the next run starts).
Commands check their output locations with :func:`check_output_dir` / :func:`check_output_file`
before any long work starts.  Result tables and figures go through :func:`save_table` and
:func:`save_figure`, which render into memory first, so an interrupted write never leaves a half-written
CSV or image under the final name.

Every ``.pkl`` the package reads goes through :func:`load_pickle`, a restricted unpickler that
builds only builtin containers and scalars (dict, list, tuple, set, str, bytes, int, float, bool,
None) and numpy arrays, dtypes and scalars: a pickle naming any other class or function (the way a
malicious pickle runs code) is refused with :class:`PickleRefused` before anything is called.
"""
from __future__ import annotations

import builtins
import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from csa.validation import CSAError, CSAInputError

__all__ = ["atomic_write", "load_pickle", "save_pickle", "fingerprint", "sha256_file", "PickleRefused",
           "SAFE_PICKLE_GLOBALS", "check_output_dir", "check_output_file", "remove_stale_temporaries",
           "save_table", "save_figure", "DiskFullError", "is_disk_full", "disk_full_error",
           "DISK_FULL_ERRNOS", "MANIFEST_NAME", "read_manifest", "check_manifest_digest"]


#: errno values that mean "no room for these bytes": a full disk, a file-size limit (``ulimit -f``), a quota.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: A short write reported without an errno (numpy's ``tofile``: "N requested and M written").
_SHORT_WRITE = re.compile(r"requested and \d+ written|No space left|File too large|Disk quota exceeded")


class DiskFullError(CSAError, OSError):
    """A file could not be written completely: the disk is full or a file-size limit was reached."""


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an exception it was raised from/during is a full disk or a short write.

    Follows ``__cause__`` / ``__context__``, so a library error that wraps the write failure
    (``torch.save``: "enforce fail at inline_container.cc") is recognised too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return True
        if isinstance(exc, OSError) and (exc.errno in DISK_FULL_ERRNOS or (exc.errno is None and
                                                                          _SHORT_WRITE.search(str(exc)))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | os.PathLike, detail: str = "") -> DiskFullError:
    """The one error a full disk gives: which file, why, and what to do."""
    return DiskFullError(f"the disk is full (or a file-size limit was reached) while writing {os.fspath(path)}"
                         f"{f' ({detail})' if detail else ''}; nothing was installed there (an earlier file is "
                         f"kept); free space or choose another location and run again")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success move it onto ``path`` atomically and durably.

    On success every byte is flushed and fsynced, the file's size on disk is checked against the
    bytes written, and the folder entry is synced after the rename.  If the body raises, the temporary
    file is removed and ``path`` is left untouched; a full disk or file-size limit (ENOSPC, EFBIG,
    EDQUOT, a short write) raises :class:`DiskFullError` naming ``path``.
    ``mode`` must be a write mode ('w', 'wb', 'wt').
    """
    if "w" not in mode or any(c in mode for c in "ra+x"):
        raise ValueError(f"atomic_write needs a plain write mode ('w' or 'wb'), got {mode!r}")
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        f = os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding=encoding or "utf-8")
        with f:
            yield f
            _flush_verified(f, path)
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not isinstance(exc, DiskFullError) and is_disk_full(exc):
            raise disk_full_error(path, f"{type(exc).__name__}: {str(exc)[:120]}") from exc
        raise


def _make_parent(path: Path) -> None:
    """Create ``path``'s folder; a file standing where a folder is needed is a :class:`CSAInputError`."""
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise CSAInputError(f"cannot write {path}: {parent} is a file, not a folder; choose another path "
                                    f"or move that file")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def _flush_verified(f: IO, path: Path) -> None:
    """Flush and fsync ``f``; raise :class:`DiskFullError` when fewer bytes reached the file than were written."""
    f.flush()
    os.fsync(f.fileno())
    written = f.buffer.tell() if hasattr(f, "buffer") else f.tell()
    on_disk = os.fstat(f.fileno()).st_size
    if on_disk < written:
        raise disk_full_error(path, f"{on_disk} of {written} bytes reached the file")


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename into it survives a power loss (best effort: some file systems refuse)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Temporary files the package creates: :func:`atomic_write`'s ``.<final name>.<8 random characters>.tmp``
#: and the memory maps of ``csa.data.r1m`` (``.<final name>.partial``).
_TEMPORARY = re.compile(r"^\..+\.(?:[A-Za-z0-9_]{8}\.tmp|partial)$")


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``; return them.

    With ``name``, only the temporaries of the file ``folder/name``.  Call it when a run that owns
    ``folder`` (or that file) starts (no other writer may be active there).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if name is not None and not entry.name.startswith(f".{name}."):
            continue
        if entry.is_file() and _TEMPORARY.match(entry.name):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Make sure ``path`` is (or can be created as) a folder this process can write into; return it.

    Called before long work starts, so that a bad location fails in seconds, not after the work.
    ``what`` names the location in the error (e.g. ``'--output-dir'``).  The folder is created.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CSAInputError(f"{what} {path} is a file, not a folder; give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".csa-write-check.", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CSAInputError(f"{what} {path} cannot be written ({exc.strerror or exc}); choose a writable "
                            f"location") from exc
    return path


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Make sure a file can be written at ``path`` (not a folder, parent writable); return it.

    Temporaries an interrupted earlier write of this file left behind are removed.
    """
    path = Path(path)
    if path.is_dir():
        raise CSAInputError(f"{what} {path} is a folder; give a file path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CSAInputError(f"{what} {path}: {parent} is a file, not a folder; choose another path")
            break
    check_output_dir(path.parent, f"the folder of {what}")
    remove_stale_temporaries(path.parent, path.name)
    return path


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


def save_pickle(obj: Any, path: str | os.PathLike) -> None:
    """Pickle ``obj`` to ``path`` atomically (highest protocol)."""
    with atomic_write(path, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


class PickleRefused(CSAInputError, pickle.UnpicklingError):
    """A pickle names a class or function outside :data:`SAFE_PICKLE_GLOBALS`."""


def _numpy_globals() -> dict[tuple[str, str], Any]:
    core = np._core if hasattr(np, "_core") else np.core
    found = {}
    for module in ("numpy.core", "numpy._core"):
        found[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        found[(f"{module}.multiarray", "scalar")] = core.multiarray.scalar
        found[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    found[("numpy", "ndarray")] = np.ndarray
    found[("numpy", "dtype")] = np.dtype
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:  # numpy >= 1.25 pickles dtypes of numbers and strings by their class
        for name in dir(dtypes):
            if name.endswith("DType") and name != "ObjectDType":
                found[("numpy.dtypes", name)] = getattr(dtypes, name)
    return found


#: Every global a pickle read by :func:`load_pickle` may name: (module, name) -> object.
SAFE_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    **{("builtins", n): getattr(builtins, n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes",
                                                       "bytearray", "int", "float", "complex", "bool", "slice")},
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): __import__("codecs").encode,  # bytes inside protocol-2 pickles of numpy arrays
    **_numpy_globals(),
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        try:
            return SAFE_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise PickleRefused(f"it names {module}.{name}, which is not a builtin container, number or string "
                                f"or a numpy array") from None


def load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle file with the restricted unpickler (see the module docstring).

    Raises :class:`PickleRefused` (a :class:`CSAInputError`) naming the file when the pickle asks
    for anything else; other read errors (truncated or foreign file) propagate.
    """
    with open(path, "rb") as f:
        try:
            return _SafeUnpickler(f, encoding="latin1").load()
        except PickleRefused as exc:
            raise PickleRefused(f"refused to load {os.fspath(path)}: {exc}; only plain data pickles are read "
                                f"(a pickle that names other objects can run code)") from None


#: Name of the file that records the sha256 of the files in its folder (released weights).
MANIFEST_NAME = "manifest.json"


def read_manifest(folder: str | os.PathLike, only: str | None = None) -> dict[str, dict]:
    """The ``manifest.json`` of ``folder`` as ``{file name: {'sha256': hex, ...}}`` ({} when there is none).

    A manifest that is not valid JSON, not an object of objects, or has an entry without a sha256
    raises one :class:`CSAInputError` naming it.  With ``only``, just that file's entry is checked
    and returned (entries of other files are not looked at).
    """
    path = Path(folder, MANIFEST_NAME)
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CSAInputError(f"{path} is damaged ({exc}); restore it from version control or release the "
                            f"weights again") from exc
    if not isinstance(manifest, dict):
        raise CSAInputError(f"{path} is damaged: it holds a {type(manifest).__name__}, not an object of files; "
                            f"restore it from version control or release the weights again")
    if only is not None:
        manifest = {only: manifest[only]} if only in manifest else {}
    bad = [name for name, entry in manifest.items()
           if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", "")))]
    if bad:
        raise CSAInputError(f"{path} is damaged: {bad[:3]} must each map to an object with a 64-digit 'sha256'; "
                            f"restore it from version control or release the weights again")
    return manifest


def check_manifest_digest(path: str | os.PathLike) -> None:
    """Refuse ``path`` when the ``manifest.json`` beside it lists it with another sha256.

    Nothing happens when the folder has no manifest or the manifest does not list the file.
    """
    path = Path(path)
    entry = read_manifest(path.parent, only=path.name).get(path.name)
    if entry is None:
        return
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise CSAInputError(f"{path} does not match {path.parent / MANIFEST_NAME} (sha256 {actual[:12]}... instead of "
                            f"{entry['sha256'][:12]}...): the file was replaced or damaged after it was released; "
                            f"restore it (git checkout / re-download) or release it again")


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes (read in ``block``-byte pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


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
