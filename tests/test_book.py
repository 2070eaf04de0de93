"""Build the Jupyter Book from a temporary copy (warning-free) and check the rendered results page in Chromium.

The notebook pages are the session's papermill runs with tiny parameters (fixture
``executed_notebooks`` in conftest.py), copied into the temporary book's ``notebooks/`` folder.  The
repository itself is never modified, except that the screenshot goes to ``artifacts/`` (git-ignored).
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from _subprocess import run as run_isolated

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO / "book"
ARTIFACTS = REPO / "artifacts"
RESULTS_PAGE = "notebooks/03_reranking"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def toc_files(toc_path: Path = BOOK / "_toc.yml") -> list[str]:
    """Every ``file:`` entry of the table of contents (root included), in order."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))
            walk(entry.get("chapters"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def prepare_book_copy(dest: Path, executed: Path) -> tuple[Path, list[str]]:
    """Copy book/ to ``dest`` (no _build) with the executed notebooks from ``executed`` in its notebooks/
    folder; return the copy and the toc entries that are still missing."""
    book = dest / "book"
    shutil.copytree(BOOK, book, ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints"))
    (book / "notebooks").mkdir(exist_ok=True)
    for nb in executed.glob("*.ipynb"):
        shutil.copy2(nb, book / "notebooks" / nb.name)
    # the build-times page is measured by each run (git-ignored), as scripts/run_all.sh writes it
    make_tables = importlib.util.spec_from_file_location("make_tables", BOOK / "make_tables.py")
    module = importlib.util.module_from_spec(make_tables)
    make_tables.loader.exec_module(module)
    (book / "generated" / "build_times.md").write_text(module.build_times_markdown(executed))
    missing = [entry for entry in toc_files()
               if not any((book / entry).with_suffix(ext).exists() for ext in (".md", ".ipynb"))]
    return book, missing


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def test_toc_chapters_exist_and_notebook_pages_are_planned():
    files = toc_files()
    prose = [f for f in files if not f.startswith("notebooks/")]
    missing = [f for f in prose if not (BOOK / f"{f}.md").is_file()]
    assert not missing, f"toc lists prose pages that do not exist: {missing}"
    assert [f for f in files if f.startswith("notebooks/")] == [
        "notebooks/09_what_csa_computes", "notebooks/11_worked_example",
        "notebooks/00_inference_in_a_few_lines", "notebooks/01_data_preparation", "notebooks/02_training",
        "notebooks/03_reranking", "notebooks/07_recipe_selection", "notebooks/08_paper_table", "notebooks/06_ablation",
        "notebooks/04_qualitative_top10",
        "notebooks/05_comparison",
    ]
    config = yaml.safe_load((BOOK / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"  # the book never re-executes notebooks
    assert (BOOK / "figures" / "csa_dataflow.svg").is_file()


def test_api_page_documents_importable_modules():
    modules = re.findall(r"\.\. automodule:: (\S+)", (BOOK / "api.md").read_text())
    package = sorted(".".join(p.relative_to(REPO).with_suffix("").parts) for p in (REPO / "csa").rglob("*.py")
                     if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(modules) == package, "api.md must document every module of csa/, and only those"
    broken = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every module that fails, with its error
            broken.append(f"{name} ({type(exc).__name__}: {exc})")
    assert not broken, f"api.md documents modules that do not import (the -W build would fail): {broken}"


@pytest.mark.slow
def test_book_builds_without_warnings_and_renders_results_page(executed_notebooks):
    jb = Path(sys.executable).parent / "jupyter-book"
    if not jb.exists():
        pytest.skip("jupyter-book is not installed in this environment (pip install -e '.[notebooks]')")
    with tempfile.TemporaryDirectory(prefix="csa-book-") as tmp:
        book, missing = prepare_book_copy(Path(tmp), executed_notebooks.out)
        assert not missing, f"pages missing from the papermill run: {missing}"
        proc = run_isolated([str(jb), "build", str(book), "-W", "--keep-going"], capture_output=True,
                            text=True, cwd=tmp)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"book build failed:\n{log[-6000:]}"
        warnings = [line for line in log.splitlines() if re.search(r"\bWARNING\b", line)]
        assert not warnings, "book build printed warnings:\n" + "\n".join(warnings[:30])
        html = book / "_build" / "html"
        for entry in toc_files():
            assert (html / f"{entry}.html").is_file(), f"missing page {entry}.html"
        assert (html / "_images").is_dir() or list(html.rglob("*.svg")), "the data-flow figure was not copied"

        chromium = find_chromium()
        if chromium is None:
            pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium); build checked, DOM not")
        page = (html / f"{RESULTS_PAGE}.html").as_uri()
        profile = Path(tmp) / "chromium-profile"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--virtual-time-budget=5000", "--hide-scrollbars"]
        dom = run_isolated([chromium, *flags, "--dump-dom", page], capture_output=True, text=True)
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert "<table" in dom.stdout, "no <table> in the rendered results page"
        assert re.search(r"<img[^>]+src=", dom.stdout), "no <img> in the rendered results page"
        assert "<h1" in dom.stdout
        # equations render from the built site itself (MathJax in _static/, no network needed)
        model = run_isolated([chromium, *flags, "--dump-dom", (html / "csa_model.html").as_uri()],
                             capture_output=True, text=True)
        assert model.returncode == 0, model.stderr[-2000:]
        assert model.stdout.count("<mjx-container") >= 10, "equations of the model page are not rendered"
        assert "\\[" not in model.stdout and "$$" not in model.stdout, "raw TeX left on the model page"
        assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "book_results_page.png"
        shot.unlink(missing_ok=True)
        grab = run_isolated([chromium, *flags, "--window-size=1400,1200", f"--screenshot={shot}", page],
                            capture_output=True, text=True)
        assert grab.returncode == 0, grab.stderr[-2000:]
        assert shot.is_file() and shot.stat().st_size > 10_000, "the screenshot is missing or empty"
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generated_tables_match_the_package():
    """The published numbers are typed once (csa.compare.published); the book includes the generated files."""
    out = run_isolated([sys.executable, str(BOOK / "make_tables.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for page in ("comparison.md", "reproduce.md"):
        assert "{include} generated/published_" in (BOOK / page).read_text()


def test_build_times_are_measured_per_run_and_not_tracked():
    """The main job rewrites the build-times table: it must be git-ignored so a run leaves the checkout clean."""
    root = BOOK.parent
    tracked = subprocess.run(["git", "ls-files", "book/generated/build_times.md"], capture_output=True, text=True,
                             cwd=root)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.strip() == "", "book/generated/build_times.md is tracked; run_all.sh would modify it"
    ignored = subprocess.run(["git", "check-ignore", "-q", "book/generated/build_times.md"], cwd=root)
    assert ignored.returncode == 0, "book/generated/build_times.md must be git-ignored"


def test_readme_shows_the_generated_paper_table_unchanged():
    """The README's paper-shaped demo table is the one book/make_tables.py generates from the committed results."""
    generated = (BOOK / "generated" / "paper_headline.md").read_text().split("\n", 1)[1].strip()
    readme = (BOOK.parent / "README.md").read_text()
    assert generated in readme, "README's paper table differs from book/generated/paper_headline.md: paste it again"
