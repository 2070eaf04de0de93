"""The README's Python snippet runs from any working directory once its ``ROOT`` names the demo data."""

from __future__ import annotations

import os
import re
import sys

from csa import evaluate_revisited, first_stage, load_gnd, load_model, load_test_features, rerank
from csa.evaluate import format_revisited

from _subprocess import run as run_isolated
from conftest import DEMO_ROOT, REPO_ROOT

ROOT_LINE = re.compile(r'^ROOT = Path\("([^"]*)"\)', re.MULTILINE)


def _readme_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)
    assert len(blocks) == 1, "the README has one Python snippet"
    return blocks[0]


def test_every_path_of_the_snippet_goes_through_root():
    code = _readme_python_block()
    assert ROOT_LINE.search(code) and ROOT_LINE.search(code).group(1) == "data/demo"
    assert code.count('"data/demo') == 1, "a path that does not start from ROOT depends on the working directory"


def test_the_snippet_runs_from_another_directory(demo_features, tmp_path):
    code = ROOT_LINE.sub(f"ROOT = Path({str(demo_features)!r})", _readme_python_block())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    done = run_isolated([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    topk = int(re.search(r"topk=(\d+)", code).group(1))
    feats = load_test_features(DEMO_ROOT, "roxford5k-mini", "lite0-gem")
    model = load_model(DEMO_ROOT / "weights" / "rparis6k-mini-train.pth")
    ranks = rerank(model, feats.query, feats.db, first_stage(feats.query, feats.db), topk=topk,
                   anchor_len=model.config["anchor_len"], progress=False)
    expected = format_revisited("roxford5k-mini", evaluate_revisited(ranks, load_gnd(DEMO_ROOT, "roxford5k-mini")),
                                "CSA")
    assert expected in done.stdout
