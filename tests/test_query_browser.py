"""The query browser: its per-query records against an independent recount, its files, and the built page in Chromium.

The recount walks each ranking by hand in float64 (Revisited AP: junk skipped, trapezoid over recall), so it
shares no code with :mod:`csa.evaluate`.  The slow tests use the session's papermill runs (fixture
``executed_notebooks``): notebook 10's APs must equal notebooks 3 and 4's, and the page built from its
files must show the query named in its address.
"""
from __future__ import annotations

import json
import re
from decimal import ROUND_HALF_UP, Decimal
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from _subprocess import run as run_isolated
from conftest import DEMO_ROOT
from csa.notebook.query_browser import (DATA_FILE, benchmark_rankings, positive_ranks, query_records,
                                        write_browser_data, write_thumbnails)
from csa.validation import CSAInputError
from test_book import find_chromium, prepare_book_copy

WEIGHTS = DEMO_ROOT / "weights"


def recount_ap(ranking, ok, junk) -> float | None:
    """Revisited AP in percent by walking the ranking; None when there is no positive."""
    ok, junk = {int(i) for i in ok}, {int(i) for i in junk}
    if not ok:
        return None
    found = seen = 0
    area = 0.0
    for idx in (int(i) for i in ranking):
        if idx in junk:
            continue
        seen += 1
        if idx in ok:
            precision_before = found / (seen - 1) if seen > 1 else 1.0
            found += 1
            area += (precision_before + found / seen) / 2.0
    return 100.0 * area / len(ok)


def recount_record(entry: dict, before: list[int], after: list[int], k: int) -> dict:
    """What a record must say about one query, recounted from its two full rankings."""
    easy, hard, junk = list(entry["easy"]), list(entry["hard"]), list(entry["junk"])

    def label(i):
        return "e" if i in easy else "h" if i in hard else "j" if i in junk else "n"

    aps = {"medium": [recount_ap(r, easy + hard, junk) for r in (before, after)],
           "hard": [recount_ap(r, hard, junk + easy) for r in (before, after)]}
    moves = sorted((before.index(i) + 1, after.index(i) + 1, "e" if i in easy else "h") for i in easy + hard)
    return {"aps": aps, "top": {"before": before[:k], "after": after[:k]},
            "labels": {w: "".join(label(i) for i in r[:k]) for w, r in (("before", before), ("after", after))},
            "moved": {"before": [after.index(i) + 1 for i in before[:k]],
                      "after": [before.index(i) + 1 for i in after[:k]]},
            "positives": {"before": [m[0] for m in moves], "after": [m[1] for m in moves],
                          "kind": "".join(m[2] for m in moves)}}


def assert_records_match(records: list[dict], gt: dict, before: np.ndarray, after: np.ndarray, k: int) -> None:
    assert [r["q"] for r in records] == list(range(len(gt["qimlist"])))
    for r, entry in zip(records, gt["gnd"]):
        expected = recount_record(entry, before[:, r["q"]].tolist(), after[:, r["q"]].tolist(), k)
        assert r["name"] == gt["qimlist"][r["q"]]
        for protocol, pair in expected["aps"].items():
            for got, want in zip(r["ap"][protocol], pair):
                assert (got is None) == (want is None), (r["name"], protocol)
                if want is not None:
                    assert got == pytest.approx(want, abs=0.005 + 1e-9), (r["name"], protocol)
        for field in ("top", "labels", "moved", "positives"):
            assert r[field] == expected[field], (r["name"], field)


def toy_benchmark(seed: int = 0, n_db: int = 40, n_q: int = 6):
    """A random ground truth (some queries without hard positives, one without any) and two rankings."""
    rng = np.random.default_rng(seed)
    gnd = []
    for q in range(n_q):
        pool = rng.permutation(n_db)
        n_easy, n_hard, n_junk = (0, 0, 3) if q == 0 else (int(rng.integers(1, 6)), int(rng.integers(0, 4)), 3)
        gnd.append({"bbx": [10.0, 20.0, 90.0, 60.0], "easy": pool[:n_easy].tolist(),
                    "hard": pool[n_easy:n_easy + n_hard].tolist(),
                    "junk": pool[n_easy + n_hard:n_easy + n_hard + n_junk].tolist()})
    gt = {"imlist": [f"db{i}" for i in range(n_db)], "qimlist": [f"q{q}" for q in range(n_q)], "gnd": gnd}
    before = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    after = before.copy()
    for q in range(n_q):                       # re-sort the top 12, as a re-ranker does
        after[:12, q] = rng.permutation(before[:12, q])
    return gt, before, after


