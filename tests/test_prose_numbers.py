"""Numbers stated in the prose must come from the run (book/check_numbers.py)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("check_numbers", REPO / "book" / "check_numbers.py")
check_numbers = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(check_numbers)


def _notebook(path: Path, *outputs: dict) -> Path:
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "source": "", "execution_count": 1,
              "outputs": [output]} for i, output in enumerate(outputs)]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_stated_numbers_are_signed_or_decimal_and_outside_code_and_maths():
    text = ("CSA gains +3.6 [+2.2, +4.7] over 11 landmarks, 8-10 of them, 1,564 photos; the loss fell to 0.25.\n"
            "`topk=0.75` and $t = 0.5$ are not prose, nor torch 2.14.1 or [a link](x-1.5.html).\n"
            "```python\nprint(-7.5)\n```\n"
            "Lost -2.1 points, 2,650.5 hours.\n")
    assert check_numbers.stated_numbers(text) == [(1, "+3.6"), (1, "+2.2"), (1, "+4.7"), (1, "0.25"),
                                                  (6, "-2.1"), (6, "2,650.5")]


def test_a_typed_number_the_run_did_not_produce_is_reported(tmp_path):
    page = tmp_path / "chapter.md"
    page.write_text("The run gains +3.6 [+2.2, +4.7]; the centred cosine 69.3 and diffusion -4.9.\n")
    executed = [{"output_type": "execute_result", "execution_count": 1, "metadata": {},
                 "data": {"text/plain": "CSA  67.2  +3.6 [+2.2, +4.7] *\ncentred  69.3"}}]
    texts = check_numbers.notebook_texts([_notebook(tmp_path / "05.ipynb", *executed)])
    missing = check_numbers.unproduced(page, texts)
    assert [m.split(": ", 1)[1] for m in missing] == ["-4.9"]
    # an interval must appear as that pair, not as two numbers found apart
    page.write_text("CSA minus it -2.1 [-3.6, +4.7].\n")
    texts = ["-2.1 [-3.6, -1.1]", "+4.7"]
    assert [m.split(": ", 1)[1] for m in check_numbers.unproduced(page, texts)] == ["interval [-3.6, +4.7]"]
    # a positive number matches its unsigned print, a negative one needs its minus sign
    page.write_text("gains +5.7, loses -0.9\n")
    assert [m.split(": ", 1)[1] for m in check_numbers.unproduced(page, ["5.7 0.9"])] == ["-0.9"]


def test_a_chapter_quotes_only_its_own_notebooks(tmp_path):
    for name in ("03_reranking", "05_comparison"):
        _notebook(tmp_path / f"{name}.ipynb")
    toc = tmp_path / "_toc.yml"
    toc.write_text("format: jb-book\nroot: intro\nparts:\n  - caption: x\n    chapters:\n"
                   "      - file: comparison\n        sections:\n          - file: notebooks/05_comparison\n"
                   "      - file: build\n")
    own = check_numbers.page_notebooks(Path("comparison.md"), tmp_path, toc)
    assert [p.stem for p in own] == ["05_comparison"]
    every = check_numbers.page_notebooks(Path("build.md"), tmp_path, toc)
    assert [p.stem for p in every] == ["03_reranking", "05_comparison"]


def test_the_allow_list_is_short_and_explained():
    assert len(check_numbers.ALLOWED) <= 10
    assert all(len(reason) > 20 for reason in check_numbers.ALLOWED.values())


def test_every_chapter_number_comes_from_the_run():
    """Against the generated includes, the committed results and the executed notebooks of the main job."""
    if not any(check_numbers.EXECUTED.glob("*.ipynb")):
        pytest.skip("no executed notebooks in book/notebooks/ (scripts/run_all.sh writes them)")
    if any(json.loads(p.read_text()).get("metadata", {}).get("papermill", {}).get("parameters")
           for p in check_numbers.EXECUTED.glob("*.ipynb")):
        pytest.skip("book/notebooks/ holds runs with non-default parameters (tests' tiny runs?)")
    missing = check_numbers.check(check_numbers.chapters())
    assert not missing, ("numbers in the prose that no generated file, committed result or executed notebook "
                         "produced:\n" + "\n".join(missing))
