"""The package as a user installs it: a wheel built from the project, installed into a clean environment."""
from __future__ import annotations

import os
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from _subprocess import run as run_isolated

from conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_installs_a_working_csa_command_and_package(tmp_path):
    wheels = tmp_path / "wheels"
    build = run_isolated([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(wheels), str(REPO_ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("csa_rerank-*.whl")

    env_dir = tmp_path / "venv"
    run_isolated([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site = run_isolated([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch & co.) come from the project's environment; csa itself only from the wheel:
    # a plain path entry does not run that environment's .pth files, so its editable csa stays invisible
    Path(site, "_project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = run_isolated([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                           capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    helped = run_isolated([str(env_dir / "bin" / "csa"), "--help"], capture_output=True, text=True, cwd=outside,
                          env=env)
    assert helped.returncode == 0 and "rerank" in helped.stdout and "train" in helped.stdout, helped.stderr
    dry = run_isolated([str(env_dir / "bin" / "csa"), "train", "--recipe", "official", "--dry-run"],
                       capture_output=True, text=True, cwd=outside, env=env)
    assert dry.returncode == 0 and '"clip_grad": 0.0' in dry.stdout, dry.stderr[-2000:]
    script = textwrap.dedent("""
        import numpy as np, torch, csa
        from csa import RerankTransformer, first_stage, rerank
        assert "site-packages" in csa.__file__, csa.__file__
        rng = np.random.default_rng(0)
        db = rng.standard_normal((60, 16)).astype(np.float32); db /= np.linalg.norm(db, axis=1, keepdims=True)
        q = db[:3] + 0.05; q /= np.linalg.norm(q, axis=1, keepdims=True)
        ranks = first_stage(q, db)
        model = RerankTransformer(anchor_len=8, embed_dim=16, depth=1, num_heads=2).eval()
        out = rerank(model, q, db, ranks, topk=10, anchor_len=8, progress=False)
        assert out.shape == ranks.shape and (np.sort(out[:10], axis=0) == np.sort(ranks[:10], axis=0)).all()
        print("ok", csa.__version__)
    """)
    run = run_isolated([str(python), "-c", script], capture_output=True, text=True, cwd=outside, env=env)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
