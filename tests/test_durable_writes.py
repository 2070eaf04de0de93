"""A full disk or a kill never installs a truncated file: durable atomic writes, memory maps, stale temporaries.

A full disk is simulated with the file-size limit (``ulimit -f``, ``RLIMIT_FSIZE``): a write past it fails
with EFBIG exactly where a full disk fails with ENOSPC (Python ignores SIGXFSZ, so the process survives).
"""
from __future__ import annotations

import contextlib
import errno
import os
import resource
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from csa.checkpoint import load_checkpoint, save_checkpoint
from csa.data.r1m import load_distractors, save_distractors, simulate_distractors
from csa.fileio import DiskFullError, atomic_write, is_disk_full, remove_stale_temporaries, save_table
from csa.model import RerankTransformer
from csa.validation import CSAError, CSAInputError

LIMIT = 16 * 1024   # bytes a process may write into one file while the "disk is full"


@contextlib.contextmanager
def file_size_limit(nbytes: int = LIMIT):
    """Lower this process's file-size limit (soft) for the body; the old limit is restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def folder_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def tiny_model(seed: int = 0) -> RerankTransformer:
    torch.manual_seed(seed)
    return RerankTransformer(anchor_len=16, embed_dim=32, depth=1, num_heads=2)


def test_np_save_past_a_full_disk_names_the_disk_and_keeps_the_earlier_file(tmp_path):
    target = tmp_path / "ranks.npy"
    earlier = np.arange(10)
    np.save(target, earlier)
    before = folder_state(tmp_path)
    big = np.arange(100_000, dtype=np.int64)                     # 800 kB: far past the limit
    with file_size_limit(), pytest.raises(DiskFullError, match="disk is full.*ranks.npy") as err:
        with atomic_write(target) as f:
            np.save(f, big)
    assert isinstance(err.value, CSAError) and isinstance(err.value, OSError)
    assert folder_state(tmp_path) == before                      # no truncated file installed, no temporary left
    np.testing.assert_array_equal(np.load(target), earlier)


def test_torch_save_past_a_full_disk_is_a_disk_full_error_not_an_enforce_failure(tmp_path):
    path = tmp_path / "model.pth"
    save_checkpoint(path, tiny_model(0), epoch=1)
    before = folder_state(tmp_path)
    with file_size_limit(4096), pytest.raises(DiskFullError) as err:
        save_checkpoint(path, tiny_model(1), epoch=2)
    assert "disk is full" in str(err.value) and "model.pth" in str(err.value)
    assert folder_state(tmp_path) == before
    assert load_checkpoint(path)["epoch"] == 1


def test_text_tables_past_a_full_disk(tmp_path):
    table = pd.DataFrame({"x": np.arange(20_000)})
    with file_size_limit(), pytest.raises(DiskFullError, match="results.csv"):
        save_table(table, tmp_path / "results.csv")
    assert list(tmp_path.iterdir()) == []


def test_memory_mapped_distractors_past_a_full_disk_leave_no_partial_file(tmp_path):
    vecs = np.ones((2000, 32), dtype=np.float32)                 # 256 kB
    with file_size_limit(), pytest.raises(DiskFullError, match="d.npy"):
        save_distractors(vecs, tmp_path / "d.npy")
    with file_size_limit(), pytest.raises(DiskFullError, match="s.npy"):
        simulate_distractors(2000, 32, path=tmp_path / "s.npy", progress=False)
    assert list(tmp_path.iterdir()) == []
    written = save_distractors(vecs, tmp_path / "d.npy")         # with room, the same call succeeds
    np.testing.assert_array_equal(load_distractors(written), vecs)


def test_a_short_write_the_writer_did_not_see_is_caught_by_the_size_check(tmp_path):
    target = tmp_path / "table.bin"
    with pytest.raises(DiskFullError, match="4 of 1000 bytes"):
        with atomic_write(target) as f:
            f.write(b"x" * 1000)
            f.flush()
            os.ftruncate(f.fileno(), 4)                          # bytes lost below the Python file object
    assert list(tmp_path.iterdir()) == []


def test_disk_full_errors_are_recognised_through_wrapping_exceptions():
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        assert is_disk_full(OSError(code, os.strerror(code)))
    assert is_disk_full(OSError("1000 requested and 24 written"))         # numpy's short write
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")  # torch's wrapper
    except RuntimeError as exc:
        assert is_disk_full(exc)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))


def test_a_writer_failing_for_another_reason_keeps_its_own_error(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with atomic_write(tmp_path / "x.txt", "w") as f:
            f.write("half")
            raise ZeroDivisionError
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    stale = [tmp_path / ".ranks.npy.k1lledxx.tmp", tmp_path / ".db.npy.partial"]
    kept = [tmp_path / "ranks.npy", tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "db.npy.partial"]
    for p in stale + kept:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_writing_under_a_file_where_a_folder_is_needed(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    with pytest.raises(CSAInputError, match="blocker is a file, not a folder"):
        save_checkpoint(tmp_path / "blocker" / "run" / "model.pth", tiny_model(), epoch=0)
    with pytest.raises(CSAInputError, match="is a file, not a folder"):
        save_table(pd.DataFrame({"a": [1]}), tmp_path / "blocker" / "t.csv")
    assert folder_state(tmp_path) == {"blocker": b"a file"}


def test_csa_rerank_output_past_a_full_disk_is_one_line_and_no_file(tmp_path, capsys):
    from _toy_data import write_toy_root
    from csa.cli import main as csa_main

    root = write_toy_root(tmp_path / "root")
    out = tmp_path / "out" / "ranks.npy"
    out.parent.mkdir()
    stale = out.with_name(".ranks.npy.k1lledxx.tmp")            # left by an earlier killed run
    stale.write_bytes(b"half")
    argv = ["rerank", "--data-root", str(root), "--dataset", "toy", "--features", "feat", "--checkpoint",
            str(root / "model.pth"), "--topk", "16", "--device", "cpu", "--output", str(out)]
    with file_size_limit(256):                                   # the ranks (40 x 2 int64) need 768 bytes
        code = csa_main(argv)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "re-ranking:" not in line]  # no bar
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("csa rerank: error: the disk is full") and "ranks.npy" in err[0], err[0]
    assert list(out.parent.iterdir()) == []                      # neither a truncated file nor temporaries
    assert csa_main(argv) == 0 and np.load(out).shape == (40, 2)
