"""csa.data.download against a local HTTP server (127.0.0.1, ephemeral port) serving small fixture files."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csa.cli import main as csa_main
from csa.data import download as dl
from csa.validation import CSAInputError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()  # paths whose first GET stops half-way
        self.no_length: set[str] = set()  # paths served without a Content-Length header
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self):  # noqa: N802 - http.server API
        path = self.path.lstrip("/")
        rng = self.headers.get("Range")
        self.server.requests.append((path, rng))
        data = self.server.files.get(path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and not self.server.ignore_range:
            assert rng.startswith("bytes=") and rng.endswith("-"), rng
            start = int(rng[len("bytes="):-1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if path in self.server.no_length:
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in self.server.drop_once:
            self.server.drop_once.discard(path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _register(monkeypatch, name: str, filename: str, dest: str, known_hash: str | None = None,
              kind: str = "file", flatten: bool = False) -> None:
    res = dl.Resource(f"http://official.invalid/data/{filename}", dest, kind=kind, known_hash=known_hash,
                      flatten=flatten)
    monkeypatch.setitem(dl.RESOURCES, name, res)


def _leftovers(root: Path) -> list[str]:
    """Files under ``root`` besides the download manifest."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p != root / dl.MANIFEST)


def test_file_with_right_md5_lands_in_layout_and_is_not_fetched_twice(server, tmp_path, monkeypatch):
    data = bytes(range(256)) * 300
    server.files["small.bin"] = data
    _register(monkeypatch, "small", "small.bin", "annotations/x/small.bin", known_hash=f"md5:{_md5(data)}")
    out = dl.download("small", tmp_path, progress=False, base_url=server.base)
    assert out == tmp_path / "annotations/x/small.bin"
    assert out.read_bytes() == data
    assert _leftovers(tmp_path) == ["annotations/x/small.bin"]
    dl.download("small", tmp_path, progress=False, base_url=server.base)  # verified on disk: no request
    assert server.requests == [("small.bin", None)]


def test_real_ground_truth_md5_via_mirror_env(server, tmp_path, monkeypatch):
    gnd = SHARED / "revisitop" / "gnd_roxford5k.pkl"
    if not gnd.exists():
        pytest.skip("offline ground truth not available")
    server.files["gnd_roxford5k.pkl"] = gnd.read_bytes()
    monkeypatch.setenv(dl.MIRROR_ENV, server.base + "/")
    out = dl.download("gnd_roxford5k", tmp_path, progress=False)
    assert out == tmp_path / "annotations" / "roxford5k" / "gnd_roxford5k.pkl"
    assert _md5(out.read_bytes()) == "f2b67579f625a587b5b0828dbf2e8eb0"


def test_wrong_hash_raises_and_leaves_no_file(server, tmp_path, monkeypatch):
    server.files["bad.bin"] = b"not what was published" * 100
    _register(monkeypatch, "bad", "bad.bin", "annotations/bad.bin", known_hash="md5:" + "0" * 32)
    with pytest.raises(dl.DownloadError) as err:
        dl.download("bad", tmp_path, progress=False, base_url=server.base)
    msg = str(err.value)
    assert f"{server.base}/bad.bin" in msg and "hash" in msg and "re-run" in msg
    assert _leftovers(tmp_path) == []


