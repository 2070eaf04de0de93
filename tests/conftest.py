"""Shared test fixtures: repository paths and the embedded demo's descriptors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _subprocess import run as run_isolated

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEMO_ROOT = REPO_ROOT / "data" / "demo"




@pytest.fixture()
def one_torch_thread():
    """Run the test on one torch thread (training results are then bit-reproducible across runs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_features() -> Path:
    """The demo data root with descriptors extracted (the main job's first step; a no-op when up to date)."""
    run_isolated([sys.executable, "-m", "csa", "demo", "extract", "--root", str(DEMO_ROOT)], check=True, cwd=REPO_ROOT)
    return DEMO_ROOT


class ExecutedNotebooks:
    """Where the session's papermill runs went: executed notebooks, their CSV tables, training runs."""

    def __init__(self, root: Path, epochs: int):
        self.root = root
        self.out = root / "notebooks"
        self.runs = root / "runs"
        self.ablation = root / "ablation"
        self.epochs = epochs
        self.notebooks: dict = {}
        self.csv: dict[str, Path] = {}


# Tiny parameters: a few-minute run of every notebook on the real demo data.
TINY_EPOCHS = 2


def _tiny_parameters(ex: ExecutedNotebooks) -> dict[str, dict]:
    runs = ex.runs
    ckpts = (f"roxford5k-mini:{runs / 'rparis6k-mini-train' / 'checkpoint.pth'},"
             f"rparis6k-mini:{runs / 'roxford5k-mini-train' / 'checkpoint.pth'}")
    data = str(DEMO_ROOT)
    return {
        "01_data_preparation": {"data_root": data},
        "02_training": {"data_root": data, "output_root": str(runs), "nproc_per_node": 2,
                        "overrides": f"num_epochs={TINY_EPOCHS}, warmup_epochs=1, topk=16, anchor_len=16, "
                                     "embed_dim=32, num_heads=4, batch_size=16"},
        "00_inference_in_a_few_lines": {"data_root": data, "topk": 32,
                                        "checkpoint": str(runs / "rparis6k-mini-train" / "checkpoint.pth")},
        "03_reranking": {"data_root": data, "checkpoints": ckpts, "topk": 32, "n_boot": 200},
        "04_qualitative_top10": {"data_root": data, "checkpoints": ckpts, "topk": 32, "n_examples": 1},
        "05_comparison": {"data_root": data, "checkpoints": ckpts, "topk": 32, "n_boot": 200},
        "07_recipe_selection": {"data_root": data},
        "08_paper_table": {"data_root": data, "n_boot": 200},
        "06_ablation": {"checkpoints": ckpts, "topk_grid": "16,32", "anchor_grid": "16", "n_boot": 100,
                        "out_dir": str(ex.ablation), "notebook": str(REPO_ROOT / "notebooks" / "03_reranking.ipynb")},
        "09_what_csa_computes": {"data_root": data, "checkpoints": ckpts, "topk": 32, "n_boot": 200,
                                 "example": "roxford5k-mini"},
        "11_worked_example": {"data_root": data, "topk": 16,
                              "checkpoint": str(runs / "roxford5k-mini-train" / "checkpoint.pth")},
    }


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory, demo_features) -> ExecutedNotebooks:
    """Run every notebook once with tiny parameters (in the main job's order); later tests inspect them."""
    import nbformat
    import papermill as pm

    ex = ExecutedNotebooks(tmp_path_factory.mktemp("notebooks"), TINY_EPOCHS)
    ex.out.mkdir()
    for name, params in _tiny_parameters(ex).items():
        source = REPO_ROOT / "notebooks" / f"{name}.ipynb"
        target = ex.out / f"{name}.ipynb"
        if name not in ("00_inference_in_a_few_lines", "06_ablation", "07_recipe_selection", "08_paper_table",
                        "11_worked_example"):
            params = {**params, "results_csv": str(ex.root / f"{name}.csv")}
            ex.csv[name] = ex.root / f"{name}.csv"
        pm.execute_notebook(str(source), str(target), parameters=params, kernel_name="python3",
                            cwd=str(REPO_ROOT / "notebooks"), progress_bar=False)
        ex.notebooks[name] = nbformat.read(str(target), as_version=4)
    return ex
