"""Start a training run under ``torchrun`` from Python (the training notebook uses this).

``launch_training(config, nproc_per_node=2)`` runs
``python -m torch.distributed.run --standalone --nproc_per_node=2 -m csa.training <flags from config>``,
streams its output line by line (so a notebook shows progress while it runs), and returns the run's
history and checkpoint path. With CUDA each process takes one GPU (NCCL); on CPU the processes talk
over gloo, so the multi-process path is exercised for real even without GPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from csa.training.config import TrainConfig, config_to_argv
from csa.training.run_folder import CHECKPOINT_NAME
from csa.validation import CSAError, CSAInputError

__all__ = ["torchrun_command", "torchrun_text", "launch_training", "failed_process", "peer_lost_error"]

#: How ``csa train`` reports an error (see :func:`csa.cli_errors.run_command`).
TRAIN_ERROR = "csa train: error:"


#: What a process's collective operations raise when a peer process has died (gloo / NCCL wording).
_PEER_LOST = re.compile(r"Connection (reset|closed) by peer|Broken pipe|connectFullMesh|communicator was aborted|"
                        r"Socket Timeout|peer has closed")


def failed_process(lines: list[str]) -> str | None:
    """One sentence naming the process torchrun reports as the root cause of a failed run, or None.

    Reads the ``Root Cause (first observed failure)`` section torchrun prints (``rank`` and ``exitcode``
    lines); a negative exit code is a signal (``-9``: SIGKILL, e.g. the out-of-memory killer).
    """
    start = next((i for i, line in enumerate(lines) if "Root Cause" in line), None)
    if start is None:
        return None
    section = "\n".join(lines[start:])
    rank = re.search(r"\brank\s*:\s*(\d+)", section)
    code = re.search(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", section)
    if rank is None or code is None:
        return None
    status, pid = int(code.group(1)), code.group(2)
    who = f"training process rank {rank.group(1)} (pid {pid})"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return (f"{who} was killed by {name} (killed by hand or by the system, e.g. out of memory); the other "
                f"processes were stopped; resume from the last checkpoint with resume / --resume")
    return f"{who} exited with status {status}"


#: How :func:`peer_lost_error` begins its message after the rank.
_PEER_LOST_PREFIX = "another training process stopped"


def peer_lost_error(exc: BaseException) -> CSAError | None:
    """A one-line error for a training process whose peer died (gloo/NCCL socket errors), else None."""
    text = str(exc)
    if not _PEER_LOST.search(text):
        return None
    rank = os.environ.get("RANK", "?")
    first = (text.strip().splitlines() or [""])[0][:120]
    return CSAError(f"rank {rank}: {_PEER_LOST_PREFIX} (killed or crashed), so this one cannot go on "
                    f"({first}); torchrun's report names the process that died; resume with --resume")


def torchrun_command(config: TrainConfig, nproc_per_node: int = 1) -> list[str]:
    """The full single-node ``torchrun`` command line for ``config``."""
    if nproc_per_node < 1:
        raise CSAInputError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if config.batch_size % nproc_per_node:
        raise CSAInputError(
            f"the global batch size {config.batch_size} is not divisible by nproc_per_node={nproc_per_node}; "
            "choose a batch size that is a multiple of the number of processes")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
            "-m", "csa.training", *config_to_argv(config)]


def torchrun_text(config: TrainConfig, nproc_per_node: int = 1) -> str:
    """:func:`torchrun_command` as one types it: ``torchrun --standalone --nproc_per_node=N -m csa.training ...``
    (the form a release records in its manifest)."""
    return " ".join(["torchrun", *torchrun_command(config, nproc_per_node)[3:]])


def launch_training(config: TrainConfig, nproc_per_node: int = 1, echo: Callable[[str], None] = print,
                    threads_per_process: int | None = None) -> dict:
    """Run ``config`` under torchrun, echoing its output; return ``{'history', 'checkpoint', 'output_dir'}``.

    ``threads_per_process`` sets OMP_NUM_THREADS for CPU runs (default: the cores divided evenly).
    The config is checked here first, so a bad value fails at once with :class:`CSAInputError`.
    When the run fails, the ``RuntimeError`` carries the training's own one-line error
    (``csa train: error: ...``) rather than torchrun's traceback.
    """
    config.check()
    cmd = torchrun_command(config, nproc_per_node)
    env = dict(os.environ)
    threads = threads_per_process or max(1, (os.cpu_count() or 1) // nproc_per_node)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env["PYTHONUNBUFFERED"] = "1"
    echo("$ " + " ".join(cmd[1:]))
    tail: list[str] = []
    error: str | None = None  # the first line of the training's own error report
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            # tqdm redraws with carriage returns: show only the final state of each line
            line = raw.rstrip("\n").split("\r")[-1]
            tail = (tail + [line])[-60:]
            message = line[len(TRAIN_ERROR):].strip() if line.startswith(TRAIN_ERROR) else None
            if message and (error is None or (_PEER_LOST_PREFIX in error and _PEER_LOST_PREFIX not in message)):
                error = message  # the first cause, not a rank that only lost its peer
            echo(line)
        code = proc.wait()
    if code != 0:
        died = failed_process(tail)
        if died is not None and (error is None or "killed by" in died):  # a process killed: say which
            raise RuntimeError(f"training failed: {died}")
        if error is not None:  # the training's own message, not torchrun's traceback
            raise RuntimeError(f"training failed: {error}")
        raise RuntimeError(f"training exited with status {code}; last output:\n" + "\n".join(tail))
    out = Path(config.output_dir)
    history_file = out / "history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else None
    return {"history": history, "checkpoint": out / CHECKPOINT_NAME, "output_dir": out}