def test_dropped_connection_then_resume_with_range(server, tmp_path, monkeypatch):
    data = bytes((i * 7 + 3) % 251 for i in range(200_000))
    server.files["big.bin"] = data
    server.drop_once.add("big.bin")
    _register(monkeypatch, "big", "big.bin", "annotations/big.bin", known_hash=f"md5:{_md5(data)}")
    with pytest.raises(dl.DownloadError) as err:
        dl.download("big", tmp_path, progress=False, base_url=server.base)
    assert f"{server.base}/big.bin" in str(err.value) and "resume" in str(err.value)
    final = tmp_path / "annotations/big.bin"
    part = dl.part_path(final, f"{server.base}/big.bin")
    assert part.name.startswith("big.bin.") and part.name.endswith(".part")
    assert not final.exists()
    assert 0 < part.stat().st_size < len(data)  # partial bytes kept, visibly incomplete
    assert part.read_bytes() == data[: part.stat().st_size]
    have = part.stat().st_size
    out = dl.download("big", tmp_path, progress=False, base_url=server.base)
    assert out.read_bytes() == data
    assert server.requests == [("big.bin", None), ("big.bin", f"bytes={have}-")]
    assert _leftovers(tmp_path) == ["annotations/big.bin"]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path, monkeypatch):
    data = b"abcdefghij" * 5000
    server.files["f.bin"] = data
    server.drop_once.add("f.bin")
    server.ignore_range = True
    _register(monkeypatch, "f", "f.bin", "annotations/f.bin", known_hash=f"md5:{_md5(data)}")
    with pytest.raises(dl.DownloadError):
        dl.download("f", tmp_path, progress=False, base_url=server.base)
    assert dl.download("f", tmp_path, progress=False, base_url=server.base).read_bytes() == data


def test_404_names_the_url(server, tmp_path, monkeypatch):
    _register(monkeypatch, "missing", "missing.bin", "annotations/missing.bin")
    with pytest.raises(dl.DownloadError) as err:
        dl.download("missing", tmp_path, progress=False, base_url=server.base)
    assert f"{server.base}/missing.bin" in str(err.value) and "404" in str(err.value)
    assert _leftovers(tmp_path) == []
    assert len(server.requests) == 1


def test_r1m_shard_extracted_with_structure_and_archive_removed(server, tmp_path):
    members = {"jpg/a/img1.jpg": b"one", "jpg/b/img2.jpg": b"two" * 10}
    server.files["revisitop1m.1.tar.gz"] = _targz(members)
    out = dl.download("revisitop1m.1", tmp_path, progress=False, base_url=server.base)
    assert out == tmp_path / "jpg" / "revisitop1m"
    for name, data in members.items():
        assert (out / name).read_bytes() == data
    assert not (tmp_path / "downloads" / "revisitop1m.1.tar.gz").exists()
    assert not any(p.name.endswith((".extracting", ".flat")) for p in (tmp_path / "jpg").iterdir())
    dl.download("revisitop1m.1", tmp_path, progress=False, base_url=server.base)  # marker: no refetch
    assert len(server.requests) == 1


def test_rparis6k_dataset_two_archives_flattened(server, tmp_path):
    gnd = b"fake ground truth"
    server.files["paris_1-v1.tgz"] = _targz({"paris/eiffel/paris_eiffel_000001.jpg": b"e1",
                                             "paris/louvre/paris_louvre_000002.jpg": b"l2"})
    server.files["paris_2-v1.tgz"] = _targz({"paris/pompidou/paris_pompidou_000003.jpg": b"p3"})
    server.files["gnd_rparis6k.pkl"] = gnd
    # The shipped md5 protects the real ground truth: the fake one is refused, the images are not fetched.
    with pytest.raises(dl.DownloadError):
        dl.download_dataset("rparis6k", tmp_path, progress=False, base_url=server.base)
    assert _leftovers(tmp_path) == []
    for name in ("paris_1", "paris_2"):
        dl.download(name, tmp_path, progress=False, base_url=server.base)
    jpg = tmp_path / "jpg" / "rparis6k"
    assert sorted(p.name for p in jpg.iterdir() if not p.name.startswith(".")) == [
        "paris_eiffel_000001.jpg", "paris_louvre_000002.jpg", "paris_pompidou_000003.jpg"]
    assert (jpg / "paris_pompidou_000003.jpg").read_bytes() == b"p3"


