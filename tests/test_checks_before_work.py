"""Arguments are checked before long work starts, in the command line and in the notebooks alike,
and the API's edges give one clear error."""
from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DEMO_ROOT, REPO_ROOT
from csa.cli import main as csa_main
from csa.compare.diffusion import _conjugate_gradient
from csa.data.r1m import load_distractors
from csa.model import RerankTransformer
from csa.notebook.batch import run_grid
from csa.rerank import rerank
from csa.training.launch import failed_process, peer_lost_error
from csa.validation import CSAError, CSAInputError
from test_batch import write_grid_notebook

PARIS = "rparis6k-mini-train"


def one_error(capsys, argv: list[str]) -> str:
    """Run ``csa argv``; it must exit 2 with exactly one line on stderr, which is returned."""
    assert csa_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, fact", [
    (["seeds", "--setting", "demo", "--out", "{tmp}"], "--out .* is a folder; give a file path"),
    (["select", "--folds", "0", "--out", "{tmp}/x.csv"], r"folds \(--folds\) must be >= 2, got 0"),
    (["select", "--folds", "1000", "--out", "{tmp}/x.csv"], "1000 folds for 10 landmarks"),
    (["curve", "--setting", "demo", "--fractions", "1.5", "--out", "{tmp}/x.csv"], "must be <= 1.0, got 1.5"),
    (["curve", "--setting", "demo", "--fractions", "0", "--out", "{tmp}/x.csv"], "must be > 0.0, got 0.0"),
    (["curve", "--setting", "nope", "--out", "{tmp}/x.csv"], "unknown setting 'nope'"),
    (["seeds", "--setting", "demo", "--seeds", "1", "1", "--out", "{tmp}/x.csv"], "distinct"),
    (["seeds", "--setting", "demo", "--seeds", "-1", "--out", "{tmp}/x.csv"], r"seed \(--seeds\) must be >= 0"),
])
def test_demo_experiments_check_their_arguments_before_training(tmp_path, capsys, monkeypatch, argv, fact):
    from csa.experiments import held_out, selection

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(selection, "train_demo_model", never)
    monkeypatch.setattr(held_out, "train_demo_model", never)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    line = one_error(capsys, ["demo", argv[0], "--root", str(DEMO_ROOT), "--trainset", PARIS, *argv[1:]])
    assert line.startswith("csa demo: error:") and re.search(fact, line), line
    assert not (tmp_path / "x.csv").exists()


def test_library_experiments_check_too(tmp_path):
    from csa.experiments.learning_curve import learning_curve
    from csa.experiments.selection import select_recipe

    with pytest.raises(CSAInputError, match="--fractions"):
        learning_curve(DEMO_ROOT, PARIS, {}, fractions=(0.5, 1.5))
    with pytest.raises(CSAInputError, match="--folds"):
        select_recipe(DEMO_ROOT, PARIS, n_folds=0)
    with pytest.raises(CSAInputError, match="no trainset"):
        select_recipe(tmp_path, PARIS)


