"""Every notebook runs top to bottom under papermill with tiny parameters, on the embedded demo.

The executed notebooks are shared (session fixture ``executed_notebooks`` in conftest.py) with the book
test, which builds the book from them. Each test here checks what a reader would look for in the output.
"""

from __future__ import annotations

import json

import nbformat
import papermill as pm
import pytest

from conftest import REPO_ROOT, _tiny_parameters

pytestmark = pytest.mark.slow


def _text(nb: nbformat.NotebookNode) -> str:
    """All text and HTML outputs of a notebook, concatenated."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    parts.append(out["data"][key])
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_data_preparation_reports_first_stage_far_above_random(executed_notebooks):
    nb = executed_notebooks.notebooks["01_data_preparation"]
    text = _text(nb)
    assert "roxford5k-mini" in text and "rparis6k-mini" in text
    import pandas as pd

    table = pd.read_csv(executed_notebooks.csv["01_data_preparation"])
    medium = table[table["protocol"] == "medium"].set_index("dataset")
    assert (medium["mAP"] > 3 * medium["random mAP"]).all(), medium
    assert _images(nb) >= 1  # the query / positives figure


def test_training_ran_under_torchrun_and_wrote_checkpoints(executed_notebooks):
    nb = executed_notebooks.notebooks["02_training"]
    text = _text(nb)
    assert "torch.distributed.run" in text and "--nproc_per_node=2" in text
    for trainset in ("rparis6k-mini-train", "roxford5k-mini-train"):
        run = executed_notebooks.runs / trainset
        assert (run / "checkpoint.pth").is_file() and (run / "history.csv").is_file()
        history = json.loads((run / "history.json").read_text())
        assert len(history) == executed_notebooks.epochs
    assert _images(nb) == 2  # one curve figure per run


def test_inference_notebook_prints_both_evaluations(executed_notebooks):
    text = _text(executed_notebooks.notebooks["00_inference_in_a_few_lines"])
    assert "first stage" in text and "CSA top-" in text and "mAP" in text


def test_reranking_table_has_every_method_and_dataset(executed_notebooks):
    import pandas as pd

    nb = executed_notebooks.notebooks["03_reranking"]
    table = pd.read_csv(executed_notebooks.csv["03_reranking"])
    assert set(table["dataset"]) == {"roxford5k-mini", "rparis6k-mini"}
    assert table.groupby("dataset").size().tolist() == [4, 4]  # first stage, 2 affinity baselines, CSA
    assert table[["easy_map", "medium_map", "hard_map"]].notna().all().all()
    assert ((table[["easy_map", "medium_map", "hard_map"]] >= 0) & (table[["easy_map", "medium_map", "hard_map"]] <= 100)).all().all()
    assert (table["ms_per_query"].dropna() > 0).all()
    assert "Published numbers" in "\n".join(c.source for c in nb.cells)
    assert _images(nb) == 1


def test_qualitative_figures_follow_the_selection_rule(executed_notebooks):
    import pandas as pd

    nb = executed_notebooks.notebooks["04_qualitative_top10"]
    text = _text(nb)
    shown = pd.read_csv(executed_notebooks.csv["04_qualitative_top10"])
    assert _images(nb) >= 1 and _images(nb) == len(shown) == int(text.split(" figures")[0].split()[-1])
    for row in shown.itertuples():   # a success gained AP, a failure lost AP (the selection rule)
        assert (row.ap_after > row.ap_before) if row.kind == "success" else (row.ap_after < row.ap_before)
    for dataset in ("roxford5k-mini", "rparis6k-mini"):
        kinds = set(shown[shown["dataset"] == dataset]["kind"])
        for kind in {"success", "failure"} - kinds:   # a missing kind is said, not silently skipped
            assert f"{dataset}: no query" in text and f"no {kind} to show" in text


def test_comparison_covers_the_baselines(executed_notebooks):
    import pandas as pd

    table = pd.read_csv(executed_notebooks.csv["05_comparison"])
    methods = set(table["method"])
    assert {"first stage", "AQE", "αQE", "diffusion", "k-reciprocal", "CSA"} <= methods
    assert _images(executed_notebooks.notebooks["05_comparison"]) == 1


def test_ablation_collects_one_row_per_run_and_method(executed_notebooks):
    import pandas as pd

    table = pd.read_csv(executed_notebooks.ablation / "results.csv")
    assert sorted(set(table["topk"])) == [16, 32]
    # 2 runs x 2 datasets x 4 rows (first stage, two affinity baselines, CSA)
    assert len(table) == 16
    assert _images(executed_notebooks.notebooks["06_ablation"]) >= 2


def test_method_notebook_headline_equals_the_reranking_notebook(executed_notebooks):
    import pandas as pd

    headline = pd.read_csv(executed_notebooks.csv["09_what_csa_computes"]).set_index("dataset")
    table = pd.read_csv(executed_notebooks.csv["03_reranking"])
    csa = table[table["method"] == "CSA"].set_index("dataset")
    assert set(headline.index) == set(csa.index) == {"roxford5k-mini", "rparis6k-mini"}
    columns = ["medium_map", "medium_gain", "medium_gain_low", "medium_gain_high", "landmarks"]
    pd.testing.assert_frame_equal(headline.loc[csa.index, columns], csa[columns], check_exact=False, rtol=1e-9,
                                  check_dtype=False)
    # affinity views (two), attention, score distributions, rank moves, headline, sorted AP gains
    assert _images(executed_notebooks.notebooks["09_what_csa_computes"]) == 7


def test_worked_example_checks_every_step_against_the_package(executed_notebooks):
    text = _text(executed_notebooks.notebooks["11_worked_example"])
    for step in ("A", "X0", "output tokens", "scores", "contrastive loss", "R", "reconstruction loss", "total loss"):
        assert f"check {step}: equal to the package" in text
    assert "A (17, 16)" in text                  # K + 1 = 17 tokens, L = 16 anchors with the tiny parameters


def test_unknown_parameter_fails_fast_with_a_clear_message(tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match=r"unknown parameter 'topK' \(did you mean 'topk'\?\)"):
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "00_inference_in_a_few_lines.ipynb"),
                            str(tmp_path / "out.ipynb"), parameters={"topK": 5}, kernel_name="python3",
                            cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)


@pytest.mark.parametrize("parameters, fact", [
    ({"overrides": "num_epochs=-1"}, r"--num-epochs must be >= 1"),
    ({"trainsets": ""}, r"trainsets='' names nothing"),
])
def test_training_notebook_refuses_bad_parameters_before_torchrun(tmp_path, parameters, fact):
    with pytest.raises(pm.PapermillExecutionError, match=fact) as err:
        pm.execute_notebook(str(REPO_ROOT / "notebooks" / "02_training.ipynb"), str(tmp_path / "out.ipynb"),
                            parameters={"output_root": str(tmp_path / "runs"), **parameters},
                            kernel_name="python3", cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)
    assert err.value.ename == "CSAInputError"          # the notebook's own error, not a torchrun trace
    assert not (tmp_path / "runs").exists()             # nothing trained, nothing written


def test_reranking_notebook_streams_r1m_distractors_from_the_memory_map(executed_notebooks, tmp_path):
    """Notebook 3 with `r1m`: the distractors stay a float16 memory map (csa.largescale); its first-stage mAPs
    equal the in-memory ranking of the concatenated database, and distractors can only lower them."""
    import numpy as np
    import pandas as pd

    from csa.data.layout import load_gnd, load_test_features
    from csa.data.r1m import simulate_distractors
    from csa.evaluate import evaluate_revisited
    from csa.search import first_stage

    feats = {d: load_test_features(str(REPO_ROOT / "data" / "demo"), d, "lite0-gem")
             for d in ("roxford5k-mini", "rparis6k-mini")}
    dim = feats["roxford5k-mini"].db.shape[1]
    dis = simulate_distractors(3000, dim, seed=1, dtype="float16", path=tmp_path / "r1m.npy", progress=False)
    params = {**_tiny_parameters(executed_notebooks)["03_reranking"], "r1m": str(tmp_path / "r1m.npy"),
              "results_csv": str(tmp_path / "r1m.csv")}
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / "03_reranking.ipynb"), str(tmp_path / "out.ipynb"),
                        parameters=params, kernel_name="python3", cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)
    table = pd.read_csv(tmp_path / "r1m.csv").set_index(["dataset", "method"])
    without = pd.read_csv(executed_notebooks.csv["03_reranking"]).set_index(["dataset", "method"])
    for dataset, f in feats.items():
        full = np.concatenate([f.db, np.asarray(dis, dtype=np.float32)])
        expected = evaluate_revisited(first_stage(f.query, full), load_gnd(str(REPO_ROOT / "data" / "demo"), dataset))
        row = table.loc[(dataset, "first stage")]
        for proto in ("easy", "medium", "hard"):
            assert row[f"{proto}_map"] == pytest.approx(expected[proto]["map"], abs=1e-9)
            assert row[f"{proto}_map"] <= without.loc[(dataset, "first stage"), f"{proto}_map"] + 1e-9
        assert set(table.loc[dataset].index) == {"first stage", "affinity cosine", "affinity cosine (centred)", "CSA"}