def test_corrupt_archive_message_and_no_partial_extraction(server, tmp_path):
    server.files["ims.tar.gz"] = b"\x1f\x8b this is not a gzip stream"
    with pytest.raises(dl.DownloadError) as err:
        dl.download("rsfm120k_ims", tmp_path, progress=False, base_url=server.base)
    assert "ims.tar.gz" in str(err.value) and "tar" in str(err.value)
    assert not (tmp_path / "jpg" / "retrieval-SfM-120k" / "ims").exists()
    assert _leftovers(tmp_path) == []  # refused before install: the next run downloads it again


def test_cli(server, tmp_path, monkeypatch, capsys):
    data = b"payload"
    server.files["p.bin"] = data
    _register(monkeypatch, "p", "p.bin", "annotations/p.bin", known_hash=f"md5:{_md5(data)}")
    assert csa_main(["download", "p", "--data-root", str(tmp_path), "--mirror", server.base, "--no-progress"]) == 0
    assert (tmp_path / "annotations/p.bin").read_bytes() == data
    assert csa_main(["download", "nope", "--data-root", str(tmp_path), "--mirror", server.base]) == 2
    err = capsys.readouterr().err
    assert err.startswith("csa download: error:") and "unknown download 'nope'" in err


def test_registry_matches_official_hosts_and_layout():
    assert len(dl.DATASETS["r1m"]) == 101
    assert dl.RESOURCES["revisitop1m.100"].url == "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.100.tar.gz"
    assert dl.RESOURCES["gnd_rparis6k"].dest == "annotations/rparis6k/gnd_rparis6k.pkl"
    assert dl.RESOURCES["gnd_roxford5k"].known_hash == "md5:f2b67579f625a587b5b0828dbf2e8eb0"
    assert dl.RESOURCES["rsfm120k_db"].dest == "annotations/retrieval-SfM-120k.pkl"
    for name, res in dl.RESOURCES.items():
        assert res.url.split("/")[2] in {"cmp.felk.cvut.cz", "ptak.felk.cvut.cz", "www.robots.ox.ac.uk"}, name
        assert res.dest.split("/")[0] in {"annotations", "jpg", "networks"}, name
    with pytest.raises(CSAInputError):
        dl.download_dataset("imagenet", "/nonexistent")


def test_network_resources_point_at_the_official_cirtorch_files():
    for name in ("gl18-tl-resnet50-gem-w", "gl18-tl-resnet101-gem-w", "gl18-tl-resnet152-gem-w",
                 "rSfM120k-tl-resnet101-gem-w"):
        url = dl.RESOURCES[name].url
        assert url.startswith("http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/") and url.endswith(".pth")
        assert name in url and name in dl.DATASETS["networks"]


def test_unreachable_host_error_names_url_and_leaves_nothing(tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _register(monkeypatch, "gone", "gone.bin", "annotations/gone.bin")
    with pytest.raises(dl.DownloadError) as err:
        dl.download("gone", tmp_path, progress=False, base_url=f"http://127.0.0.1:{port}")
    assert f"http://127.0.0.1:{port}/gone.bin" in str(err.value) and "re-run" in str(err.value)
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# files without a published hash: length and format checked before install, sha256 recorded
# --------------------------------------------------------------------------------------------
def _torch_bytes() -> bytes:
    import numpy as np
    import torch

    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.arange(50_000.0)}, "meta": {"architecture": "resnet101",
                                                                      "Lw": {"ss": {"m": np.zeros(3)}}}}, buf)
    return buf.getvalue()


def test_truncated_network_without_content_length_is_not_installed(server, tmp_path, monkeypatch):
    data = _torch_bytes()
    server.files["net.pth"] = data
    server.no_length.add("net.pth")
    server.drop_once.add("net.pth")                   # the connection drops half-way, no length to compare
    _register(monkeypatch, "net", "net.pth", "networks/net.pth")
    with pytest.raises(dl.DownloadError, match="net.pth.*not a complete torch file"):
        dl.download("net", tmp_path, progress=False, base_url=server.base)
    assert _leftovers(tmp_path) == []
    out = dl.download("net", tmp_path, progress=False, base_url=server.base)   # the next run gets it whole
    assert out.read_bytes() == data
    entry = json.loads((tmp_path / dl.MANIFEST).read_text())["networks/net.pth"]
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["verified"] == "format:torch"


