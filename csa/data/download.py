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
bytes received so far in ``<file>.part`` and asks the server for the rest (HTTP ``Range``) on the
next run. A file reaches its final path only complete and, where its hash is known, verified;
archives are unpacked into a temporary folder that is moved into place afterwards.

Command line: ``csa download roxford5k rparis6k --data-root data``
(``--list`` shows every resource; ``--mirror URL`` overrides the hosts).
"""
from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pooch
from tqdm import tqdm

from csa.validation import CSAInputError

__all__ = [
    "DATASETS",
    "RESOURCES",
    "DownloadError",
    "Resource",
    "ResumableHTTPDownloader",
    "download",
    "download_dataset",
    "main",
    "resource_url",
]

MIRROR_ENV = "CSA_MIRROR"

_CNNIR = "http://cmp.felk.cvut.cz/cnnimageretrieval/data"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"
_VGG = "https://www.robots.ox.ac.uk/~vgg/data"


class DownloadError(RuntimeError):
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
    return f"{base.rstrip('/')}/{res.filename}" if base else res.url


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
    everything it announced, the part file is moved onto pooch's temporary output file, which pooch
    then hash-checks and moves into place.
    """

    def __init__(self, part_path: str | os.PathLike, progress: bool = True, timeout: float = 60.0,
                 block_size: int = 1 << 20):
        self.part_path = Path(part_path)
        self.progress = progress
        self.timeout = timeout
        self.block_size = block_size

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
        except (OSError, http.client.HTTPException) as e:
            got = self._size()
            then = f"the download resumes from {self.part_path}" if got else "nothing was saved"
            raise DownloadError(f"{url}: the connection failed after {got} bytes ({e!r}); check the "
                                f"network (or the mirror, {MIRROR_ENV}) and re-run: {then}") from e
        size = self._size()
        if total is not None and size != total:
            raise DownloadError(f"{url}: received {size} of {total} bytes; re-run to resume from "
                                f"{self.part_path} (delete it to start over)")
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


def _fetch(url: str, known_hash: str | None, path: Path, progress: bool) -> Path:
    """Download ``url`` to ``path`` (resumable, hash-checked); return ``path``."""
    part = path.with_name(path.name + ".part")
    downloader = ResumableHTTPDownloader(part, progress=progress)
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
        raise DownloadError(f"{url}: could not unpack {archive} ({e!r}); delete {archive} and re-run "
                            f"to download it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(name: str, data_root: str | os.PathLike, progress: bool = True, base_url: str | None = None,
             keep_archive: bool = False) -> Path:
    """Download resource ``name`` (see :data:`RESOURCES`) into ``data_root``; return its final path.

    Already-present files (hash-verified where known) and already-unpacked archives are skipped.
    Archives are fetched to ``<data_root>/downloads/``, unpacked, then deleted unless ``keep_archive``.
    Raises :class:`DownloadError` (naming the URL and the next step) on any failure; nothing
    incomplete is left at the final path.
    """
    res = _resource(name)
    root = Path(data_root)
    url = resource_url(name, base_url)
    if res.kind == "file":
        return _fetch(url, res.known_hash, root / res.dest, progress)
    dest = root / res.dest
    marker = dest / f".{res.filename}.complete"
    if marker.exists():
        return dest
    archive = _fetch(url, res.known_hash, root / "downloads" / res.filename, progress)
    _extract(archive, dest, res.flatten, url)
    marker.write_text(url + "\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``csa download NAME [NAME ...] --data-root DIR``."""
    parser = argparse.ArgumentParser(prog="csa download", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"datasets ({', '.join(DATASETS)}) or resource names")
    parser.add_argument("--data-root", default="data", help="data root (default: ./data)")
    parser.add_argument("--mirror", default=None, help=f"base URL of a flat mirror (default: ${MIRROR_ENV} "
                                                        f"or the official hosts)")
    parser.add_argument("--keep-archives", action="store_true", help="keep downloaded archives")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list datasets and resources, then exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for ds, names in DATASETS.items():
            print(f"{ds}: {', '.join(names) if len(names) < 8 else names[0] + ', ... (' + str(len(names)) + ')'}")
        for n, r in RESOURCES.items():
            if n.startswith("revisitop1m.") and n != "revisitop1m.1":
                continue
            label = "revisitop1m.1 .. revisitop1m.100" if n == "revisitop1m.1" else n
            print(f"  {label:34s} {r.url} -> {r.dest}")
        return 0
    try:
        for n in args.names:
            kw = dict(progress=not args.no_progress, base_url=args.mirror, keep_archive=args.keep_archives)
            paths = download_dataset(n, args.data_root, **kw) if n in DATASETS else [download(n, args.data_root, **kw)]
            for p in paths:
                print(p)
    except (DownloadError, CSAInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
