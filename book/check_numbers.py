"""Check that every number the prose states was produced by the run (run: python book/check_numbers.py).

A chapter (``book/*.md``) or the README may state a result only when the run produced it: every number
with a sign or a decimal point in the prose (code, maths, links and citations left out) must appear in a
generated include (``book/generated/*.md``), in a committed result file (``data/demo/results/*.csv``), in the
outputs of the executed notebooks (``book/notebooks/*.ipynb``, written by ``scripts/run_all.sh``; for a
chapter with notebook sections in ``_toc.yml``, only those), in the benchmark logs (``benchmarks/*.md``), or
in the short allow-list below (published numbers, typed once in :mod:`csa.compare.published`, and facts
about hardware and software).  An interval ``[a, b]`` must appear as that pair in a source.  Exit
status 1 lists the numbers that came from nowhere, by file and line.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable

BOOK = Path(__file__).resolve().parent
REPO = BOOK.parent
EXECUTED = BOOK / "notebooks"

#: Stated facts that no run produces, each with its reason.
ALLOWED: dict[str, str] = {
    "3.11": "the Python version of the environment (pyproject.toml)",
    "15.5": "hours of the authors' 100 epochs, from the epoch times of their published training log",
    "0.0117": "the authors' peak lr under per-GPU scaling of a per-GPU batch of 30 (derived in the training chapter)",
    "0.0352": "the authors' peak lr under per-GPU scaling of a per-GPU batch of 90 (derived in the training chapter)",
}

NUMBER = re.compile(r"(?<![\w.,\-−+])([+\-−]?)(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?![\w])")
PROSE_DROP = [
    re.compile(r"```.*?```", re.S),                     # code blocks and MyST directives
    re.compile(r"`[^`\n]*`"),                           # inline code, roles' targets
    re.compile(r"\$\$.*?\$\$", re.S), re.compile(r"\$[^$\n]+\$"),   # maths
    re.compile(r"\]\([^)]*\)"), re.compile(r"https?://\S+"),       # link targets
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"\b\d+\.\d+\.\d+\S*"),                  # versions
]


def prose(text: str) -> str:
    """``text`` without code, maths, link targets, comments and version numbers (line breaks kept)."""
    for pattern in PROSE_DROP:
        text = pattern.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return text


def stated_numbers(text: str) -> list[tuple[int, str]]:
    """(line, number) for every number with a sign or a decimal point in the prose of ``text``."""
    found = []
    for lineno, line in enumerate(prose(text).splitlines(), 1):
        for m in NUMBER.finditer(line):
            sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
            if sign == "-" and m.start() > 0 and line[m.start() - 1].isdigit():
                continue   # a range such as 8-10
            if sign or frac:
                found.append((lineno, sign + whole + frac))
    return found


def _key(number: str) -> str:
    """The comparable form: no thousands separator, a true minus, no plus sign."""
    return number.replace(",", "").replace("−", "-").lstrip("+")


def produced_numbers(texts: Iterable[str]) -> set[str]:
    """Every number in ``texts`` exactly as printed (no thousands separator, a true minus), so that a
    stated number matches only an output that shows it with the same digits."""
    return {_key(m.group(0)) for text in texts for m in re.finditer(r"[\-−]?\d+(?:,\d{3})*(?:\.\d+)?", text)}


def notebook_texts(notebooks: Iterable[Path]) -> list[str]:
    """The outputs (text, HTML tables, streams, glued values) of the executed ``notebooks``."""
    texts = []
    for path in notebooks:
        for cell in json.loads(path.read_text()).get("cells", []):
            for output in cell.get("outputs", []):
                if "text" in output:
                    texts.append("".join(output["text"]))
                for mime in ("text/plain", "text/html", "text/markdown"):
                    value = output.get("data", {}).get(mime)
                    if value:
                        texts.append("".join(value))
    return texts


def published_texts() -> list[str]:
    """The published numbers of :mod:`csa.compare.published`."""
    from csa.compare.published import PUBLISHED

    return [PUBLISHED.to_csv(index=False)]


def committed_texts() -> list[str]:
    """Generated includes, committed demo results and the benchmark logs."""
    files = [*(BOOK / "generated").glob("*.md"), *(REPO / "data" / "demo" / "results").glob("*.csv"),
             *(REPO / "benchmarks").glob("*.md")]
    return [p.read_text() for p in sorted(files)] + published_texts()


def page_notebooks(page: Path, executed: Path = EXECUTED, toc: Path = BOOK / "_toc.yml") -> list[Path]:
    """The executed notebooks a page may quote: its own sections in the table of contents, or every
    notebook for a page without notebook sections (the README, the introduction, the reference pages)."""
    import yaml

    def own(entries) -> list[str]:
        for entry in entries or []:
            if entry.get("file") == page.stem:
                return [s["file"] for s in entry.get("sections", []) if s["file"].startswith("notebooks/")]
            found = own(entry.get("sections")) or own(entry.get("chapters"))
            if found:
                return found
        return []

    spec = yaml.safe_load(toc.read_text())
    names = own([c for part in spec.get("parts", []) for c in part.get("chapters", [])])
    every = sorted(executed.glob("*.ipynb"))
    return [p for p in every if f"notebooks/{p.stem}" in names] if names else every


INTERVAL = re.compile(r"\[\s*([+\-−]?\d+(?:\.\d+)?)\s*,\s*([+\-−]?\d+(?:\.\d+)?)\s*\]")


def _interval_keys(text: str) -> set[tuple[str, str]]:
    return {(_key(a), _key(b)) for a, b in INTERVAL.findall(text)}


def chapters() -> list[Path]:
    """The prose pages of the book and the README."""
    return [*sorted(BOOK.glob("*.md")), REPO / "README.md"]


def unproduced(page: Path, texts: list[str]) -> list[str]:
    """``file:line: number`` for every number (and interval) of ``page``'s prose that ``texts`` lack."""
    known = produced_numbers(texts) | set(ALLOWED)
    intervals = set().union(*(_interval_keys(t) for t in texts))
    text = page.read_text()
    name = page.relative_to(REPO) if page.is_relative_to(REPO) else page.name
    missing = [f"{name}:{line}: {number}" for line, number in stated_numbers(text)
               if _key(number) not in known]
    for lineno, line in enumerate(prose(text).splitlines(), 1):
        missing += [f"{name}:{lineno}: interval {m.group(0)}" for m in INTERVAL.finditer(line)
                    if (_key(m.group(1)), _key(m.group(2))) not in intervals]
    return missing


def check(pages: Iterable[Path], executed: Path = EXECUTED) -> list[str]:
    """Every unproduced number of ``pages`` against the committed sources and the executed notebooks."""
    committed = committed_texts()
    return [m for page in pages for m in unproduced(page, committed + notebook_texts(page_notebooks(page, executed)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executed", type=Path, default=EXECUTED, help="folder of the executed notebooks")
    args = parser.parse_args(argv)
    if not any(args.executed.glob("*.ipynb")):
        print(f"no executed notebooks in {args.executed}; run scripts/run_all.sh first", file=sys.stderr)
        return 2
    missing = check(chapters(), args.executed)
    for line in missing:
        print(line)
    if missing:
        print(f"{len(missing)} number(s) in the prose come from no generated file, result or executed notebook; "
              f"take them from the run (an include or a glue) or drop them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
