"""Tests of csa.notebook.batch: value parsing, fail-fast parameter checks, and real papermill grid runs."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from _subprocess import run
from csa.cli import main as csa_main
from csa.notebook.batch import parse_grid, parse_params, parse_value, run_grid, run_name
from csa.validation import CSAInputError


def write_grid_notebook(path: Path, fail_when_topk: int | None = None) -> Path:
    """A tiny notebook: a parameters cell, then a cell writing a 2-row table derived from the parameters."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("topk = 8\nanchor_len = 4\nlabel = 'x'\nresults_csv = 'out.csv'")
    params.metadata["tags"] = ["parameters"]
    body = (
        "import os\nimport pandas as pd\n"
        f"if {fail_when_topk!r} is not None and topk == {fail_when_topk!r}:\n"
        "    raise RuntimeError(f'boom at topk={topk}')\n"
        "pd.DataFrame({'protocol': ['medium', 'hard'], 'map': [topk + anchor_len, topk * anchor_len],\n"
        "              'label': [label, label], 'cwd': [os.getcwd()] * 2}).to_csv(results_csv, index=False)\n"
    )
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    return path


def test_parse_value_literals_and_strings():
    assert parse_value("128") == 128 and isinstance(parse_value("128"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("None") is None and parse_value("True") is True
    assert parse_value("roxford5k-mini") == "roxford5k-mini"
    assert parse_value("'quoted'") == "quoted"
    assert parse_value("[1, 2]") == [1, 2]


def test_parse_grid_and_params():
    assert parse_grid(["topk=128,256", "name=a,b"]) == {"topk": [128, 256], "name": ["a", "b"]}
    assert parse_params(["dataset=rparis6k-mini", "epochs=3"]) == {"dataset": "rparis6k-mini", "epochs": 3}
    with pytest.raises(CSAInputError, match="key=value"):
        parse_grid(["topk"])
    with pytest.raises(CSAInputError, match="twice"):
        parse_grid(["topk=1", "topk=2"])
    with pytest.raises(CSAInputError, match="empty value"):
        parse_grid(["topk=1,"])
    with pytest.raises(CSAInputError, match="key=value"):
        parse_params(["1x=3"])


def test_run_name_is_file_safe():
    assert run_name("nb/03_reranking.ipynb", {"topk": 128, "tag": "a b/c"}) == "03_reranking__topk-128_tag-a-b-c"


def test_unknown_parameter_fails_fast_with_clear_message(tmp_path, capsys):
    nb = write_grid_notebook(tmp_path / "grid.ipynb")
    with pytest.raises(CSAInputError, match=r"no parameter\(s\) \['topK'\].*anchor_len"):
        run_grid(nb, {"topK": [1, 2]}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing was run or written
    assert csa_main(["batch", str(nb), "--grid", "topk=1", "--param", "bogus=1",
                     "--out", str(tmp_path / "out")]) == 2
    assert "bogus" in capsys.readouterr().err


def test_notebook_without_parameters_cell_or_results_csv_is_refused(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("topk = 1")]
    nbformat.write(nb, str(tmp_path / "plain.ipynb"))
    with pytest.raises(CSAInputError, match="parameters"):
        run_grid(tmp_path / "plain.ipynb", {"topk": [1]}, tmp_path / "out", progress=False)
    nb.cells[0].metadata["tags"] = ["parameters"]
    nbformat.write(nb, str(tmp_path / "plain.ipynb"))
    with pytest.raises(CSAInputError, match="results_csv"):
        run_grid(tmp_path / "plain.ipynb", {"topk": [1]}, tmp_path / "out", progress=False)
    with pytest.raises(CSAInputError, match="both"):
        run_grid(tmp_path / "plain.ipynb", {"topk": [1]}, tmp_path / "out", params={"topk": 2}, progress=False)


@pytest.mark.slow
def test_grid_2x2_collects_four_runs_into_one_csv(tmp_path):
    nb = write_grid_notebook(tmp_path / "grid.ipynb")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "csa", "batch", str(nb), "--grid", "topk=2,3", "anchor_len=10,20",
           "--param", "label=run", "--out", str(out), "--no-progress"]
    proc = run(cmd)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "results.csv")
    assert list(table.columns) == ["topk", "anchor_len", "protocol", "map", "label", "cwd"]
    # 4 runs x 2 rows, in grid order (first key slowest), values computed inside each notebook run
    assert table["topk"].tolist() == [2, 2, 2, 2, 3, 3, 3, 3]
    assert table["anchor_len"].tolist() == [10, 10, 20, 20, 10, 10, 20, 20]
    assert table["map"].tolist() == [12, 20, 22, 40, 13, 30, 23, 60]
    assert set(table["label"]) == {"run"}
    assert set(table["cwd"]) == {str(tmp_path.resolve())}  # runs start in the notebook's folder
    names = sorted(p.name for p in out.glob("*.ipynb"))
    assert names == ["grid__topk-2_anchor_len-10.ipynb", "grid__topk-2_anchor_len-20.ipynb",
                     "grid__topk-3_anchor_len-10.ipynb", "grid__topk-3_anchor_len-20.ipynb"]
    executed = nbformat.read(str(out / "grid__topk-3_anchor_len-20.ipynb"), as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "topk = 3" in injected[0].source


@pytest.mark.slow
def test_failing_run_is_reported_and_other_rows_kept(tmp_path, capsys):
    nb = write_grid_notebook(tmp_path / "grid.ipynb", fail_when_topk=3)
    out = tmp_path / "out"
    status = csa_main(["batch", str(nb), "--grid", "topk=2,3", "anchor_len=5", "--out", str(out), "--no-progress"])
    assert status == 1
    err = capsys.readouterr().err
    assert "grid__topk-3_anchor_len-5" in err and "RuntimeError" in err and "boom at topk=3" in err
    table = pd.read_csv(out / "results.csv")
    assert table["topk"].tolist() == [2, 2]
    assert table["map"].tolist() == [7, 10]
    assert not list(out.glob(".results.csv.*"))  # no temporary file left behind