def test_records_match_an_independent_recount():
    gt, before, after = toy_benchmark()
    records = query_records("toy", gt, before, after, k=10, sizes=[(100, 80)] * len(gt["qimlist"]))
    assert_records_match(records, gt, before, after, k=10)
    assert records[0]["ap"] == {"medium": [None, None], "hard": [None, None]}   # no positive at all
    assert records[0]["positives"] == {"before": [], "after": [], "kind": ""}
    assert records[1]["box"] == [0.1, 0.25, 0.9, 0.75]                          # box as fractions of the photo
    json.dumps(records, allow_nan=False)                                         # plain JSON, no NaN


def test_records_refuse_partial_or_mismatched_rankings():
    gt, before, after = toy_benchmark()
    with pytest.raises(CSAInputError, match="full"):
        query_records("toy", gt, before[:20], after[:20])
    with pytest.raises(CSAInputError, match="distinct"):
        positive_ranks(np.zeros(5, dtype=int), np.arange(5), {"easy": [1], "hard": []})


def test_records_of_a_demo_benchmark_match_a_recount(demo_features):
    """Official Oxford queries, re-ranked by the released Paris-trained weights (notebook 3's pair)."""
    gt, before, after = benchmark_rankings(demo_features, "roxford5k-mini", WEIGHTS / "rparis6k-mini-train.pth",
                                           topk=128, device="cpu")
    n_db, n_q = len(gt["imlist"]), len(gt["qimlist"])
    assert before.shape == after.shape == (n_db, n_q)
    assert (np.sort(after, axis=0) == np.arange(n_db)[:, None]).all()          # every column a permutation
    assert (after[128:] == before[128:]).all()                                  # only the top K moves
    assert not (after[:128] == before[:128]).all()
    records = query_records("roxford5k-mini", gt, before, after, k=10)
    assert_records_match(records, gt, before, after, k=10)


def test_thumbnails_and_data_file(tmp_path):
    photos = DEMO_ROOT / "jpg" / "rparis6k-mini"
    names = sorted(p.stem for p in photos.glob("*.jpg"))[:3]
    out = tmp_path / "thumbs"
    assert write_thumbnails(names, photos, out, size=96) == 3
    for name in names:
        with Image.open(out / f"{name}.jpg") as im, Image.open(photos / f"{name}.jpg") as full:
            assert im.format == "JPEG" and max(im.size) == 96
            assert abs(im.size[0] / im.size[1] - full.size[0] / full.size[1]) < 0.05   # aspect kept
    assert write_thumbnails(names, photos, out, size=96) == 0                 # up to date: nothing rewritten
    assert write_thumbnails(names[:1], photos, out, size=64) == 1             # another size: rewritten
    with pytest.raises(CSAInputError, match="no_such_photo"):
        write_thumbnails(["no_such_photo"], photos, out)

    payload = {"queries": [{"name": "a</script><b>", "ap": {"medium": [1.5, None]}}]}
    path = write_browser_data(payload, tmp_path / DATA_FILE)
    text = path.read_text()
    assert text.count("</script>") == 1 and text.rstrip().endswith("</script>")
    inner = re.search(r'<script type="application/json" id="qb-data">(.*)</script>', text, flags=re.S).group(1)
    assert json.loads(inner) == payload
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary file left


# ------------------------------------------------------------------------------------------------------------
# the notebook and the built page (slow)
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_browser_aps_equal_notebooks_3_and_4(executed_notebooks):
    browser = pd.read_csv(executed_notebooks.csv["10_query_browser"])
    assert set(browser["dataset"]) == {"roxford5k-mini", "roxford5k-mini-loo", "rparis6k-mini", "rparis6k-mini-loo"}
    table = pd.read_csv(executed_notebooks.csv["03_reranking"]).set_index(["dataset", "method"])
    for dataset, rows in browser[browser["dataset"].isin(["roxford5k-mini", "rparis6k-mini"])].groupby("dataset"):
        for protocol in ("medium", "hard"):
            for when, method in (("before", "first stage"), ("after", "CSA")):
                mean = rows[f"{protocol}_ap_{when}"].dropna().mean()
                assert mean == pytest.approx(table.loc[(dataset, method), f"{protocol}_map"], abs=0.006), \
                    (dataset, protocol, method)
    shown = pd.read_csv(executed_notebooks.csv["04_qualitative_top10"])
    assert len(shown) >= 1
    merged = shown.merge(browser, on=["dataset", "query"], validate="one_to_one")
    assert len(merged) == len(shown)
    assert np.allclose(merged["ap_before"], merged["medium_ap_before"], atol=0.006)
    assert np.allclose(merged["ap_after"], merged["medium_ap_after"], atol=0.006)


