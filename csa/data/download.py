"""Download the full data of the paper: Revisited Oxford / Paris, R1M, rSfM120k and the GeM networks.

Every file comes from its official host (the revisitop and cnnimageretrieval sites of CMP Prague and
the VGG Oxford site), or from a mirror given by ``base_url`` / the ``CSA_MIRROR`` environment
variable (a flat folder holding the same file names). Files go where ``docs/ARCHITECTURE.md`` says:

==================  ==========================================================
ground truth        ``annotations/<dataset>/gnd_<dataset>.pkl``
test images         ``jpg/roxford5k/``, ``jpg/rparis6k/`` (flat, one file per image)
R1M images          ``jpg/revisitop1m/`` (archive structure kept) + ``annotations/revisitop1m/revisitop1m.txt``
rSfM120k            ``jpg/retrieval-SfM-120k/ims/`` + ``annotations/retrieval-SfM-120k.pkl``
networks            ``networks/<file>.pth``
==================  ==========================================================

Downloads go through :func:`pooch.retrieve` with :class:`ResumableHTTPDownloader`, which keeps the
bytes received so far in ``<file>.<url digest>.part`` (one part file per URL, so bytes of another
address are never continued) and asks the server for the rest (HTTP ``Range``) on the next run.
A file reaches its final path only complete and verified:

* by hash where one is published (the two ground-truth files, md5);
* otherwise by what can be checked without one: the length the server declared, and the format
  (:func:`check_format`: a ``.pkl`` unpickles with the restricted unpickler, a ``.pth`` loads with
  ``torch.load(weights_only=True)``, a ``.tar``/``.tgz``/``.tar.gz`` reads to its end, a ``.zip``
  passes its CRC test, a ``.txt`` is UTF-8 text and not an HTML page).  This covers the six
  networks, ``retrieval-SfM-120k.pkl``, the image archives and the R1M list.

Every installed file is recorded with its sha256 in ``<data_root>/downloads/manifest.json``; a
later run re-hashes a file whose size or modification time changed and refuses it if its content
no longer matches (delete it to download it again).  Archives are unpacked into a temporary folder
that is moved into place afterwards; an archive that cannot be unpacked is deleted, so the next run
downloads it again.

Command line: ``csa download roxford5k rparis6k --data-root data``
(``--list`` shows every resource; ``--mirror URL`` overrides the hosts).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pooch
from tqdm import tqdm

from csa.fileio import SAFE_PICKLE_GLOBALS, atomic_write, check_output_dir, load_pickle, sha256_file
from csa.validation import CSAError, CSAInputError

__all__ = [
    "DATASETS",
    "RESOURCES",
    "DownloadError",
    "Resource",
    "ResumableHTTPDownloader",
    "download",
    "download_dataset",
    "download_names",
    "resource_listing",
    "resource_url",
    "check_format",
    "MANIFEST",
]

MIRROR_ENV = "CSA_MIRROR"

_CNNIR = "http://cmp.felk.cvut.cz/cnnimageretrieval/data"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"


#: The record of installed files (relative to the data root).
MANIFEST = "downloads/manifest.json"


class DownloadError(CSAError, RuntimeError):
    """A download or extraction failed; the message names the URL and what to do next."""


@dataclass(frozen=True)
class Resource:
    """One downloadable file.

    ``dest`` is relative to the data root: the file itself (``kind='file'``) or the folder an archive
    is unpacked into (``kind='tar'``); ``flatten`` puts every archived file directly in ``dest``.
    ``known_hash`` is pooch's ``'md5:...'`` / ``'sha256:...'`` or ``None`` when no checksum is published.
    """

    url: str
    dest: str
    kind: str = "file"
    known_hash: str | None = None
    flatten: bool = False

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def verified_by(self) -> str:
        """``'hash'`` when a checksum is published, else the format checked (``'format:torch'``...)."""
        return "hash" if self.known_hash else f"format:{file_format(self.filename)}"


_FORMATS = ((".tar.gz", "tar"), (".tgz", "tar"), (".tar", "tar"), (".zip", "zip"), (".pth", "torch"),
            (".pt", "torch"), (".pkl", "pickle"), (".txt", "text"))


def file_format(filename: str) -> str:
    """The format a file name promises: tar, zip, torch, pickle, text (or 'bytes': nothing to check)."""
    return next((fmt for suffix, fmt in _FORMATS if filename.endswith(suffix)), "bytes")


def _torch_readable(path: Path) -> None:
    import torch
    from torch.serialization import safe_globals

    with safe_globals(list(SAFE_PICKLE_GLOBALS.values())):  # cirtorch files hold numpy arrays in their meta
        torch.load(path, map_location="cpu", weights_only=True)


def _tar_readable(path: Path) -> None:
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                with tar.extractfile(member) as f:  # reads through the compressed stream: finds truncation
                    while f.read(1 << 20):
                        pass


def _zip_readable(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} fails its CRC check")


def _text_readable(path: Path) -> None:
    head = path.read_bytes()[:4096].decode("utf-8").lstrip().lower()
    if head.startswith(("<!doctype html", "<html")):
        raise ValueError("it is an HTML page (an error page of the server?)")


_CHECKS: dict[str, Callable[[Path], object]] = {"tar": _tar_readable, "zip": _zip_readable, "torch": _torch_readable,
                                                "pickle": load_pickle, "text": _text_readable}


def check_format(path: str | os.PathLike, fmt: str) -> None:
    """Raise ``ValueError`` naming the problem unless the file at ``path`` reads completely as ``fmt``."""
    check = _CHECKS.get(fmt)
    if check is None:
        return
    try:
        check(Path(path))
    except Exception as exc:  # noqa: BLE001 - every way of not being the promised format
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "no details"
        raise ValueError(f"it is not a complete {fmt} file ({type(exc).__name__}: {text})") from exc


def _networks() -> dict[str, Resource]:
    files = {
        "gl18-tl-resnet50-gem-w": "gl18/gl18-tl-resnet50-gem-w-83fdc30.pth",
        "gl18-tl-resnet101-gem-w": "gl18/gl18-tl-resnet101-gem-w-a4d43db.pth",
        "gl18-tl-resnet152-gem-w": "gl18/gl18-tl-resnet152-gem-w-21278d5.pth",
        "rSfM120k-tl-resnet50-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth",
        "rSfM120k-tl-resnet101-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth",
        "rSfM120k-tl-resnet152-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet152-gem-w-f39cada.pth",
    }
    # The hex suffix in the names is not documented as a checksum, so no hash is asserted.
    return {name: Resource(f"{_CNNIR}/networks/{rel}", f"networks/{rel.rsplit('/', 1)[-1]}")
            for name, rel in files.items()}


#: Every downloadable resource by name.
RESOURCES: dict[str, Resource] = {
    "gnd_roxford5k": Resource(f"{_CNNIR}/test/roxford5k/gnd_roxford5k.pkl",
                              "annotations/roxford5k/gnd_roxford5k.pkl",
                              known_hash="md5:f2b67579f625a587b5b0828dbf2e8eb0"),
    "gnd_rparis6k": Resource(f"{_CNNIR}/test/rparis6k/gnd_rparis6k.pkl",
                             "annotations/rparis6k/gnd_rparis6k.pkl",
                             known_hash="md5:2feae0a8257a5c6ca1b31b8eb73c8571"),
    "oxbuild_images": Resource(f"{_VGG}/oxbuildings/oxbuild_images-v1.tgz", "jpg/roxford5k", kind="tar",
                               flatten=True),
    "paris_1": Resource(f"{_VGG}/parisbuildings/paris_1-v1.tgz", "jpg/rparis6k", kind="tar", flatten=True),
    "paris_2": Resource(f"{_VGG}/parisbuildings/paris_2-v1.tgz", "jpg/rparis6k", kind="tar", flatten=True),
    "revisitop1m_list": Resource(f"{_R1M}/revisitop1m.txt", "annotations/revisitop1m/revisitop1m.txt"),
    **{f"revisitop1m.{i}": Resource(f"{_R1M}/jpg/revisitop1m.{i}.tar.gz", "jpg/revisitop1m", kind="tar")
       for i in range(1, 101)},
    "rsfm120k_db": Resource(f"{_CNNIR}/train/dbs/retrieval-SfM-120k.pkl", "annotations/retrieval-SfM-120k.pkl"),
    "rsfm120k_ims": Resource(f"{_CNNIR}/train/ims/ims.tar.gz", "jpg/retrieval-SfM-120k/ims", kind="tar"),
    **_networks(),
}

#: Resource groups for :func:`download_dataset`.
DATASETS: dict[str, list[str]] = {
    "gnd": ["gnd_roxford5k", "gnd_rparis6k"],
    "roxford5k": ["gnd_roxford5k", "oxbuild_images"],
    "rparis6k": ["gnd_rparis6k", "paris_1", "paris_2"],
    "r1m": ["revisitop1m_list"] + [f"revisitop1m.{i}" for i in range(1, 101)],
    "rsfm120k": ["rsfm120k_db", "rsfm120k_ims"],
    "networks": list(_networks()),
}


def resource_url(name: str, base_url: str | None = None) -> str:
    """URL of resource ``name``: the official host, or ``<mirror>/<file name>`` with a mirror."""
    res = _resource(name)
    base = base_url if base_url is not None else os.environ.get(MIRROR_ENV) or None
    if base:
        _check_mirror(base)
    return f"{base.rstrip('/')}/{res.filename}" if base else res.url


def _check_mirror(base: str) -> None:
    parts = urllib.parse.urlparse(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CSAInputError(f"mirror {base!r} is not a URL; give an address such as https://host/folder "
                            f"(--mirror or {MIRROR_ENV})")


def _resource(name: str) -> Resource:
    if name not in RESOURCES:
        groups = ", ".join(DATASETS)
        raise CSAInputError(f"unknown download {name!r}; use a resource name (csa download --list) "
                            f"or download_dataset() with one of: {groups}")
    return RESOURCES[name]


class ResumableHTTPDownloader:
    """A pooch downloader that resumes interrupted HTTP(S) downloads.

    Bytes are appended to ``part_path``; a later call sends ``Range: bytes=<size>-`` and continues
    (a server that ignores ranges answers 200 and the file starts over). Once the server has sent
    everything it announced, ``check`` (if given) must accept the part file (else it is deleted and
    :class:`DownloadError` raised); then it is moved onto pooch's temporary output file, which pooch
    hash-checks (when a hash is known) and moves into place.
    """

    def __init__(self, part_path: str | os.PathLike, progress: bool = True, timeout: float = 60.0,
                 block_size: int = 1 << 20, check: Callable[[Path], None] | None = None):
        self.part_path = Path(part_path)
        self.progress = progress
        self.timeout = timeout
        self.block_size = block_size
        self.check = check

    def __call__(self, url: str, output_file: str, pooch_obj: object = None, check_only: bool = False) -> bool | None:
        if check_only:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=self.timeout):
                    return True
            except (OSError, http.client.HTTPException):
                return False
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        have = self.part_path.stat().st_size if self.part_path.exists() else 0
        try:
            resp = self._open(url, have)
            if have and resp.status != 206:  # range ignored: start again
                have = 0
            elif have:
                content_range = resp.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {have}-"):
                    resp.close()
                    raise DownloadError(f"{url}: the server resumed at the wrong offset ({content_range!r}); "
                                        f"delete {self.part_path} and re-run to download from the start")
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with resp, open(self.part_path, "ab" if have else "wb") as out, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=self.part_path.name[:-len(".part")], disable=not self.progress) as bar:
                while True:
                    block = resp.read(self.block_size)
                    if not block:
                        break
                    out.write(block)
                    bar.update(len(block))
        except urllib.error.HTTPError as e:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the address (or your mirror, "
                                f"{MIRROR_ENV}) and your network, then re-run") from e
        except (OSError, http.client.HTTPException, ValueError) as e:  # ValueError: a malformed address
            got = self._size()
            then = f"the download resumes from {self.part_path}" if got else "nothing was saved"
            raise DownloadError(f"{url}: the connection failed after {got} bytes ({e!r}); check the "
                                f"network (or the mirror, {MIRROR_ENV}) and re-run: {then}") from e
        size = self._size()
        if total is not None and size != total:
            raise DownloadError(f"{url}: received {size} of {total} bytes; re-run to resume from "
                                f"{self.part_path} (delete it to start over)")
        if self.check is not None:
            try:
                self.check(self.part_path)
            except ValueError as e:
                self.part_path.unlink(missing_ok=True)
                raise DownloadError(f"{url}: the downloaded file was refused and deleted: {e}; re-run to download "
                                    f"it again, and if it keeps failing check the address (or the mirror, "
                                    f"{MIRROR_ENV})") from e
        os.replace(self.part_path, output_file)
        return None

    def _size(self) -> int:
        return self.part_path.stat().st_size if self.part_path.exists() else 0

    def _open(self, url: str, have: int) -> http.client.HTTPResponse:
        headers = {"User-Agent": "csa-rerank-downloader", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the part file is not a prefix of what the server has
                self.part_path.unlink(missing_ok=True)
                return self._open(url, 0)
            raise


def part_path(path: Path, url: str) -> Path:
    """Where the bytes of ``url`` bound for ``path`` collect: ``<name>.<12 hex digits of the URL>.part``."""
    return path.with_name(f"{path.name}.{hashlib.sha256(url.encode()).hexdigest()[:12]}.part")


def _fetch(url: str, known_hash: str | None, path: Path, progress: bool, fmt: str) -> Path:
    """Download ``url`` to ``path`` (resumable; hash-checked, or format-checked without a hash); return it."""
    part = part_path(path, url)
    check = None if known_hash else (lambda p: check_format(p, fmt))
    downloader = ResumableHTTPDownloader(part, progress=progress, check=check)
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return Path(pooch.retrieve(url, known_hash, fname=path.name, path=path.parent, downloader=downloader))
    except ValueError as e:  # pooch: hash mismatch (its temporary file is already removed)
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the downloaded file does not match its known hash {known_hash} and was "
                            f"deleted ({e}); re-run to download it again; if it keeps failing the file at this "
                            f"address changed: use a mirror with {MIRROR_ENV} or report it") from e
    finally:
        logger.setLevel(level)


def _read_manifest(root: Path) -> dict[str, dict]:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"{path} is damaged ({e}); delete it (installed files are then re-recorded)") from e


def _record(root: Path, path: Path, url: str, verified_by: str) -> None:
    """Write ``path``'s sha256, size and modification time into the manifest."""
    manifest = _read_manifest(root)
    stat = path.stat()
    manifest[path.relative_to(root).as_posix()] = {"url": url, "sha256": sha256_file(path), "size": stat.st_size,
                                                   "mtime_ns": stat.st_mtime_ns, "verified": verified_by}
    with atomic_write(root / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _check_unchanged(root: Path, path: Path) -> bool:
    """True when ``path`` is recorded and unchanged; False when it is not recorded; raise when it changed."""
    entry = _read_manifest(root).get(path.relative_to(root).as_posix())
    if entry is None:
        return False
    stat = path.stat()
    if stat.st_size == entry["size"] and stat.st_mtime_ns == entry["mtime_ns"]:
        return True
    if stat.st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
        return True
    raise DownloadError(f"{path} changed since it was installed from {entry['url']} (its sha256 no longer matches "
                        f"{MANIFEST}); delete it and re-run to download it again")


def _install(root: Path, url: str, res: Resource, path: Path, progress: bool) -> Path:
    """Download ``url`` to ``path`` unless it is already there, unchanged; record it in the manifest."""
    if path.is_file() and _check_unchanged(root, path):
        return path
    present = path.is_file()
    out = _fetch(url, res.known_hash, path, progress, file_format(res.filename))
    if present and not res.known_hash:  # found on disk, not recorded: check it once before trusting it
        try:
            check_format(out, file_format(res.filename))
        except ValueError as e:
            raise DownloadError(f"{out} (not downloaded by this run) is refused: {e}; delete it and re-run to "
                                f"download it again") from e
    _record(root, out, url, res.verified_by)
    return out


def _merge_into(src: Path, dst: Path) -> None:
    """Move the contents of folder ``src`` into ``dst`` (merging sub-folders, replacing files)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _merge_into(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)


def _extract(archive: Path, dest: Path, flatten: bool, url: str) -> None:
    tmp = dest.parent / f".{dest.name}.{archive.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if flatten:
            flat = dest.parent / f".{dest.name}.{archive.name}.flat"
            shutil.rmtree(flat, ignore_errors=True)
            flat.mkdir()
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                os.replace(f, flat / f.name)
            shutil.rmtree(tmp)
            tmp = flat
        _merge_into(tmp, dest)
    except (tarfile.TarError, EOFError, OSError) as e:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{url}: could not unpack {archive} ({e!r}); it was deleted: re-run to download "
                            f"it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, data_root: str | os.PathLike, progress: bool = True, base_url: str | None = None,
             keep_archive: bool = False) -> Path:
    """Download resource ``name`` (see :data:`RESOURCES`) into ``data_root``; return its final path.

    Already-present files (hash-verified where known, else checked against the manifest) and
    already-unpacked archives are skipped.  Archives are fetched to ``<data_root>/downloads/``,
    unpacked, then deleted unless ``keep_archive``.  Raises :class:`DownloadError` (naming the URL
    and the next step) on any failure; nothing incomplete is left at the final path.
    """
    res = _resource(name)
    root = Path(data_root)
    url = resource_url(name, base_url)
    check_output_dir(root, "--data-root")
    if res.kind == "file":
        return _install(root, url, res, root / res.dest, progress)
    dest = root / res.dest
    marker = dest / f".{res.filename}.complete"
    if marker.exists():
        return dest
    archive = _install(root, url, res, root / "downloads" / res.filename, progress)
    _extract(archive, dest, res.flatten, url)
    with atomic_write(marker, "w") as f:
        f.write(url + "\n")
    if not keep_archive:
        archive.unlink()
    return dest


def download_dataset(dataset: str, data_root: str | os.PathLike, progress: bool = True,
                     base_url: str | None = None, keep_archive: bool = False) -> list[Path]:
    """Download every resource of ``dataset`` ('gnd', 'roxford5k', 'rparis6k', 'r1m', 'rsfm120k', 'networks')."""
    if dataset not in DATASETS:
        raise CSAInputError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    return [download(n, data_root, progress=progress, base_url=base_url, keep_archive=keep_archive)
            for n in DATASETS[dataset]]


def resource_listing() -> str:
    """The datasets and resources ``csa download --list`` prints: each dataset's resources, then each resource's
    address, destination and how it is verified."""
    lines = []
    for ds, names in DATASETS.items():
        lines.append(f"{ds}: {', '.join(names) if len(names) < 8 else names[0] + ', ... (' + str(len(names)) + ')'}")
    for n, r in RESOURCES.items():
        if n.startswith("revisitop1m.") and n != "revisitop1m.1":
            continue
        label = "revisitop1m.1 .. revisitop1m.100" if n == "revisitop1m.1" else n
        lines.append(f"  {label:34s} {r.url} -> {r.dest}  [{r.verified_by}]")
    return "\n".join(lines)


def download_names(names: Sequence[str], data_root: str | os.PathLike, progress: bool = True,
                   base_url: str | None = None, keep_archive: bool = False,
                   echo: Callable[[Path], None] | None = None) -> list[Path]:
    """Download every dataset or resource in ``names`` (``csa download NAME ...``); return the installed paths.

    Every name and the mirror are checked before the first download starts; ``echo`` is called with each
    installed path as soon as its dataset or resource is done.
    """
    if base_url is not None:
        _check_mirror(base_url)
    unknown = [n for n in names if n not in DATASETS and n not in RESOURCES]
    if unknown:
        _resource(unknown[0])
    kw = dict(progress=progress, base_url=base_url, keep_archive=keep_archive)
    paths: list[Path] = []
    for n in names:
        got = download_dataset(n, data_root, **kw) if n in DATASETS else [download(n, data_root, **kw)]
        for path in got if echo is not None else ():
            echo(path)
        paths.extend(got)
    return paths
