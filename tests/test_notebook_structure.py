"""Static checks of the committed notebooks: what papermill, the batch runner and the book rely on."""

from __future__ import annotations

import ast
import re

import nbformat
import papermill as pm
import pytest

from conftest import REPO_ROOT

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == [
        "00_inference_in_a_few_lines", "01_data_preparation", "02_training", "03_reranking",
        "04_qualitative_top10", "05_comparison", "06_ablation", "07_recipe_selection", "08_paper_table",
        "09_what_csa_computes", "11_worked_example",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_its_parameters_are_visible_to_papermill(path):
    nb = nbformat.read(str(path), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assigned = {t.id for node in ast.parse(tagged[0].source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    # papermill parses the cell with regexes: a name it cannot parse could not be set with -p
    assert set(pm.inspect_notebook(str(path))) == assigned
    # the cell right after the parameters one checks them (unknown names fail fast)
    index = nb.cells.index(tagged[0])
    assert "guard.check(" in nb.cells[index + 1].source
    # one H1 title (myst-nb's -W build requires it) and no skipped heading levels
    headings = [len(m.group(1)) for c in nb.cells if c.cell_type == "markdown"
                for m in re.finditer(r"^(#+) ", c.source, flags=re.M)]
    assert headings.count(1) == 1 and headings[0] == 1
    assert all(b - a <= 1 for a, b in zip(headings, headings[1:]))