def parameter_cells(notebook: str, monkeypatch, **injected) -> dict:
    """Run a notebook's cells up to its parameter check, with papermill's injected values, in-process."""
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    nb = nbformat.read(str(REPO_ROOT / "notebooks" / notebook), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    at = next(i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    for cell in code[:at + 1]:
        exec("\n".join(line for line in cell.source.splitlines() if not line.startswith("%")), namespace)
    namespace.update(injected)
    exec(code[at + 1].source, namespace)                         # the check cell right after `parameters`
    return namespace


@pytest.mark.parametrize("notebook, injected, fact", [
    ("01_data_preparation.ipynb", {"image_size": -512}, "image_size=-512 is invalid: expected a positive integer"),
    ("01_data_preparation.ipynb", {"num_workers": -1}, "num_workers=-1"),
    ("02_training.ipynb", {"trainsets": "nope"}, r"trainsets names \['nope'\], which have no annotation"),
    ("02_training.ipynb", {"overrides": "recipe=paper"}, "sets the recipe, which overrides cannot change"),
    ("02_training.ipynb", {"overrides": "num_epochs=0"}, "--num-epochs must be >= 1"),
    ("02_training.ipynb", {"overrides": "warmup_epochs=500"}, "--warmup-epochs"),
    ("03_reranking.ipynb", {"n_boot": 10}, "n_boot=10 is invalid: expected an integer >= 100"),
    ("03_reranking.ipynb", {"topk": 0}, "topk=0 is invalid"),
    ("05_comparison.ipynb", {"topk": 0}, "topk=0 is invalid: expected an integer >= 5 .*k2"),
    ("05_comparison.ipynb", {"n_boot": 10}, "n_boot=10"),
    ("04_qualitative_top10.ipynb", {"k": 0}, "k=0 is invalid"),
    ("06_ablation.ipynb", {"n_boot": 10}, "n_boot=10 is invalid"),
])
def test_notebook_parameters_are_checked_right_after_the_parameters_cell(monkeypatch, notebook, injected, fact):
    with pytest.raises(CSAInputError, match=fact):
        parameter_cells(notebook, monkeypatch, **injected)


def test_notebook_defaults_pass_their_checks(monkeypatch):
    for notebook in ("01_data_preparation.ipynb", "02_training.ipynb", "03_reranking.ipynb",
                     "04_qualitative_top10.ipynb", "05_comparison.ipynb", "06_ablation.ipynb"):
        assert parameter_cells(notebook, monkeypatch)["guard"]


def test_batch_refuses_an_out_folder_holding_another_grids_runs(tmp_path):
    nb = write_grid_notebook(tmp_path / "grid.ipynb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(CSAInputError, match="results.csv this batch did not write"):
        run_grid(nb, {"topk": [2]}, out, progress=False)
    (out / "other__topk-1.ipynb").write_text("{}")
    with pytest.raises(CSAInputError, match=r"runs of another grid \(other__topk-1.ipynb\)"):
        run_grid(nb, {"topk": [2]}, out, progress=False)
    (out / "other__topk-1.ipynb").unlink()
    (out / "batch.json").write_text(json.dumps({"notebook": "grid", "keys": ["anchor_len"], "tables": {}}))
    with pytest.raises(CSAInputError, match=r"the batch 'grid' over \['anchor_len'\]"):
        run_grid(nb, {"topk": [2]}, out, progress=False)
    assert (out / "results.csv").read_text() == "a,b\n1,2\n"        # nothing replaced
    (out / "batch.json").write_text("{broken")
    with pytest.raises(CSAInputError, match="batch.json is damaged"):
        run_grid(nb, {"topk": [2]}, out, progress=False)
    (out / "batch.json").unlink()                                # a folder from before batch.json ...
    (out / "grid__topk-2.ipynb").write_text("{}")               # ... holding a run of this grid is adopted
    from csa.notebook.batch import _check_same_batch
    _check_same_batch(out, {}, nb, ["topk"], ["grid__topk-2"])


@pytest.mark.slow
def test_batch_runs_again_a_table_edited_after_its_run(tmp_path, capsys):
    nb = write_grid_notebook(tmp_path / "grid.ipynb")
    out = tmp_path / "out"
    first = run_grid(nb, {"topk": [2, 3]}, out, progress=False)
    assert first.ok
    expected = first.table["map"].tolist()
    edited = out / "runs" / "grid__topk-2.csv"
    table = pd.read_csv(edited)
    table["map"] = table["map"] + 1000
    table.to_csv(edited, index=False)
    again = run_grid(nb, {"topk": [2, 3]}, out, progress=False)
    assert again.skipped == ["grid__topk-3"]                    # the edited run ran again, the other did not
    assert "grid__topk-2.csv changed after its run finished" in capsys.readouterr().err
    assert pd.read_csv(out / "results.csv")["map"].tolist() == expected       # recomputed, not the edit


def test_rerank_on_an_unknown_device_is_a_clear_error():
    model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2).eval()
    rng = np.random.default_rng(0)
    db = rng.standard_normal((20, 8)).astype(np.float32)
    ranks = np.argsort(-db @ db[:2].T, axis=0)
    with pytest.raises(CSAInputError, match="unknown device 'tpu'"):
        rerank(model, db[:2], db, ranks, topk=8, anchor_len=8, device="tpu", progress=False)


def test_load_distractors_refuses_what_is_not_one_npy_array(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((3, 4), np.float32))
    with pytest.raises(CSAInputError, match="not a .npy file"):
        load_distractors(tmp_path / "x.npz")
    (tmp_path / "x.npz").replace(tmp_path / "disguised.npy")
    with pytest.raises(CSAInputError, match="not a single .npy array"):
        load_distractors(tmp_path / "disguised.npy")


def test_conjugate_gradient_stops_at_a_breakdown_instead_of_dividing_by_zero():
    b = np.array([1.0, 2.0, 3.0])
    # an operator whose curvature underflows to exactly 0 (p @ Ap == 0) on the first step
    assert np.array_equal(_conjugate_gradient(lambda v: np.zeros_like(v), b, iterations=5), np.zeros(3))
    with np.errstate(invalid="ignore"):
        x = _conjugate_gradient(lambda v: np.full_like(v, np.nan), b, iterations=5)
    assert np.array_equal(x, np.zeros(3))
    a = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])  # SPD: solved to tolerance as before
    np.testing.assert_allclose(_conjugate_gradient(lambda v: a @ v, b, iterations=50, tol=1e-12),
                               np.linalg.solve(a, b), rtol=1e-9)


