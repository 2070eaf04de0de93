"""Extraction over several processes (torchrun, gloo on the CPU) and its faults: the same bytes as one
process, a killed rank, a resume with another process count, two runs on one shard folder, unreadable
images, damaged or missing shards at the merge."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from csa.descriptors.distributed import Ranks, extraction_device, owned_shards, ranks_from_environment
from csa.descriptors.extract import extract_descriptors, merge_shards, shard_path, shard_ranges
from csa.descriptors.shard_lock import ShardFolderBusy, ShardFolderLock, process_alive
from csa.validation import CSAInputError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DEMO = REPO / "data" / "demo"
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = TESTS / "_extract_worker.py"
N_IMAGES, SHARD = 12, 2                       # 6 shards of 2 images


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{TESTS}", OMP_NUM_THREADS="1")
    return env


def run_group(argv: list[str], cwd: Path = REPO, safety_s: float = 900) -> subprocess.CompletedProcess:
    """Run a command in its own process group; the whole group is killed if it outlives ``safety_s``."""
    proc = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=safety_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, None)


def torchrun(nproc: int, *argv: str) -> list[str]:
    return [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *argv]


def worker(*argv: str) -> list[str]:
    return [sys.executable, str(WORKER), *argv]


@pytest.fixture()
def pngs(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        w, h = (48 + 8 * (i % 3), 40 + 8 * (i % 2))
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def reference_rows(pngs: Path) -> np.ndarray:
    """The one-process rows without shards (the worker's network, built the same way)."""
    sys.path.insert(0, str(TESTS))
    from _extract_worker import TinyNet

    return extract_descriptors(TinyNet(None, None), sorted(pngs.glob("*.png")), image_size=64, batch_size=1,
                               device="cpu", progress=False)


# ------------------------------------------------------------------------------------------------
# ranks and shards
# ------------------------------------------------------------------------------------------------
def test_ranks_come_from_the_torchrun_environment():
    assert ranks_from_environment({}) is None
    assert ranks_from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert ranks_from_environment({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    for bad in ({"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"},
                {"WORLD_SIZE": "two", "RANK": "0"}):
        with pytest.raises(CSAInputError, match="torchrun"):
            ranks_from_environment(bad)
    # rank r of N takes shards r, r+N, ...: every shard exactly once
    owned = [list(owned_shards(7, Ranks(r, 3, r))) for r in range(3)]
    assert owned == [[0, 3, 6], [1, 4], [2, 5]] and list(owned_shards(7, None)) == list(range(7))
    assert extraction_device("cpu", Ranks(1, 2, 1)) == torch.device("cpu")
    assert shard_ranges(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_merge_refuses_a_missing_or_damaged_shard(tmp_path):
    rows = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    for k, (start, stop) in enumerate(shard_ranges(5, 2)):
        np.save(shard_path(tmp_path, k, start, stop), rows[start:stop])
    assert np.array_equal(merge_shards(tmp_path, 5, 2, 3), rows)
    middle = shard_path(tmp_path, 1, 2, 4)
    middle.write_bytes(middle.read_bytes()[:60])
    with pytest.raises(CSAInputError, match=r"shard_00001_2_4\.npy \(images 2 to 3\) is damaged"):
        merge_shards(tmp_path, 5, 2, 3)
    middle.unlink()
    with pytest.raises(CSAInputError, match=r"shard_00001_2_4\.npy \(images 2 to 3\) is missing; run the same"):
        merge_shards(tmp_path, 5, 2, 3)


def test_an_unreadable_image_is_named_with_its_rank(pngs, tmp_path):
    """Also in a process group (gloo, one process): the message names the file and the rank."""
    import torch.distributed as dist

    bad = pngs / "im05.png"
    bad.write_bytes(b"not an image at all")
    paths = sorted(pngs.glob("*.png"))
    sys.path.insert(0, str(TESTS))
    from _extract_worker import TinyNet

    for workers in (0, 1):
        with pytest.raises(CSAInputError, match=rf"cannot read image {bad}.*replace or remove"):
            extract_descriptors(TinyNet(None, None), paths, image_size=64, num_workers=workers, device="cpu",
                                progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(CSAInputError, match=rf"cannot read image {bad} .*\(on rank 0 of 1\)"):
            extract_descriptors(TinyNet(None, None), paths, image_size=64, shard_dir=tmp_path / "s", shard_size=2,
                                device="cpu", progress=False, ranks=Ranks(0, 1, 0, "run"))
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in (tmp_path / "s").glob("shard_*.npy")) == ["shard_00000_0_2.npy",
                                                                             "shard_00001_2_4.npy"]


# ------------------------------------------------------------------------------------------------
# the shard folder lock
# ------------------------------------------------------------------------------------------------
def _write_lock(folder: Path, host: str, pid: int, run: str = "other-run") -> Path:
    path = folder / "locks" / f"{host}-{pid}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run": run, "host": host, "pid": pid, "rank": 0, "started": "then"}))
    return path


def test_a_live_holder_is_refused_a_dead_one_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        lock = _write_lock(tmp_path, socket.gethostname(), holder.pid)
        with pytest.raises(ShardFolderBusy, match=rf"pid {holder.pid} on this machine.*delete {lock}"):
            ShardFolderLock(tmp_path).acquire()
        assert [p.name for p in (tmp_path / "locks").iterdir()] == [lock.name]  # the refused one removed its own
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    assert not process_alive(holder.pid)
    with ShardFolderLock(tmp_path) as taken:
        assert not lock.exists() and taken.path.exists()
        assert json.loads(taken.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "locks").exists()


def test_a_lock_of_another_machine_is_refused_and_one_of_the_same_run_accepted(tmp_path):
    other = _write_lock(tmp_path, "elsewhere.example", 4242)
    with pytest.raises(ShardFolderBusy, match=rf"pid 4242 on host elsewhere\.example.*delete {other}"):
        ShardFolderLock(tmp_path).acquire()
    other.unlink()
    alive = os.getppid()
    _write_lock(tmp_path, socket.gethostname(), alive, run="run-7")
    with ShardFolderLock(tmp_path, Ranks(1, 2, 1, "run-7")):
        assert len(list((tmp_path / "locks").glob("*.lock"))) == 2


# ------------------------------------------------------------------------------------------------
# several processes (slow: each torchrun starts its processes and imports torch)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_demo_extract_writes_the_bytes_of_one_process(tmp_path):
    from _small_demo import make_small_demo

    if not (DEMO / "annotations").is_dir():
        pytest.skip("the demo data root is missing")
    one, two = make_small_demo(DEMO, tmp_path / "one"), make_small_demo(DEMO, tmp_path / "two")
    flags = ["--image-size", "64", "--shard-size", "5", "--no-report"]
    single = run_group([sys.executable, "-m", "csa", "demo", "extract", "--root", str(one), *flags])
    assert single.returncode == 0, single.stdout
    multi = run_group(torchrun(2, "-m", "csa", "demo", "extract", "--root", str(two), *flags))
    assert multi.returncode == 0, multi.stdout
    files = sorted(p.relative_to(one) for part in ("test", "train") for p in (one / part).rglob("*") if p.is_file())
    assert len(files) == 12  # 2 cities x (benchmark, leave-one-out, trainset) x (descriptors, fingerprint)
    for rel in files:
        assert (two / rel).read_bytes() == (one / rel).read_bytes(), rel
    assert sorted(p.relative_to(two) for part in ("test", "train") for p in (two / part).rglob("*")
                  if p.is_file()) == files
    assert multi.stdout.count("roxford5k-mini: ") == 1   # only rank 0 reports
    assert not list((two / "cache").rglob("*.npy"))     # shards removed once merged


@pytest.mark.slow
def test_a_killed_rank_leaves_complete_shards_and_a_run_with_three_processes_finishes(pngs, tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    killed = run_group(torchrun(2, str(WORKER), str(pngs), str(shards), str(out), "--die-after", "2"))
    assert killed.returncode != 0
    done = sorted(shards.glob("shard_*.npy"))
    names = {p.name for p in done}
    assert "shard_00001_2_4.npy" in names and "shard_00003_6_8.npy" not in names  # rank 1 died in its 2nd shard
    for p in done:  # only complete shards under the final names
        assert np.load(p).shape == (SHARD, 8)
    assert not (shards / "descriptors.npy").exists()
    resumed = run_group(torchrun(3, str(WORKER), str(pngs), str(shards), str(out)))
    assert resumed.returncode == 0, resumed.stdout
    seen = sum(int((out / f"seen-{r}.txt").read_text()) for r in range(3))
    assert seen == N_IMAGES - SHARD * len(done)          # every finished shard reused
    rows = np.load(out / "rows.npy")
    assert rows.dtype == np.float32 and np.array_equal(rows, reference_rows(pngs))
    assert not (shards / "locks").exists()


@pytest.mark.slow
def test_a_second_run_on_a_busy_shard_folder_is_refused_and_the_first_finishes(pngs, tmp_path):
    shards, gate = tmp_path / "shards", tmp_path / "gate"
    first = subprocess.Popen(worker(str(pngs), str(shards), str(tmp_path / "a"), "--gate", str(gate)), cwd=REPO,
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # safety only: the test waits for the lock, not for a time
        while not list(shards.glob("locks/*.lock")):
            assert first.poll() is None and time.monotonic() < deadline, first.stdout and first.stdout.read()
            time.sleep(0.05)
        second = run_group(worker(str(pngs), str(shards), str(tmp_path / "b")))
        assert second.returncode == 1
        assert f"is being written by another extraction (pid {first.pid} on this machine" in second.stdout
        assert not (tmp_path / "b").exists() and not list(shards.glob("shard_*.npy"))
        gate.touch()
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert np.array_equal(np.load(tmp_path / "a" / "rows.npy"), reference_rows(pngs))
    shutil.rmtree(shards)


def test_shard_size_flag_is_checked():
    from csa.cli import main

    assert main(["extract", "demo", "--data-root", "data/demo", "--shard-size", "0"]) == 2
    assert main(["demo", "extract", "--root", "data/demo", "--shard-size", "-3"]) == 2


@pytest.mark.slow
def test_torchrun_csa_extract_of_a_test_set_writes_the_bytes_of_one_process(tmp_path):
    """``csa extract <dataset>`` (the full-data path) on a small ROxf-like root made of demo photos."""
    from csa.data.layout import load_gnd, save_gnd
    from csa.data.demo import restrict_gnd

    if not (DEMO / "annotations").is_dir():
        pytest.skip("the demo data root is missing")
    gt = load_gnd(DEMO, "roxford5k-mini")
    small = restrict_gnd(gt, list(gt["imlist"][:15]) + list(gt["qimlist"][:4]))
    roots = []
    for name in ("one", "three"):
        root = tmp_path / name
        save_gnd(root, "roxford5k", small)
        (root / "jpg").mkdir(parents=True)
        (root / "jpg" / "roxford5k").symlink_to((DEMO / "jpg" / "roxford5k-mini").resolve())
        roots.append(root)
    flags = ["extract", "roxford5k", "--backbone", "lite0", "--image-size", "64", "--scales", "1,0.7071",
             "--shard-size", "2", "--workers", "0", "--device", "cpu"]
    single = run_group([sys.executable, "-m", "csa", *flags, "--data-root", str(roots[0])])
    assert single.returncode == 0, single.stdout
    multi = run_group(torchrun(3, "-m", "csa", *flags, "--data-root", str(roots[1])))
    assert multi.returncode == 0, multi.stdout
    assert multi.stdout.count("roxford5k: ") == 1
    for rel in ("test/roxford5k/lite0.pkl", "test/roxford5k/lite0.pkl.fingerprint"):
        assert (roots[1] / rel).read_bytes() == (roots[0] / rel).read_bytes(), rel