def test_html_page_instead_of_a_pickle_or_an_archive_is_refused(server, tmp_path, monkeypatch):
    page = b"<!DOCTYPE html><html><body>Service unavailable</body></html>"
    for name in ("db.pkl", "ims.tar.gz", "list.txt"):
        server.files[name] = page
    _register(monkeypatch, "db", "db.pkl", "annotations/db.pkl")
    _register(monkeypatch, "list", "list.txt", "annotations/list.txt")
    with pytest.raises(dl.DownloadError, match="not a complete pickle file"):
        dl.download("db", tmp_path, progress=False, base_url=server.base)
    with pytest.raises(dl.DownloadError, match="HTML"):
        dl.download("list", tmp_path, progress=False, base_url=server.base)
    with pytest.raises(dl.DownloadError, match="not a complete tar file"):
        dl.download("rsfm120k_ims", tmp_path, progress=False, base_url=server.base)
    assert _leftovers(tmp_path) == []


def test_truncated_archive_is_refused_then_downloaded_again(server, tmp_path):
    archive = _targz({f"jpg/{i}.jpg": bytes([i]) * 5000 for i in range(20)})
    server.files["revisitop1m.1.tar.gz"] = archive[: len(archive) * 2 // 3]     # a cut-short copy on the mirror
    with pytest.raises(dl.DownloadError, match="not a complete tar file"):
        dl.download("revisitop1m.1", tmp_path, progress=False, base_url=server.base)
    assert _leftovers(tmp_path) == []                   # nothing blocks the next run
    server.files["revisitop1m.1.tar.gz"] = archive
    out = dl.download("revisitop1m.1", tmp_path, progress=False, base_url=server.base)
    assert (out / "jpg" / "19.jpg").read_bytes() == bytes([19]) * 5000


def test_a_part_file_of_another_address_is_never_continued(server, tmp_path, monkeypatch):
    data = b"the right bytes " * 4000
    server.files["f.pkl"] = pickle.dumps({"x": data})
    _register(monkeypatch, "f", "f.pkl", "annotations/f.pkl")
    final = tmp_path / "annotations" / "f.pkl"
    final.parent.mkdir(parents=True)
    stale = dl.part_path(final, "http://elsewhere.invalid/f.pkl")
    stale.write_bytes(b"bytes of another file")
    out = dl.download("f", tmp_path, progress=False, base_url=server.base)
    assert out.read_bytes() == server.files["f.pkl"]
    assert server.requests == [("f.pkl", None)]          # started from zero, no Range
    assert stale.read_bytes() == b"bytes of another file"


def test_a_changed_file_is_noticed(server, tmp_path, monkeypatch):
    server.files["g.pkl"] = pickle.dumps([1, 2, 3] * 1000)
    _register(monkeypatch, "g", "g.pkl", "annotations/g.pkl")
    out = dl.download("g", tmp_path, progress=False, base_url=server.base)
    dl.download("g", tmp_path, progress=False, base_url=server.base)      # unchanged: accepted, not fetched
    assert len(server.requests) == 1
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(dl.DownloadError, match="g.pkl changed since it was installed"):
        dl.download("g", tmp_path, progress=False, base_url=server.base)


def test_a_mirror_that_is_not_a_url_is_refused(tmp_path, capsys):
    with pytest.raises(CSAInputError, match="notaurl"):
        dl.download("gnd_roxford5k", tmp_path, progress=False, base_url="notaurl")
    assert csa_main(["download", "gnd", "--data-root", str(tmp_path), "--mirror", "notaurl"]) == 2
    assert "is not a URL" in capsys.readouterr().err
