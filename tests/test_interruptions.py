"""Interrupted and repeated runs lose nothing: training into an existing folder, kill + --resume,
csa batch stopped by Ctrl-C or SIGKILL and started again."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch

from _subprocess import finish, kill_group, run, running, wait_for_file, wait_until
from _train_helpers import tiny_config, write_toy_trainset
from csa.training.config import config_to_argv
from csa.cli import main as csa_main
from csa.training.train import run_training
from csa.validation import CSAInputError
from test_batch import write_grid_notebook

REPO_ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_training_into_an_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    write_toy_trainset(tmp_path)
    run_training(tiny_config(tmp_path, num_epochs=2, warmup_epochs=1))
    run = tmp_path / "run"
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(CSAInputError, match="already holds a training run"):
        run_training(tiny_config(tmp_path, num_epochs=2, warmup_epochs=1, seed=5))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept   # nothing replaced
    argv = config_to_argv(tiny_config(tmp_path, num_epochs=2, warmup_epochs=1, seed=5))
    assert csa_main(["train", *argv]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a resume that would continue another model or other data is refused, naming the fields
    for changed, flags in (({"topk": 8}, "--topk"), ({"embed_dim": 16, "num_heads": 2}, "--embed-dim")):
        with pytest.raises(CSAInputError, match=flags):
            run_training(tiny_config(tmp_path, num_epochs=3, resume="auto", **changed))
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept
    # --overwrite replaces the run (and its per-epoch files) deliberately
    (run / "checkpoint-epoch001.pth").write_bytes(kept["checkpoint.pth"])
    run_training(tiny_config(tmp_path, num_epochs=2, warmup_epochs=1, seed=5, overwrite=True))
    assert not (run / "checkpoint-epoch001.pth").exists()
    assert (run / "checkpoint.pth").read_bytes() != kept["checkpoint.pth"]


@pytest.mark.slow
def test_kill_then_resume_auto_is_bit_identical_and_clears_temporaries(tmp_path):
    write_toy_trainset(tmp_path)
    long = dict(num_epochs=8, warmup_epochs=2)
    run_training(tiny_config(tmp_path, "full", **long))
    killed = tiny_config(tmp_path, "killed", **long)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    history = tmp_path / "killed" / "history.json"

    def two_epochs_done() -> bool:
        with contextlib.suppress(OSError, ValueError):
            return len(json.loads(history.read_text())) >= 2
        return False

    with running([sys.executable, "-m", "csa.training", *config_to_argv(killed)], env=env,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        wait_until(two_epochs_done, proc, "two finished epochs")
        kill_group(proc)
        proc.wait()
    stopped_at = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)["epoch"]
    assert 2 <= stopped_at < 8
    orphan = tmp_path / "killed" / ".checkpoint.pth.k1lledxx.tmp"     # what a kill during a save leaves
    orphan.write_bytes(b"half a checkpoint")
    resumed = run_training(tiny_config(tmp_path, "killed", resume="auto", **long))
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 9))
    full, again = weights(tmp_path / "full" / "checkpoint.pth"), weights(tmp_path / "killed" / "checkpoint.pth")
    assert all(torch.equal(full[k], again[k]) for k in full)
    assert not orphan.exists()


def _slow_grid_notebook(folder: Path, marker: Path) -> Path:
    """The grid notebook of test_batch, whose topk=3 run waits while ``marker`` exists."""
    path = write_grid_notebook(folder / "grid.ipynb")
    nb = nbformat.read(str(path), as_version=4)
    nb.cells[1].source = (f"import os, time\nwhile topk == 3 and os.path.exists({str(marker)!r}):\n"
                          f"    time.sleep(0.1)\n") + nb.cells[1].source
    nbformat.write(nb, str(path))
    return path


def _batch_command(notebook: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "csa", "batch", str(notebook), "--grid", "topk=2,3,4", "--out", str(out),
            "--no-progress"]


_BATCH_ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT))


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "sigkill"])
def test_batch_stopped_then_run_again_keeps_finished_runs(tmp_path, stop):
    marker = tmp_path / "hold"
    marker.touch()
    notebook = _slow_grid_notebook(tmp_path, marker)
    out = tmp_path / "out"
    with running(_batch_command(notebook, out), env=_BATCH_ENV, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE) as proc:
        wait_for_file(out / ".grid__topk-3.running.ipynb", proc)      # run 1 finished, run 2 is executing
        first = (out / "grid__topk-2.ipynb").stat().st_mtime_ns
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)                          # what a terminal sends
            _, err = finish(proc)
            assert proc.returncode == 130
            assert err.strip().splitlines()[-1].startswith("csa batch: interrupted")
            assert not list(out.rglob("*.running.*"))                   # nothing half-written left
        else:
            kill_group(proc)                                            # the batch and its kernel
            finish(proc)
    assert not (out / "grid__topk-3.ipynb").exists() and not (out / "runs" / "grid__topk-3.csv").exists()
    assert pd.read_csv(out / "results.csv")["topk"].tolist() == [2, 2]   # lists exactly the finished run

    marker.unlink()
    proc = run(_batch_command(notebook, out), env=_BATCH_ENV)
    stdout, stderr = proc.stdout, proc.stderr
    assert proc.returncode == 0, stderr
    assert "1 already finished" in stdout
    assert (out / "grid__topk-2.ipynb").stat().st_mtime_ns == first    # not executed again
    assert pd.read_csv(out / "results.csv")["topk"].tolist() == [2, 2, 3, 3, 4, 4]
    assert not list(out.rglob("*.running.*"))


def test_interrupted_extraction_resumes_from_its_finished_shards(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from csa.data.layout import save_gnd
    from csa.descriptors import prepare

    names = [f"im{i}" for i in range(8)]
    (tmp_path / "jpg" / "toy").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((6, 6, 3), 25 * i, dtype=np.uint8)).save(tmp_path / "jpg" / "toy" / f"{name}.jpg")
    save_gnd(tmp_path, "toy", {"imlist": names[:6], "qimlist": names[6:],
                               "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [0, 0, 6, 6]}] * 2})

    class CountingNet(torch.nn.Module):
        meta = {"mean": [0.0] * 3, "std": [1.0] * 3, "outputdim": 3}

        def __init__(self, stop_after: int | None = None):
            super().__init__()
            self.seen, self.stop_after = 0, stop_after

        def forward(self, x):
            if self.stop_after is not None and self.seen >= self.stop_after:
                raise KeyboardInterrupt                          # Ctrl-C in the middle of the database
            self.seen += len(x)
            return torch.nn.functional.normalize(x.mean(dim=(2, 3)) + 1.0, dim=1)

    nets = [CountingNet(stop_after=3), CountingNet(), CountingNet()]
    monkeypatch.setattr(prepare, "TEST_SHARD_SIZE", 2)
    monkeypatch.setattr(prepare, "load_backbone", lambda *args: nets.pop(0))
    kw = dict(image_size=None, scales=(1.0,), device="cpu", num_workers=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_test_features(tmp_path, "toy", "fake", **kw)
    assert not (tmp_path / "test" / "toy" / "fake.pkl").exists()
    second = nets[0]
    out = prepare.prepare_test_features(tmp_path, "toy", "fake", **kw)
    assert second.seen == 4 + 2         # database images 2..5 and the 2 queries: the first shard was kept
    resumed = out.read_bytes()
    prepare.prepare_test_features(tmp_path, "toy", "fake", force=True, **kw)
    assert out.read_bytes() == resumed   # same file as an uninterrupted extraction


def _processes_with(marker: str) -> dict[int, dict[str, str]]:
    """pid -> environment of the live processes whose environment holds ``CSA_TEST_MARKER=marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if env.get("CSA_TEST_MARKER") == marker and state != "Z":
                found[int(entry.name)] = env
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the training processes")
def test_a_training_process_killed_under_torchrun_is_named_in_one_line(tmp_path, monkeypatch):
    import threading

    from csa.training.launch import launch_training

    write_toy_trainset(tmp_path)
    marker = f"ddp-kill-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv("CSA_TEST_MARKER", marker)
    killed: list[int] = []

    def kill_rank_one() -> None:
        def rank_one() -> list[int]:
            return [pid for pid, env in _processes_with(marker).items() if env.get("RANK") == "1"]
        wait_until(lambda: bool(rank_one()), what="rank 1 starting")
        history = tmp_path / "run" / "history.json"
        wait_until(history.exists, what="a finished epoch")               # the ranks are training together
        killed.append(rank_one()[0])
        os.kill(killed[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    with pytest.raises(RuntimeError) as err:
        launch_training(tiny_config(tmp_path, num_epochs=60, warmup_epochs=1), nproc_per_node=2, echo=lambda _: None,
                        threads_per_process=1)
    killer.join()
    message = str(err.value)
    assert message.startswith(f"training failed: training process rank 1 (pid {killed[0]}) was killed by SIGKILL")
    assert "\n" not in message and "Connection" not in message
    wait_until(lambda: not _processes_with(marker), what="every training process gone")
