"""Child processes for tests that hold under load and leave nothing running.

Every child starts in its own process group (``start_new_session=True``), so the whole tree it starts
(papermill kernels, torchrun workers, chromium helpers) can be killed at once.  Waiting has no
speed-dependent limit: :data:`SAFETY_LIMIT_S` only stops a child that hangs, is far above any
expected duration on a busy machine, and is never what a test checks.  A child that is still
running when a test ends, passes or fails, is killed with its group.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

#: Seconds after which a child is presumed hung and killed with its group (a safety net, not a pass criterion).
SAFETY_LIMIT_S = 3600.0


def _default_interrupt() -> None:
    """In the child before it starts: Ctrl-C (SIGINT) back to its default, so the child's Python turns it
    into KeyboardInterrupt even when the tests themselves run in the background (``cmd &`` ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(cmd)`` in a new process group (session), with SIGINT at its default."""
    kwargs.setdefault("text", True)
    kwargs.setdefault("preexec_fn", _default_interrupt)
    return subprocess.Popen(list(map(str, cmd)), start_new_session=True, **kwargs)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process of ``proc``'s group (also when ``proc`` itself has exited)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def finish(proc: subprocess.Popen, limit: float = SAFETY_LIMIT_S) -> tuple[str | None, str | None]:
    """Wait for ``proc`` and return its (stdout, stderr); a hung child is killed with its group and fails the test.

    Whatever ``proc`` started is killed afterwards, so no grandchild outlives the test.
    """
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args!r} still ran after {limit:.0f} s (killed with its process group)\n"
                    f"{(err or '')[-3000:]}")
    finally:
        kill_group(proc)
    return out, err


def run(cmd: Sequence[str], limit: float = SAFETY_LIMIT_S, check: bool = False,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, check=check)``, in its own process group
    (see :func:`finish`)."""
    kwargs.pop("capture_output", None)
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    proc = start(cmd, **kwargs)
    out, err = finish(proc, limit)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def running(cmd: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen]:
    """A started child for the ``with`` body; its whole group is killed when the body ends, however it ends."""
    proc = start(cmd, **kwargs)
    try:
        yield proc
    finally:
        kill_group(proc)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=60)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen | None = None, what: str = "the condition",
               limit: float = SAFETY_LIMIT_S) -> None:
    """Poll ``ready()`` until it holds; fail at once if ``proc`` exits first (no speed-dependent deadline)."""
    start_time = time.monotonic()
    while not ready():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} never happened: the process exited with status {proc.returncode}")
        if time.monotonic() - start_time > limit:
            pytest.fail(f"{what} did not happen within {limit:.0f} s")
        time.sleep(0.05)


def wait_for_file(path: Path, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``path`` exists (see :func:`wait_until`)."""
    wait_until(path.exists, proc, f"{path} appearing")