# the failure summary torchrun prints when a worker dies (its documented "Root Cause" layout)
TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
csa.training FAILED
------------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 4100)
  traceback : Signal 15 (SIGTERM) received by PID 4100
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_22:21:32
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4101)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4101
============================================================"""


def test_a_killed_training_process_is_named_in_one_line(monkeypatch):
    said = failed_process(TORCHRUN_REPORT.splitlines())
    assert said.startswith("training process rank 1 (pid 4101) was killed by SIGKILL")
    assert failed_process(TORCHRUN_REPORT.replace("-9 (pid: 4101)", "3 (pid: 4101)").splitlines()) == \
        "training process rank 1 (pid 4101) exited with status 3"
    assert failed_process(["Traceback (most recent call last):", "ValueError: x"]) is None
    monkeypatch.setenv("RANK", "0")
    lost = peer_lost_error(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                        "[127.0.0.1]:3001"))
    assert isinstance(lost, CSAError) and "\n" not in str(lost)
    assert str(lost).startswith("rank 0: another training process stopped")
    assert peer_lost_error(RuntimeError("CUDA out of memory")) is None
    assert torch.distributed.is_available()


def test_launch_reports_the_first_cause_not_a_rank_that_lost_its_peer(tmp_path, monkeypatch):
    import csa.training.launch as launch
    from _train_helpers import tiny_config

    output = ["csa train: error: rank 1: another training process stopped (killed or crashed), so this one ...",
              "csa train: error: the disk is full (or a file-size limit was reached) while writing run/checkpoint.pth",
              *TORCHRUN_REPORT.replace("-9 (pid: 4101)", "1 (pid: 4101)").splitlines()]

    class FinishedRun:                                          # what Popen gives back: the run's output, status 1
        def __init__(self, *args, **kwargs):
            self.stdout = iter(line + "\n" for line in output)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait(self):
            return 1

    monkeypatch.setattr(launch.subprocess, "Popen", FinishedRun)
    with pytest.raises(RuntimeError, match=r"^training failed: the disk is full .*checkpoint.pth$"):
        launch.launch_training(tiny_config(tmp_path), nproc_per_node=2, echo=lambda _: None)