class _PageReader(HTMLParser):
    """Text of the elements with an id, and the <img> of the #qb-before / #qb-after grids."""

    def __init__(self):
        super().__init__()
        self.text: dict[str, str] = {}
        self.images: dict[str, list[dict]] = {"qb-before": [], "qb-after": []}
        self._open: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            grid = next((i for i in reversed(self._open) if i in self.images), None)
            if grid:
                self.images[grid].append(attrs)
            return
        if tag in ("br", "input", "meta", "link", "hr", "source", "col"):
            return
        self._open.append(attrs.get("id"))
        if attrs.get("id"):
            self.text.setdefault(attrs["id"], "")

    def handle_endtag(self, tag):
        if tag != "img" and self._open:
            self._open.pop()

    def handle_data(self, data):
        for i in self._open:
            if i:
                self.text[i] += data


def _build_browser_page(tmp: Path, executed: Path) -> Path:
    """A book copy whose table of contents is the browser page and the two notebooks it links to."""
    book, _ = prepare_book_copy(tmp, executed)
    toc = {"format": "jb-book", "root": "query_browser",
           "chapters": [{"file": "notebooks/03_reranking"}, {"file": "notebooks/10_query_browser"}]}
    (book / "_toc.yml").write_text(yaml.safe_dump(toc))
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        pytest.skip("jupyter-book is not installed in this environment (pip install -e '.[notebooks]')")
    proc = run_isolated([str(jb), "build", str(book)], capture_output=True, text=True, cwd=tmp)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return book / "_build" / "html"


@pytest.mark.slow
def test_browser_page_shows_the_query_named_in_its_address(executed_notebooks):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")
    browser = pd.read_csv(executed_notebooks.csv["10_query_browser"])
    # one leave-one-out and one official query: the largest Medium change of each kind
    picks = []
    for loo in (True, False):
        rows = browser[browser["dataset"].str.endswith("-loo") == loo].dropna(subset=["medium_ap_before"])
        change = (rows["medium_ap_after"] - rows["medium_ap_before"]).abs()
        picks.append(rows.loc[change.idxmax()])
    with tempfile.TemporaryDirectory(prefix="csa-browser-") as tmp:
        html = _build_browser_page(Path(tmp), executed_notebooks.out)
        page = html / "query_browser.html"
        assert page.is_file()
        for row in picks:
            url = f"{page.as_uri()}#q={row['dataset']}/{row['name']}"
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run",
                     f"--user-data-dir={Path(tmp) / 'profile'}", "--virtual-time-budget=5000", "--dump-dom", url]
            dom = run_isolated([chromium, *flags], capture_output=True, text=True)
            assert dom.returncode == 0, dom.stderr[-2000:]
            seen = _PageReader()
            seen.feed(dom.stdout)
            assert seen.text["qb-title"].strip() == row["name"]
            assert row["dataset"] in seen.text["qb-subtitle"]
            for protocol in ("medium", "hard"):
                for when in ("before", "after"):
                    value = row[f"{protocol}_ap_{when}"]
                    shown = seen.text[f"qb-ap-{protocol}-{when}"].strip()
                    assert shown == ("\u2014" if pd.isna(value) else _one_decimal(value)), (row["name"], protocol, when)
            for grid in ("qb-before", "qb-after"):
                images = seen.images[grid]
                assert len(images) == 10, (grid, len(images))
                for img in images:
                    target = html / unquote(urlparse(img["src"]).path) if "://" not in img["src"] else \
                        Path(unquote(urlparse(img["src"]).path))
                    assert target.is_file(), f"{grid} shows {img['src']}, which is not in the built book"
                    assert target.read_bytes()[:3] == b"\xff\xd8\xff"          # a JPEG
            # the first-stage top 10 is the cosine ranking of the descriptors (recomputed in float64)
            _assert_first_stage_top10(row["dataset"], row["query"], [img["alt"] for img in seen.images["qb-before"]])


def _one_decimal(value: float) -> str:
    """``value`` with one decimal as JavaScript's ``toFixed(1)`` writes it (exact ties round up, e.g. 42.25 -> 42.3)."""
    return str(Decimal(float(value)).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def _assert_first_stage_top10(dataset: str, query: int, names: list[str]) -> None:
    """``names`` are the ten most cosine-similar database photos of a demo query, in order (up to float32 ties)."""
    from csa.data.layout import load_gnd, load_test_features

    feats = load_test_features(DEMO_ROOT, dataset, "lite0-gem")
    scores = np.asarray(feats.db, dtype=np.float64) @ np.asarray(feats.query, dtype=np.float64)[query]
    index = {name: i for i, name in enumerate(load_gnd(DEMO_ROOT, dataset)["imlist"])}
    shown = scores[[index[n] for n in names]]
    assert (np.diff(shown) <= 1e-5).all(), "the first-stage list is not in decreasing cosine order"
    assert shown.min() >= np.sort(scores)[::-1][10] - 1e-5, "a photo more similar than the shown ten is missing"
